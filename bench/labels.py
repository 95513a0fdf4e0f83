"""`bouncer bench labels`: how many operator labels a new defect type needs before the gate accepts it.

A class the gate has never seen plays the new type. Its frames reach the station in batches (10, 20, 40,
80, ...), labelled `new:<type>`; each batch is split as the station splits labels (by a hash of the frame
id: held-out, calibration, training) and the gate is refitted from the base features plus those labels,
exactly as `station retrain` does (heads chosen again). After each retrain: the share of the new type's
other frames auto-accepted as that type, those accepted as another class, and the known classes' coverage
and accepted error. Backbone vectors come from `bench gates --rotation`'s cache (built here if missing).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.bench.rotation import Cache, cached, known_sets
from bouncer.fitting.fit import FeatureSet, FitSettings, fit_from_features
from bouncer.fitting.replay import replay
from bouncer.fitting.support import settle_new_classes
from bouncer.runtime import backends
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.station.retrain import LABELS_PER_CALIBRATION_FRAME, assign_splits

BATCHES = (10, 20, 40, 80, 160)
SCENARIOS = {
    "simulator": (("bracket", "gear", "plate", "washer"), "bolt"),
    # `free` and `uneven` look alike to the classifier: without `uneven` a 99% guarantee is reachable
    "magnetic-tile": (("free", "blowhole", "crack", "fray"), "break"),
    "elpv": (("mono_ok", "mono_defective", "poly_ok"), "poly_defective"),
}


def label_curve(
    cache: Cache, known: Sequence[str], new: str, card, target_accuracy: float, seed: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    classes = [*known, new]
    k = known_sets(cache, known, classes, seed)
    fs, train, calib, pseudo = k.fs, k.train, k.calib, k.pseudo
    clean = cache.kind == "clean"
    test_known = np.flatnonzero(clean & np.isin(cache.cls, known) & (k.split == 2))
    news = np.flatnonzero(clean & (cache.cls == new))
    news = news[np.random.default_rng(seed).permutation(len(news))]
    # the last quarter of the new type is never labelled: the frames each gate is judged on
    judge, pool = news[: len(news) // 4], news[len(news) // 4 :]

    def fit(tr: FeatureSet, ca: FeatureSet, names: list[str]) -> tuple[GateBundle, FeatureSet]:
        """A gate on the frames of `names` only (relabelled), as `station retrain` fits one."""
        sets = [f.restrict(classes, names) for f in (tr, ca)]
        gate = fit_from_features(
            sets[0], sets[1], names, FitSettings(target_accuracy), backbone_hash=card.model_hash,
            backbone_name=card.name, preprocessing=card.preprocessing, version="bench", log=lambda m: None,
            pseudo=pseudo,
        )  # fmt: skip
        return gate, sets[1]

    rows = []
    for n in [b for b in BATCHES if b <= len(pool)] or [len(pool)]:
        labelled = pool[:n]
        parts: dict[str, list[int]] = {"train": [], "calib": [], "heldout": []}
        for i, split in zip(labelled, assign_splits([(str(cache.name[i]), new) for i in labelled]), strict=True):
            parts[split].append(i)
        tr = FeatureSet.concat([train, fs.take(parts["train"])]) if parts["train"] else train
        ca = FeatureSet.concat([calib, fs.take(parts["calib"])]) if parts["calib"] else calib
        row: dict[str, Any] = {"labels": n, "split": {k: len(v) for k, v in parts.items()}}
        have = set(tr.labels.tolist())
        if len(classes) - 1 not in have or (tr.labels == len(classes) - 1).sum() < 2:
            rows.append({**row, "refused": "fewer than 2 training frames of the new type"})
            continue
        try:
            bundle, support = settle_new_classes(partial(fit, tr, ca), classes, [new])
        except BouncerError as exc:
            rows.append({**row, "refused": str(exc)})
            continue
        if new in support and not support[new].kept:  # as `station retrain`: the class waits out of the gate
            sup = support[new]
            row["pending"] = f"{sup.why()}: about {sup.labels_needed(LABELS_PER_CALIBRATION_FRAME)} more labels"
        rn = replay(bundle, fs.take(judge))
        rk = replay(bundle, fs.take(test_known))
        pred_new = np.array([p == new for p in rn.predicted])
        truth_k = [cache.cls[i] for i in test_known]
        right_k = np.array([p == t for p, t in zip(rk.predicted, truth_k, strict=True)])
        n_acc_k = int(rk.accepted.sum())
        row |= {
            "new_accepted_as_new": float((rn.accepted & pred_new).mean()),
            "new_accepted_wrong": int((rn.accepted & ~pred_new).sum()),
            "new_flagged": float((~rn.accepted).mean()),
            "new_frames_judged": len(judge),
            "known_coverage": float(rk.accepted.mean()),
            "known_accepted_error": float((rk.accepted & ~right_k).sum() / n_acc_k) if n_acc_k else 0.0,
            "heads": bundle.fusion.names,
            "gate_accepts_nothing": bundle.acceptance.threshold is None,
        }
        rows.append(row)
        log(
            f"  {n} labels ({row['split']}): new type accepted {row['new_accepted_as_new']:.0%}, wrong accepts "
            f"{row['new_accepted_wrong']}, known coverage {row['known_coverage']:.3f}"
            + (f" (new type left out: {row['pending']})" if "pending" in row else "")
        )
    return rows


def bench_labels(
    model: Path, datasets: dict[str, Path], work: Path | None, log: Callable[[str], None], target_accuracy: float,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    backend = backends.load(model, 2)
    base = work or Path(tempfile.mkdtemp(prefix="bouncer-bench-labels-"))
    out: dict[str, Any] = {"target_accuracy": target_accuracy, "curves": {}}
    for name, root in {"simulator": None, **datasets}.items():
        if name not in SCENARIOS:
            continue
        known, new = SCENARIOS[name]
        cache = cached(backend, name, root, base, log)
        log(f"{name}: known {', '.join(known)}; new type {new}")
        rows = label_curve(cache, known, new, backend.card, target_accuracy, seed, log)
        out["curves"][name] = {"known": list(known), "new": new, "rows": rows}
    return out


def _in_gate(row: dict[str, Any]) -> str:
    if "pending" in row:
        return "no: " + row["pending"]
    return "yes, but no threshold meets the target" if row["gate_accepts_nothing"] else "yes"


def print_labels(results: dict[str, Any]) -> None:
    print("| data set (new type) | labels | train / calib / held-out | new type accepted as it | wrong accepts "
          "| new type flagged | known coverage | known accepted error | new type in the gate |")  # fmt: skip
    print("|" + " --- |" * 9)
    for name, c in results["curves"].items():
        for r in c["rows"]:
            sp = r["split"]
            head = f"| {name} ({c['new']}) | {r['labels']} | {sp['train']} / {sp['calib']} / {sp['heldout']} "
            if "refused" in r:
                print(head + f"| refused: {r['refused'][:80]} | | | | | |")
                continue
            print(
                head + f"| {r['new_accepted_as_new']:.3f} | {r['new_accepted_wrong']} | {r['new_flagged']:.3f} "
                f"| {r['known_coverage']:.3f} | {r['known_accepted_error']:.4f} "
                f"| {_in_gate(r)} |"
            )
    print(json.dumps({"labels": results["curves"]}))
