"""Whether a new class's few labels support auto-accepting it yet.

The acceptance guarantee is pooled over the calibration frames of all classes, so a class that operators
have just named rides on the others: with a handful of its frames, a confusion between it and a known class
barely moves the pooled bound, and a camera whose stream is mostly that class would see the confusion in
every other frame ("half-accepting" a new type). Before a class may be auto-accepted its own calibration
frames must (1) number at least MIN_CLASS_CALIBRATION and (2) show no accepted mistake involving it at the
pooled threshold (none of its frames accepted as another class, no other frame accepted as it). Until then the
class is left out of the gate altogether: its frames stay outside the OOD heads' reference, so they keep
being flagged for review as before, and the station says how many more labels it needs. One exception: when
the gate without the class already accepts its frames as other classes (the OOD heads cannot tell it from
a known class), leaving it out only keeps those mistakes; it stays in if that makes fewer accepted mistakes
on its calibration frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from bouncer.fitting.fit import FeatureSet
from bouncer.fitting.replay import replay
from bouncer.runtime.gates.bundle import GateBundle

MIN_CLASS_CALIBRATION = 8  # zero mistakes in 8 frames: the class's own error is below 25% at delta 0.1


@dataclass(frozen=True)
class ClassSupport:
    name: str
    calibration: int  # calibration frames of the class
    accepted: int  # of those, accepted as the class at the pooled threshold
    mistakes: int  # accepted frames of the class as another, or of another as it
    calibration_needed: int  # more calibration frames before the class is judged again (estimate)
    mistakes_without: int | None = None  # its calibration frames accepted (as another class) by the gate without it
    voids_guarantee: bool = False  # with it in the gate, no threshold meets the target (the gate without it does)

    @property
    def supported(self) -> bool:
        return self.calibration >= MIN_CLASS_CALIBRATION and self.mistakes == 0 and not self.voids_guarantee

    @property
    def kept(self) -> bool:
        """In the gate: supported, or fewer accepted mistakes with it than without it."""
        if self.voids_guarantee:
            return False
        return self.supported or (self.mistakes_without is not None and self.mistakes < self.mistakes_without)

    def labels_needed(self, labels_per_calibration_frame: float) -> int:
        return math.ceil(self.calibration_needed * labels_per_calibration_frame)

    def why(self) -> str:
        if self.voids_guarantee:
            return f"with its {self.calibration} calibration frames in the gate no threshold meets the target"
        if self.calibration < MIN_CLASS_CALIBRATION:
            return f"{self.calibration} calibration frames (needs {MIN_CLASS_CALIBRATION})"
        return f"{self.mistakes} accepted mistake(s) on its {self.calibration} calibration frames"

    def as_dict(self, labels_per_calibration_frame: float) -> dict[str, int | bool | str]:
        return {
            "calibration": self.calibration,
            "accepted": self.accepted,
            "mistakes": self.mistakes,
            "supported": self.supported,
            "kept": self.kept,
            "mistakes_without": -1 if self.mistakes_without is None else self.mistakes_without,
            "labels_needed": 0 if self.supported else self.labels_needed(labels_per_calibration_frame),
            "why": "" if self.supported else self.why(),
        }


def class_support(bundle: GateBundle, calib: FeatureSet, names: list[str]) -> dict[str, ClassSupport]:
    """Each named class's calibration evidence under `bundle` (fitted with the class, on `calib`)."""
    r = replay(bundle, calib)
    truth = calib.labels
    pred = np.array([-1 if p is None else bundle.classes.index(p) for p in r.predicted])
    out = {}
    for name in names:
        c = bundle.classes.index(name)
        own = truth == c
        n = int(own.sum())
        mistakes = int((r.accepted & own & (pred != c)).sum() + (r.accepted & ~own & (pred == c)).sum())
        # short of frames: the shortfall; confusions: more training labels are the cure, as a rule of thumb
        # twice as many
        more = MIN_CLASS_CALIBRATION - n if n < MIN_CLASS_CALIBRATION else (n if mistakes else 0)
        out[name] = ClassSupport(name, n, int((r.accepted & own & (pred == c)).sum()), mistakes, more)
    return out


def settle_new_classes(
    fit: Callable[[list[str]], tuple[GateBundle, FeatureSet]], classes: list[str], new: list[str]
) -> tuple[GateBundle, dict[str, ClassSupport]]:
    """Fit with every class, then leave out the new ones their labels do not support yet (see above).

    `fit(names)` fits a gate on the labels of those classes and returns it with its calibration set.
    Returns the gate to publish and the evidence per new class (`kept` says which are in it).
    """
    bundle, calib = fit(classes)
    if not new:
        return bundle, {}
    support = class_support(bundle, calib, new)
    voids = bundle.acceptance.threshold is None
    short = list(new) if voids else [c for c, s in support.items() if not s.supported]
    if not short:
        return bundle, support
    without, _ = fit([c for c in classes if c not in short])
    if voids:
        if without.acceptance.threshold is None:  # the line cannot meet its target either way: not the labels
            return bundle, {}
        more = {c: max(s.calibration, MIN_CLASS_CALIBRATION) for c, s in support.items()}
        return without, {c: replace(s, voids_guarantee=True, calibration_needed=more[c]) for c, s in support.items()}
    for c in short:
        own = calib.take(np.flatnonzero(calib.labels == bundle.classes.index(c)))
        support[c] = replace(support[c], mistakes_without=int(replay(without, own).accepted.sum()))
    pending = [c for c in short if not support[c].kept]
    if not pending:
        return bundle, support
    if len(pending) == len(short):
        return without, support
    return fit([c for c in classes if c not in pending])[0], support
