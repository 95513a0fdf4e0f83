"""Per-frame kernels: the C++ hot path (`bouncer._hotpath`) when it is built, else the numpy reference.

`BOUNCER_HOTPATH=numpy` forces the reference (benchmarks and tests use it to compare the two).
The functions here are the only way the runtime calls a kernel.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from bouncer.runtime.kernels import reference

log = logging.getLogger("bouncer")


def _load() -> tuple[ModuleType, str]:
    if os.environ.get("BOUNCER_HOTPATH", "").lower() == "numpy":
        return reference, "numpy (forced by BOUNCER_HOTPATH=numpy)"
    try:
        from bouncer import _hotpath  # type: ignore[attr-defined]
    except ImportError as exc:
        log.warning("bouncer: C++ hot path not available (%s); using the numpy reference kernels", exc)
        return reference, "numpy (C++ hot path not built)"
    return _hotpath, "c++"


_impl, ACTIVE = _load()

resize_normalize = _impl.resize_normalize
halve = _impl.halve
halve_with_grey = _impl.halve_with_grey
quality_stats = _impl.quality_stats
linear_probs = _impl.linear_probs
mahalanobis = _impl.mahalanobis
knn_score = _impl.knn_score
spatial_max = _impl.spatial_max
fuse = _impl.fuse
decode_boxes = _impl.decode_boxes
nms = _impl.nms
quantize_bank = reference.quantize_bank
FUSE_METHODS = reference.FUSE_METHODS
LAYOUTS = reference.LAYOUTS
STAT_FIELDS = reference.STAT_FIELDS
