"""The simulated line with a schedule of incidents and their ground truth: what the demo and the tests run
the whole system on. Deterministic from a seed.

After `warmup` clean frames (the drift monitor's baselines), in this order: a part type the gate has never
seen appears (a new defect type), a foreign object crosses (a giraffe), the lens smears (blur), the camera
freezes (the same frame repeated), someone puts a lens cap on, and finally the light bulb changes: every
later frame is 2 grey levels brighter, which no single frame reveals (only the drift monitor can).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from bouncer.sim import detection as detection_sim
from bouncer.sim import simulator

PER_FRAME = ("new_defect", "foreign_object", "lens_smear", "frozen", "lens_cap")  # each frame should be flagged
SLOW = ("light_bulb",)  # only a drift event can catch it


@dataclass(frozen=True)
class Incident:
    kind: str
    start: int  # first frame index
    length: int  # frames; the light bulb lasts to the end
    catch: str  # what catches it, for people reading the summary

    def covers(self, i: int) -> bool:
        return self.start <= i < self.start + self.length


def schedule(warmup: int = 500, frames: int | None = None) -> list[Incident]:
    t = warmup + 100
    plan = [
        Incident("new_defect", t, 30, "OOD heads (review)"),
        Incident("foreign_object", t + 80, 10, "OOD heads (review)"),
        Incident("lens_smear", t + 140, 30, "quality gate: blur (reject)"),
        Incident("frozen", t + 220, 30, "quality gate: frozen (reject)"),
        Incident("lens_cap", t + 300, 20, "quality gate: dark / occluded (reject)"),
    ]
    bulb = t + 360
    end = frames if frames is not None else bulb + 340
    plan.append(Incident("light_bulb", bulb, max(end - bulb, 0), "drift monitor: brightness up"))
    return plan


def frames_needed(warmup: int = 500) -> int:
    """Enough frames for the drift monitor to notice the light bulb (it needs a few hundred)."""
    return schedule(warmup)[-1].start + 340


@dataclass
class LineFrame:
    index: int
    frame: np.ndarray
    truth: str | None  # the incident this frame belongs to, None for a normal frame


def line(seed: int, frames: int, warmup: int = 500, detection: bool = False) -> Iterator[LineFrame]:
    """The line's frames with the incident schedule. `detection`: the detection mode's frames (several parts
    each); the new defect type and the foreign object then lie on the belt among known parts."""
    plan = schedule(warmup, frames)
    rng = np.random.default_rng([seed, 99 + detection])
    last: np.ndarray | None = None
    stranger = {"new_defect": simulator.UNKNOWN_PARTS[0], "foreign_object": simulator.FOREIGN[0]}
    for i in range(frames):
        active = next((inc for inc in plan if inc.covers(i)), None)
        kind = active.kind if active else None
        bulb = any(inc.kind == "light_bulb" and inc.covers(i) for inc in plan)
        if kind == "frozen" and last is not None:
            frame = last.copy()  # the camera repeats its last frame exactly
        else:
            if detection:
                parts = detection_sim.random_parts(rng)
                if kind in stranger:
                    parts[int(rng.integers(len(parts)))] = stranger[kind]
                frame, _ = detection_sim.render_scene(parts, rng)
            else:
                known = simulator.KNOWN_CLASSES[int(rng.integers(len(simulator.KNOWN_CLASSES)))]
                part = stranger.get(kind or "", known)
                frame = simulator.render(part, rng)
            if kind == "lens_smear":
                frame = cv2.GaussianBlur(frame, (0, 0), 4.0)
            elif kind == "lens_cap":
                frame = np.clip(frame.astype(np.int16) // 12, 0, 255).astype(np.uint8)
            if bulb:
                frame = np.clip(frame.astype(np.int16) + 2, 0, 255).astype(np.uint8)
        last = frame
        yield LineFrame(i, frame, kind if kind != "light_bulb" else "light_bulb")
