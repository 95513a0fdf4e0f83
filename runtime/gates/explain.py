"""Where a frame is unusual: a coarse heatmap from the kNN head on the channel maxima of a feature map, or, on a
gate with a per-cell head (`patch:MAP`, as detector gates have) and no explainer, that head's distance per cell:
the cells under an unfamiliar object, inside a box or not.

That head compares each channel's maximum over the map with the nearest training frame's. The channels
whose maximum exceeds the nearest normal frame's carry the evidence; each position's heat is the sum of
that excess over the channels weighted by how close the position comes to the channel's maximum there.
So the map shows the cells that set the unusual maxima, at the tap's resolution (14 x 14 for map_s16).
"""

from __future__ import annotations

import cv2
import numpy as np

from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.heads import GaussianHead, KnnHead, patches

# JET colours for 0..255, computed once (cv2.applyColorMap rebuilds its table on every call)
_JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, :]


def explaining_head(bundle: GateBundle) -> KnnHead | None:
    """The bundle's own explainer (fit gives every gate on a model with maps one), else a decision head on maxima."""
    if bundle.explainer is not None:
        return bundle.explainer
    return next((h for h in bundle.ood_heads if isinstance(h, KnnHead) and h.reduce == "max"), None)


def _per_cell_head(bundle: GateBundle, outputs: dict[str, np.ndarray]) -> GaussianHead | None:
    """A decision head that scores each cell of a map (`patch:MAP`), if the gate has one (detector gates do)."""
    return next((h for h in bundle.ood_heads if isinstance(h, GaussianHead) and h.spatial and h.source in outputs
                 and np.ndim(outputs[h.source]) == 4), None)  # fmt: skip


def heatmap(
    bundle: GateBundle,
    outputs: dict[str, np.ndarray],
    vectors: dict[str, np.ndarray] | None = None,
    anomaly_map: str | None = None,
) -> np.ndarray | None:
    """H x W float32 in [0, 1] for the first frame of `outputs`, or None if the gate has no spatial head.
    `vectors`: the frame's head inputs already computed (`frame_vectors`), so the maxima are not taken twice.
    `anomaly_map`: the user's anomaly model's own map (its card's output), shown instead where it exists."""
    if anomaly_map and anomaly_map in outputs:
        m = np.asarray(outputs[anomaly_map][0], np.float32).reshape(outputs[anomaly_map].shape[-2:])
        lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
        return ((m - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(m)
    cells = _per_cell_head(bundle, outputs)
    if bundle.explainer is None and cells is not None:  # a per-cell head scores every cell already: its map
        fmap = np.asarray(outputs[cells.source][:1], np.float32)
        _, _, h, w = fmap.shape
        d = cells.distances(patches(fmap)[0]).min(1).reshape(h, w)
        lo, hi = float(d.min()), float(d.max())
        return ((d - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros((h, w), np.float32)
    head = explaining_head(bundle)
    if head is None or head.source not in outputs or outputs[head.source].ndim != 4:
        return None
    fmap = np.asarray(outputs[head.source][0], np.float32)  # C x H x W
    _, h, w = fmap.shape
    v = vectors[head.input_key] if vectors and head.input_key in vectors else head.vectors(outputs)[0]
    norm = float(np.linalg.norm(v)) or 1.0
    vn = v / norm
    bank = head.bank_f32
    nearest = bank[int(np.argmax(bank @ vn))]
    excess = np.maximum(vn - nearest, 0.0)
    hot = np.flatnonzero(excess)  # usually a few channels: the rest add nothing
    # how close each position comes to its channel's maximum, to the 4th power: only the cells near the
    # maximum carry the channel's excess
    share = np.clip(fmap[hot] / np.maximum(v[hot], 1e-6)[:, None, None], 0.0, 1.0)
    share *= share
    share *= share
    heat = np.tensordot(excess[hot], share, axes=1)
    top = float(heat.max()) if heat.size else 0.0
    return (heat / top).astype(np.float32) if top > 0 else np.zeros((h, w), np.float32)


def _alpha(heat: np.ndarray) -> np.ndarray:
    """Opacity grows with the heat: cold cells stay see-through, so the overlay marks only what matters."""
    return np.clip(heat * 1.4 - 0.15, 0.0, 0.8)


def heatmap_png(heat: np.ndarray) -> bytes:
    """A small colour PNG with alpha (JET colour map): what travels with a flagged frame."""
    bgr = _JET[np.clip(heat * 255, 0, 255).astype(np.uint8)]
    bgra = np.dstack([bgr, (_alpha(heat) * 255).astype(np.uint8)])
    ok, buf = cv2.imencode(".png", bgra)
    return buf.tobytes() if ok else b""


def overlay(frame: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The frame with its heatmap blended on top (for offline review: `bouncer score --explain`)."""
    h, w = frame.shape[:2]
    big = np.clip(cv2.resize(heat, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    colour = _JET[(big * 255).astype(np.uint8)].astype(np.float32)
    a = _alpha(big)[:, :, None]
    return (frame.astype(np.float32) * (1 - a) + colour * a).astype(np.uint8)
