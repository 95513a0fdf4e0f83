"""The guard: a backbone plus a gate bundle, turning frames into accept / review / reject with reasons."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from bouncer.runtime.backends import Backend
from bouncer.runtime.gates.bundle import BundleError, GateBundle
from bouncer.runtime.gates.decision import Decision, Verdict, rule_one
from bouncer.runtime.gates.detector import Detections, DetectorTask
from bouncer.runtime.gates.heads import KnnHead, input_sources, tile_output
from bouncer.runtime.gates.quality import GREY_H, GREY_W, base_and_grey, grey_stats
from bouncer.runtime.gates.tasks import TASK_OF_CARD, AnomalyScore
from bouncer.runtime.preprocess import Preprocessing, input_to_frame, preprocess


def check_pairing(bundle: GateBundle, backend: Backend) -> None:
    """A gate guards one kind of model, and reads the sidecar it was fitted with (if any)."""
    from bouncer.runtime.backends.paired import PairedBackend

    task, kind = backend.card.task, bundle.task.kind
    if TASK_OF_CARD[task] != kind:
        raise BundleError(f"gate {bundle.version} certifies a {kind} task head; {backend.path.name}'s card says "
                          f"task = {task!r}")  # fmt: skip
    if bundle.sidecar is None:
        return
    side = backend.sidecar.card if isinstance(backend, PairedBackend) else None
    if side is None or side.model_hash != bundle.sidecar["hash"]:
        have = "none" if side is None else f"{side.name} ({side.model_hash[:12]})"
        raise BundleError(
            f"gate {bundle.version} reads the sidecar backbone {bundle.sidecar['name']} "
            f"({bundle.sidecar['hash'][:12]}) beside {backend.path.name}; loaded: {have} (--sidecar / gate.sidecar)"
        )


@dataclass
class Prepared:
    """A frame ready for the backbone: its grey downscale and quality statistics, and the model input."""

    frame: np.ndarray
    grey: np.ndarray
    stats: dict[str, float]
    x: np.ndarray
    preprocessing: Preprocessing  # what `x` was made for


class Guard:
    """Applies a bundle. Refuses a bundle fitted on another backbone (features would be meaningless)."""

    def __init__(self, bundle: GateBundle, backend: Backend) -> None:
        if bundle.backbone_hash != backend.card.model_hash:
            raise BundleError(
                f"gate {bundle.version} was fitted on backbone {bundle.backbone_name} ({bundle.backbone_hash[:12]}), "
                f"not on {backend.path.name} ({backend.card.model_hash[:12]})"
            )
        check_pairing(bundle, backend)
        pp, mp = bundle.preprocessing, backend.card.preprocessing
        if (pp.height, pp.width, pp.mean, pp.std, pp.color) != (mp.height, mp.width, mp.mean, mp.std, mp.color):
            raise BundleError(f"gate {bundle.version}: preprocessing does not match the model's card")
        self.bundle = bundle
        self.backend = backend
        self._input = np.empty((1, 3, pp.height, pp.width), np.float32)  # reused for single frames
        self.last_backbone_s = 0.0
        # bound once: after the backbone call each attribute lookup is a cache miss (see KnnHead.scorer)
        self._features, self._probs, self._fuse = backend.card.task_input, bundle.task.probs, bundle.fusion.fuse
        # an anomaly gate's one confidence is "this frame is good"; too low is an anomaly, not an unsure class
        self._low = "anomaly" if isinstance(bundle.task, AnomalyScore) else "low_confidence"
        self._detector = bundle.task if isinstance(bundle.task, DetectorTask) else None
        self._scorers = [h.scorer() for h in bundle.ood_heads]
        self._pvalue = bundle.ood_pvalue
        self._tiling = bundle.tiling
        self._tile_sources = sorted({s for h in bundle.ood_heads if h.input_key.endswith("@tiles")
                                     for s in input_sources(h.input_key)})  # fmt: skip
        # The loop's own two threads (prefetch and backbone) fill the cores: OpenCV's worker pool would only
        # wake threads that compete with the backbone's for them (docs/hotpath.md, "Measured choices").
        cv2.setNumThreads(1)

    # ---- heads on backbone outputs (vectorised; the per-frame reference) ----------------------

    def tile_outputs(self, frames: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The tile heads' inputs of full-resolution frames: each frame's tiles through the backbone as one
        batch, `tiles:OUTPUT` as N x tiles x ... (nothing when the gate has no tile heads)."""
        if self._tiling is None or not frames:
            return {}
        pp = self.bundle.preprocessing
        x = np.concatenate([preprocess(c, pp) for f in frames for c in self._tiling.crops(f)])
        out = self.backend.run(x)
        t = self._tiling.count
        return {tile_output(s): out[s].reshape(len(frames), t, *out[s].shape[1:]) for s in self._tile_sources}

    def with_tiles(self, outputs: dict[str, np.ndarray], frame: np.ndarray | None) -> dict[str, np.ndarray]:
        """`outputs` with this gate's tile inputs added where they are missing (another gate ran the frame)."""
        if self._tiling is None or all(tile_output(s) in outputs for s in self._tile_sources):
            return outputs
        if frame is None:
            raise BundleError(f"gate {self.bundle.version} scores tiles: it needs the frame, not only its outputs")
        return {**outputs, **self.tile_outputs([frame])}

    def worst_tile(self, outputs: dict[str, np.ndarray], size: tuple[int, int]) -> list[int] | None:
        """The frame rectangle (x1, y1, x2, y2) of the tile the first tile head finds most unusual."""
        if self._tiling is None:
            return None
        for h in self.bundle.ood_heads:
            if h.input_key.endswith("@tiles") and isinstance(h, KnnHead):
                t = int(h.tile_scores(h.vectors(outputs))[0].argmax())
                return list(self._tiling.rects(*size)[t])
        return None

    def head_scores(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """N x H raw OOD head scores."""
        return np.array([score(outputs) for score in self._scorers], np.float32).T  # np.stack: 3x the time

    def heads(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N x C, temperature-scaled) and fused OOD scores (N)."""
        return self._probs(outputs[self._features]), self._fuse(self.head_scores(outputs))

    def decide(self, issues: list[dict[str, Any]], probs: np.ndarray | None, fused: float | None, q: dict) -> Decision:
        if issues:
            return Decision(Verdict.REJECT, reasons=sorted({i["reason"] for i in issues}), details=issues, quality=q)
        assert probs is not None and fused is not None
        b = self.bundle
        if not np.isfinite(probs).all():  # a model that emits NaN is not trusted (a NaN OOD score is just "ood")
            return Decision(Verdict.REVIEW, quality=q).flag({"reason": "invalid_output",
                                                              "value": "NaN or infinite model output"})  # fmt: skip
        k = int(probs.argmax())
        conf = float(probs[k])
        thr = b.acceptance.threshold
        ood, low = rule_one(conf, float(fused), b.ood_threshold, thr)
        d = Decision(Verdict.ACCEPT, label=b.classes[k], confidence=conf, ood_score=float(fused), quality=q,
                     ood_pvalue=self._pvalue(float(fused)))  # fmt: skip
        if low and self._low == "anomaly":
            d.label = "anomaly"
        if ood:
            d.flag(self._ood(d))
        if low:
            d.flag({"reason": self._low, "value": round(conf, 6), "threshold": thr})
        return d

    def _ood(self, d: Decision) -> dict[str, Any]:
        """The `ood` detail of a decision whose fused score and p-value are set."""
        assert d.ood_score is not None
        detail = {"reason": "ood", "value": round(d.ood_score, 4), "threshold": round(self.bundle.ood_threshold, 4)}
        return detail if d.ood_pvalue is None else detail | {"p_value": round(d.ood_pvalue, 6)}

    def decide_detections(self, det: Detections, fused: float, q: dict, size: tuple[int, int] | None) -> Decision:
        """A detector gate's frame: accepted when no candidate box is ambiguous (its certainty at least the
        threshold) and the frame is in distribution; the kept boxes travel with the decision either way."""
        b = self.bundle
        conf = det.certainty()
        if not np.isfinite(conf):
            return Decision(Verdict.REVIEW, quality=q).flag({"reason": "invalid_output",
                                                              "value": f"{det.bad} candidate(s) with NaN or infinite "
                                                                       "outputs"})  # fmt: skip
        pp = b.preprocessing
        corners = det.boxes if size is None else input_to_frame(det.boxes, size[0], size[1], pp)
        kept = det.kept()
        boxes = [{"class": b.classes[int(c)], "p": round(float(p), 4), "box": [round(float(v), 1) for v in box]}
                 for box, c, p in zip(corners[kept], det.classes[kept], det.probs[kept], strict=True)]  # fmt: skip
        counts = Counter(b.classes[int(c)] for c in det.classes[kept])
        label = ", ".join(f"{n} {c}" for c, n in counts.most_common()) or "nothing"
        ood, low = rule_one(conf, fused, b.ood_threshold, b.acceptance.threshold)
        cands = None
        if det.scores is not None:
            cands = np.column_stack([corners, det.classes, det.scores]).astype(np.float32).reshape(-1, 6)
        d = Decision(Verdict.ACCEPT, label=label, confidence=conf, ood_score=fused, quality=q, boxes=boxes,
                     size=size or (pp.width, pp.height), candidates=cands, ood_pvalue=self._pvalue(fused))  # fmt: skip
        k = corners[kept]
        if len(k) and ((k[:, 2] - k[:, 0] < 1) | (k[:, 3] - k[:, 1] < 1)).any():  # clipped away: outside the frame
            d.flag(
                {"reason": "invalid_output", "value": "a kept box lies outside the frame (under a pixel once clipped)"}
            )
        if ood:
            d.flag(self._ood(d))
        if low:
            i = int(np.argmin(np.maximum(det.probs, 1 - det.probs))) if len(det.probs) else 0
            unsure: dict[str, Any] = {"reason": "ambiguous_box", "value": round(conf, 6),
                                      "threshold": b.acceptance.threshold}  # fmt: skip
            if len(det.probs):
                unsure |= {"class": b.classes[int(det.classes[i])], "p": round(float(det.probs[i]), 4),
                           "box": [round(float(v), 1) for v in corners[i]]}  # fmt: skip
            d.flag(unsure)
        return d

    def prepare(self, frame: np.ndarray, prev: np.ndarray | None = None, out: np.ndarray | None = None) -> Prepared:
        """The work on a frame before its backbone call: a device loop runs it for frame n+1 on another thread
        while frame n's backbone runs (the kernels release the GIL). `out`: where the model input goes (default:
        this guard's one buffer, so only one prepared frame may be in flight without it)."""
        pp = self.bundle.preprocessing
        base, grey = base_and_grey(frame, max(pp.width, GREY_W), max(pp.height, GREY_H))
        stats = grey_stats(grey, prev)
        x = preprocess(base, pp, out=self._input if out is None else out)
        return Prepared(frame, grey, stats, x, pp)

    def finish(self, p: Prepared) -> tuple[Decision, dict[str, np.ndarray] | None, np.ndarray]:
        """A prepared frame -> its decision, the backbone outputs (None if the quality gate rejected it before the
        backbone), and its grey downscale (the `prev` of the next frame). This gate's quality bounds decide, also
        for a frame prepared before a gate swap."""
        stats, frame = p.stats, p.frame
        issues = self.bundle.quality.check(stats)
        if issues:
            return self.decide(issues, None, None, stats), None, p.grey
        x = p.x
        if p.preprocessing != self.bundle.preprocessing:  # prepared for another gate's model input
            pp = self.bundle.preprocessing
            x = preprocess(base_and_grey(frame, max(pp.width, GREY_W), max(pp.height, GREY_H))[0], pp)
        t0 = time.perf_counter()
        outputs = self.backend.run(x)
        if self._tiling is not None:
            outputs = {**outputs, **self.tile_outputs([frame])}
        self.last_backbone_s = time.perf_counter() - t0  # lets benchmarks separate the guard's own time
        return self.decide_outputs(stats, outputs, (frame.shape[1], frame.shape[0])), outputs, p.grey

    def score_frame(
        self, frame: np.ndarray, prev: np.ndarray | None = None
    ) -> tuple[Decision, dict[str, np.ndarray] | None, np.ndarray]:
        """One frame of a stream, prepared and finished in one go (see `prepare` and `finish`)."""
        return self.finish(self.prepare(frame, prev))

    def decide_outputs(
        self,
        stats: dict[str, float],
        outputs: dict[str, np.ndarray],
        size: tuple[int, int] | None = None,
        frame: np.ndarray | None = None,
    ) -> Decision:
        """This gate's decision on a frame another gate on the same backbone has run (an OTA trial compares
        the old gate with the new one on the same frames without a second backbone call; a tiled gate runs the
        tiles the other did not, from `frame`). `size`: the frame's width and height, where a detector gate
        reports its boxes (else in model-input pixels)."""
        issues = self.bundle.quality.check(stats)
        if issues:
            return self.decide(issues, None, None, stats)
        outputs = self.with_tiles(outputs, frame)
        if self._detector is not None:
            det = self._detector.detect(outputs[self._features][0])
            return self.decide_detections(det, float(self._fuse(self.head_scores(outputs))[0]), stats, size)
        probs, fused = self.heads(outputs)
        d = self.decide([], probs[0], float(fused[0]), stats)
        if self._tiling is not None and size is not None:
            for detail in d.details:
                if detail.get("reason") == "ood":
                    detail["tile"] = self.worst_tile(outputs, size)
        return d

    # ---- frames -------------------------------------------------------------------------------

    def score_frames(
        self, frames: Sequence[np.ndarray], prevs: Sequence[np.ndarray | None] | None = None
    ) -> list[Decision]:
        """BGR uint8 frames -> decisions, frame by frame (see score_frame)."""
        return [self.score_frame(f, prevs[i] if prevs else None)[0] for i, f in enumerate(frames)]
