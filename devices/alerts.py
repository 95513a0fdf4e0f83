"""Operator alerts: one message per incident, not one per frame.

A flagged frame is evidence, not news: an operator's phone must not buzz 300 times for one smeared lens. An
incident opens when `min_frames` frames with the same cause fall within `window_s` (OOD frames: a new defect
type or a foreign object suspected; frames failing the same quality check: the lens, the light, a frozen
image); a drift alarm and a lost camera open one at once. The alert goes out when the incident opens; the
incident stays open, silent, while its cause keeps coming, and closes after `quiet_s` without it (a lost
camera: when it is back), so the next occurrence alerts again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime.gates.quality import REASONS as QUALITY_REASONS

LOOP_EVENTS = ("drift", "camera_lost", "camera_recovered", "trigger_timeout")
MAX_IDS = 5  # frame ids an alert carries, so the operator can open the first frames at the station


@dataclass
class Incident:
    alert: str
    key: str
    since: float
    last: float
    frames: int = 0
    frame_ids: list[str] = field(default_factory=list)
    sent: bool = False


SUMMARY = {
    "new_defect_suspected": "frames unlike anything the gate was fitted on: a new defect type or a foreign object?",
    "quality": "frames fail the input check {cause}: lens, light or camera?",
    "drift": "slow drift in {cause}: no single frame shows it",
    "camera_lost": "the camera stopped delivering frames ({cause})",
    "no_trigger": "the camera answers but no part triggered it for {cause}: light barrier, encoder or PLC?",
}


class Alerts(Output):
    """Feed it every decision and event; it calls `send(alert, fields)` once per incident. As the loop's output it
    hears the frame loop's own events only (drift, the camera), on the loop's thread."""

    name = "alerts"

    def __init__(
        self,
        send: Callable[[str, dict[str, Any]], None],
        min_frames: int = 3,
        window_s: float = 60.0,
        quiet_s: float = 300.0,
    ) -> None:
        self.send, self.min_frames, self.window_s, self.quiet_s = send, min_frames, window_s, quiet_s
        self.open: dict[str, Incident] = {}
        self._recent: dict[str, deque[tuple[float, str | None]]] = {}
        self.sent = 0

    def frame(self, done: FrameDone) -> None:
        self.open.pop("no_trigger", None)  # parts come again: the next silence is a new incident
        d = done.decision
        self.note(time.time(), d.decision, d.reasons, done.frame_id)

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind in LOOP_EVENTS:
            self.note_event(time.time(), kind, fields)

    def note(self, ts: float, decision: str, reasons: list[str], frame_id: str | None) -> None:
        self._expire(ts)
        if decision == "accept":
            return
        quality = [r for r in reasons if r in QUALITY_REASONS]
        if quality:
            self._evidence("quality", f"quality:{quality[0]}", quality[0], ts, frame_id)
        elif "ood" in reasons:
            self._evidence("new_defect_suspected", "ood", "ood", ts, frame_id)

    def note_event(self, ts: float, kind: str, fields: dict[str, Any]) -> None:
        self._expire(ts)
        if kind == "drift":
            signal = str(fields.get("signal", "?"))
            self._open("drift", f"drift:{signal}", f"{signal} {fields.get('direction', '')}".strip(), ts, [])
        elif kind == "camera_lost":
            self._open("camera_lost", "camera_lost", str(fields.get("uri", "?")), ts, [])
        elif kind == "camera_recovered":
            self.open.pop("camera_lost", None)
        elif kind == "trigger_timeout":
            self._open("no_trigger", "no_trigger", f"{fields.get('after_s', '?')} s", ts, [])

    def _evidence(self, alert: str, key: str, cause: str, ts: float, frame_id: str | None) -> None:
        inc = self.open.get(key)
        if inc is not None:  # the incident goes on: counted, not re-sent
            inc.last, inc.frames = ts, inc.frames + 1
            return
        recent = self._recent.setdefault(key, deque())
        recent.append((ts, frame_id))
        while recent and recent[0][0] < ts - self.window_s:
            recent.popleft()
        if len(recent) >= self.min_frames:
            ids = [i for _, i in recent if i][:MAX_IDS]
            self._open(alert, key, cause, recent[0][0], ids, frames=len(recent), last=ts)
            recent.clear()

    def _open(
        self, alert: str, key: str, cause: str, since: float, ids: list[str], frames: int = 0, last: float = 0.0
    ) -> None:
        if key in self.open:
            self.open[key].last = max(self.open[key].last, since)
            return
        inc = self.open[key] = Incident(alert, key, since, max(last, since), frames, ids)
        summary = SUMMARY[alert].format(cause=cause)
        self.send(alert, {"key": key, "summary": summary, "since": since, "frames": frames, "frame_ids": ids})
        inc.sent = True
        self.sent += 1

    def _expire(self, now: float) -> None:
        for key, inc in list(self.open.items()):
            if inc.alert not in ("camera_lost", "no_trigger") and inc.last < now - self.quiet_s:
                del self.open[key]
