"""The serving gate's life on a device: serve, take a candidate between two frames, try it against the old
gate on the same live frames, then commit it or roll back. devices/ota.py fetches, verifies, warms and judges;
this class only holds the state and applies the verdicts, on the frame loop's thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bouncer.devices.ota import Candidate, FlagRate, OtaUpdater, Trial
from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.decision import Decision, Verdict
from bouncer.runtime.gates.guard import Guard


class GateLife(Output):
    """Also an output: each decided frame counts towards the flag rate, the running trial or the canary."""

    name = "gate_life"

    def __init__(self, guard: Guard, serial: int, show: Callable[[GateBundle], None], emit: Callable[..., None]):
        self.guard, self.serial = guard, serial
        self.ota: OtaUpdater | None = None  # set by `attach`: the updater needs this object's callbacks
        self.flag_rate = FlagRate()
        self.trial: Trial | None = None
        self._candidate: Candidate | None = None  # offered by the updater's thread, taken between two frames
        self._show, self._emit = show, emit
        show(guard.bundle)

    def attach(self, ota: OtaUpdater) -> None:
        self.ota = ota

    def serving(self) -> tuple[Guard, int]:
        return self.guard, self.serial

    def offer(self, candidate: Candidate) -> None:
        self._candidate = candidate  # one reference: atomic for the frame loop's thread

    def between_frames(self) -> None:
        """Put a warmed candidate in, or judge the running trial."""
        if self._candidate is None and self.trial is None:
            return
        cand, self._candidate = self._candidate, None
        if cand is not None:
            self.trial = Trial(cand, self.guard, self.serial)
            old = self.guard.bundle.version
            self.guard, self.serial = cand.guard, cand.serial
            self._show(cand.guard.bundle)
            self._emit("gate_swap", version=cand.version, serial=cand.serial, previous=old)
        if self.trial is None or self.ota is None:
            return
        verdict = self.ota.judge(self.trial)
        if verdict is None:
            return
        trial, self.trial = self.trial, None
        if not verdict.commit:
            self.guard, self.serial = trial.old, trial.old_serial
            self._show(trial.old.bundle)
        self.ota.finish(trial, verdict)

    def frame(self, done: FrameDone) -> None:
        self.observe(done.item.frame, done.decision, done.outputs, done.spent_s)

    def observe(
        self, frame: np.ndarray | None, decision: Decision, outputs: dict[str, Any] | None, spent_s: float
    ) -> None:
        """Count a decided frame: the recent flag rate, the trial's figures (with the old gate's decision on
        the same frame, without a second backbone run), or a canary frame for the next candidate."""
        if self.ota is None:
            return
        flagged = decision.decision != Verdict.ACCEPT
        self.flag_rate.add(flagged)
        if self.trial is not None:
            t = self.trial
            t.frames += 1
            t.flagged += flagged
            t.seconds += spent_s
            # a frame the new gate rejected before the backbone counts as flagged by both
            old = t.old.decide_outputs(decision.quality, outputs, frame=frame) if outputs is not None else decision
            t.old_flagged += old.decision != Verdict.ACCEPT
        elif frame is not None:
            self.ota.canary.offer(frame, decision.decision)
