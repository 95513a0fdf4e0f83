"""Evaluation as a line would face it: clean known frames, unknown defect types, foreign objects,
corrupted and garbage frames, all in one mix; the guard against the common practice (softmax >= 0.9)
and a last-layer-only Mahalanobis guard."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.fitting import select
from bouncer.fitting.calibration import expected_calibration_error, reliability
from bouncer.fitting.corruptions import CORRUPTIONS, GARBAGE
from bouncer.fitting.fit import load_split
from bouncer.fitting.plots import line_plot, reliability_plot
from bouncer.runtime.errors import ImageError
from bouncer.runtime.gates.decision import VERDICTS, Verdict
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.gates.quality import quality_stats
from bouncer.runtime.images import list_images, read_bgr
from bouncer.runtime.preprocess import preprocess

BAD_KINDS = ("unknown", "foreign", "garbage")
COVERAGES = (0.5, 0.7, 0.9)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counted half; None without both kinds."""
    return select.auroc(pos, neg) if len(pos) and len(neg) else None


class Mix:
    """Frames of every kind with their ground truth, scored in batches."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.kind: list[str] = []
        self.group: list[str] = []
        self.label: list[int] = []
        self.frames: list[np.ndarray] = []
        self.unreadable = 0

    def add(self, frame: np.ndarray, kind: str, group: str, label: int = -1) -> None:
        self.frames.append(frame)
        self.kind.append(kind)
        self.group.append(group)
        self.label.append(label)

    def score(self) -> dict[str, np.ndarray]:
        g, b = self.guard, self.guard.bundle
        stats = [quality_stats(f)[0] for f in self.frames]
        q_ok = np.array([not b.quality.check(s) for s in stats])
        probs_l, plain, fused, raw, base = [], [], [], [], []
        for i in range(0, len(self.frames), 16):
            batch = np.concatenate([preprocess(f, b.preprocessing) for f in self.frames[i : i + 16]])
            out = g.backend.run(batch) | g.tile_outputs(self.frames[i : i + 16])
            x = out[g.backend.card.task_input]
            probs_l.append(b.task.probs(x))
            plain.append(b.task.uncalibrated(x))
            scores = g.head_scores(out)
            raw.append(scores)
            if b.baseline is not None:
                base.append(out[b.baseline.source])
            fused.append(b.fusion.fuse(scores))
        probs = np.concatenate(probs_l)
        fused_all = np.concatenate(fused)
        decisions = [g.decide(b.quality.check(st), probs[i], float(fused_all[i]), st) for i, st in enumerate(stats)]
        return {
            "kind": np.array(self.kind),
            "group": np.array(self.group),
            "label": np.array(self.label),
            "pred": probs.argmax(1),
            "conf": probs.max(1),
            "probs": probs,
            "conf_t1": np.concatenate(plain).max(1),
            "fused": fused_all,
            "raw": np.concatenate(raw),
            "outputs_baseline": np.concatenate(base) if base else None,
            "quality_ok": q_ok,
            "accepted": np.array([d.decision == Verdict.ACCEPT for d in decisions]),
            "decision": np.array([d.decision for d in decisions]),
        }


def _wrong(s: dict[str, np.ndarray]) -> np.ndarray:
    """An accepted frame is an error if it is not a known part, or is a known part given the wrong class."""
    return np.isin(s["kind"], BAD_KINDS) | (s["pred"] != s["label"])


def _point(accepted: np.ndarray, s: dict[str, np.ndarray]) -> dict[str, float]:
    clean = s["kind"] == "clean"
    n_acc = int(accepted.sum())
    return {
        "accepted": n_acc,
        "accepted_error": round(float((accepted & _wrong(s)).sum() / n_acc), 5) if n_acc else 0.0,
        "clean_coverage": round(float((accepted & clean).sum() / max(clean.sum(), 1)), 5),
        "garbage_accepted": int((accepted & (s["kind"] == "garbage")).sum()),
    }


def _operating_points(
    gate: np.ndarray, veto: np.ndarray | None, conf: np.ndarray, s: dict[str, np.ndarray]
) -> np.ndarray:
    """(clean coverage, accepted error) of every setting of a method's knobs: a confidence threshold and,
    for OOD-aware methods, the veto threshold (swept over quantiles of clean frames' scores)."""
    clean, wrong = s["kind"] == "clean", _wrong(s)
    vetoes = [np.inf] if veto is None else [*np.quantile(veto[clean], np.linspace(0.05, 1, 96)), np.inf]
    confs = np.unique(np.quantile(conf, np.linspace(0, 1, 101)))
    pts = []
    above = conf[None, :] >= confs[:, None]  # thresholds x frames
    for v in vetoes:
        base = gate if veto is None else gate & (veto <= v)
        acc = above & base[None, :]
        n = acc.sum(1)
        cov = (acc & clean).sum(1) / max(clean.sum(), 1)
        err = np.where(n > 0, (acc & wrong).sum(1) / np.maximum(n, 1), 0.0)
        pts.append(np.column_stack([cov, err]))
    return np.concatenate(pts)


def _error_at(points: np.ndarray, coverage: float) -> float | None:
    """Lowest accepted error of any knob setting that auto-accepts at least `coverage` of clean frames."""
    reach = points[points[:, 0] >= coverage - 1e-9]
    return round(float(reach[:, 1].min()), 5) if len(reach) else None


def evaluate(
    guard: Guard,
    known: Path,
    unknown: Sequence[Path] = (),
    foreign: Sequence[Path] = (),
    corrupt: bool = False,
    out_dir: Path | None = None,
    seed: int = 0,
    per_corruption: int = 40,
) -> dict[str, Any]:
    b = guard.bundle
    mix = Mix(guard)
    _, paths, labels = load_split(known, b.classes)
    clean_frames = []
    for p, lab in zip(paths, labels, strict=True):
        try:
            f = read_bgr(p)
        except ImageError:
            mix.unreadable += 1
            continue
        mix.add(f, "clean", "clean", lab)
        clean_frames.append((f, lab))
    for kind, dirs in (("unknown", unknown), ("foreign", foreign)):
        for d in dirs:
            for p in list_images(d):
                try:
                    mix.add(read_bgr(p), kind, f"{kind}:{Path(d).name}")
                except ImageError:
                    mix.unreadable += 1
    if corrupt and clean_frames:
        rng = np.random.default_rng(seed)
        for name, fn in CORRUPTIONS.items():
            for i in rng.permutation(len(clean_frames))[:per_corruption]:
                f, lab = clean_frames[i]
                mix.add(fn(f, rng), "corrupt", f"corrupt:{name}", lab)
        for name, fn in GARBAGE.items():
            for i in rng.permutation(len(clean_frames))[: max(per_corruption // 2, 10)]:
                mix.add(fn(clean_frames[i][0], rng), "garbage", f"garbage:{name}")
    s = mix.score()
    clean = s["kind"] == "clean"

    base = b.baseline.score_vectors(s["outputs_baseline"]) if b.baseline is not None else None
    # name -> (accepted at its operating point, always-on gate, OOD veto score or None, confidence). The
    # risk-coverage curve of a method is the best accepted error over every setting of its knobs that
    # reaches a coverage: fair to a method with one knob (softmax) and to those with two.
    everything = np.ones(len(clean), bool)
    methods: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, float | None]] = {
        "guard": (s["accepted"], s["quality_ok"], s["fused"], s["conf"], b.acceptance.threshold),
        "softmax_0.9": (s["conf_t1"] >= 0.9, everything, None, s["conf_t1"], 0.9),
    }
    if base is not None:
        methods["last_layer_mahalanobis"] = (
            (base <= b.baseline_threshold) & (s["conf_t1"] >= 0.9),
            everything,
            base,
            s["conf_t1"],
            0.9,
        )
    report: dict[str, Any] = {
        "gate": b.version,
        "frames": {k: int((s["kind"] == k).sum()) for k in ("clean", "unknown", "foreign", "corrupt", "garbage")},
        "unreadable": mix.unreadable,
        "methods": {},
        "risk_coverage": {},
    }
    grid = np.linspace(0, 1, 101)
    guard_cov = None
    for name, (accepted, gate, veto, conf, threshold) in methods.items():
        op = _point(accepted, s)
        points = _operating_points(gate, veto, conf, s)
        if name == "guard":
            guard_cov = op["clean_coverage"]
        covs = sorted({*COVERAGES, *([guard_cov] if guard_cov else [])})
        report["methods"][name] = {
            "operating_point": op,
            "threshold": threshold,
            "accepted_error_at_clean_coverage": {f"{c:.3f}": _error_at(points, c) for c in covs},
        }
        report["risk_coverage"][name] = [(float(c), e) for c in grid if (e := _error_at(points, c)) is not None]
    fused, known_scores = s["fused"], s["fused"][clean]
    report["ood_auroc"] = {
        "unknown": auroc(fused[s["kind"] == "unknown"], known_scores),
        "foreign": auroc(fused[s["kind"] == "foreign"], known_scores),
    }
    if base is not None:
        report["ood_auroc_last_layer_mahalanobis"] = {
            "unknown": auroc(base[s["kind"] == "unknown"], base[clean]),
            "foreign": auroc(base[s["kind"] == "foreign"], base[clean]),
        }
    report["ece"] = round(expected_calibration_error(s["probs"][clean], s["label"][clean]), 5) if clean.any() else None
    report["clean_accuracy"] = round(float((s["pred"][clean] == s["label"][clean]).mean()), 5) if clean.any() else None
    report["by_group"] = {
        g: {d: int(((s["group"] == g) & (s["decision"] == d)).sum()) for d in VERDICTS}
        for g in sorted(set(s["group"].tolist()))
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        line_plot(
            {k: ([c for c, _ in v], [e for _, e in v]) for k, v in report["risk_coverage"].items()},
            out_dir / "risk_coverage.png",
            f"risk-coverage, gate {b.version}",
            "clean coverage",
            "accepted error",
        )
        if clean.any():
            reliability_plot(
                reliability(s["probs"][clean], s["label"][clean]),
                out_dir / "reliability.png",
                f"reliability (clean known frames), ECE {report['ece']:.4f}",
            )
    return report
