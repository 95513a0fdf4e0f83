"""The outbox as the loop's output: a flagged frame (or an accepted one sampled for audit) becomes a frame
message on disk, with its JPEG, the vectors the station retrains from and the heatmap."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from bouncer.devices.ids import message_id
from bouncer.devices.metrics import DeviceMetrics
from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime import schemas
from bouncer.runtime.config import OutboxSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates import explain
from bouncer.runtime.gates.decision import Decision, Verdict
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.gates.heads import frame_vectors
from bouncer.runtime.outbox import Outbox
from bouncer.runtime.sources.streams import FrameItem


def encode_jpeg(frame: np.ndarray, max_side: int, quality: int) -> bytes:
    h, w = frame.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        frame = cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BouncerError("JPEG encoding failed")
    return buf.tobytes()


class Flagger(Output):
    name = "outbox"

    def __init__(
        self,
        device: str,
        group: str,
        outbox: Outbox,
        id_key: bytes,
        guard: Callable[[], Guard],
        cfg: OutboxSection,
        metrics: DeviceMetrics,
        emit: Callable[..., None],
    ) -> None:
        self.device, self.group, self.outbox, self._id_key = device, group, outbox, id_key
        self.guard, self.cfg, self.metrics, self.emit = guard, cfg, metrics, emit
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="bouncer-explain")
        self._audit_rng = np.random.default_rng()

    def frame(self, done: FrameDone) -> None:
        d = done.decision
        rate = self.cfg.audit_rate
        audit = d.decision == Verdict.ACCEPT and rate > 0 and self._audit_rng.random() < rate
        if d.decision != Verdict.ACCEPT or audit:
            t1 = time.perf_counter()
            done.frame_id = self.flag(done.item, d, done.outputs, done.source_uri, done.finite, audit)
            self.metrics.outbox_timer.observe(time.perf_counter() - t1)
        self.metrics.outbox_depth.set(self.outbox.depth())  # in memory: no query per frame
        self.metrics.outbox_bytes.set(self.outbox.bytes)

    def stop(self) -> None:
        self._helper.shutdown()

    def flag(
        self,
        item: FrameItem,
        decision: Decision,
        outputs: dict[str, np.ndarray] | None,
        source_uri: str,
        finite: bool,
        audit: bool = False,
    ) -> str:
        """Store a flagged (or audited) frame in the outbox; returns its message id once it is on disk.

        The rest of the message (feature vectors, heatmap, JSON) is built on a helper thread while this one
        encodes the JPEG, which releases the GIL at once, so the two share the cores (the JPEG alone was 40%
        of a flagged frame's cost). The other way round, the helper waited for the GIL before it could start."""
        guard = self.guard()
        b = guard.bundle
        msg = schemas.FrameMessage.of_decision(
            decision,
            id=message_id(self._id_key, self.device, source_uri, item.key, finite),
            device=self.device,
            ts=time.time(),
            source=item.source,
            gate_version=b.version,
            backbone_hash=b.backbone_hash,
            jpeg=b"",
            group=self.group,
            audit=audit,
            part=item.part,
        )
        job = self._helper.submit(self._explain, guard, msg, outputs)
        jpeg = b"" if item.frame is None else encode_jpeg(item.frame, self.cfg.jpeg_max_side, self.cfg.jpeg_quality)
        payload = msg.with_jpeg(job.result(), jpeg)
        evicted = self.outbox.put(msg.id, schemas.topic(self.device, "frames"), payload, decision.decision)
        if evicted:
            self.metrics.evictions.inc(len(evicted))
            self.emit(
                "eviction",
                evicted=len(evicted),
                total_evicted=self.outbox.counter("evicted"),
                order="oldest reject first, then oldest review",
            )
        return msg.id

    def _explain(self, guard: Guard, msg: schemas.FrameMessage, outputs: dict[str, np.ndarray] | None) -> bytes:
        """`msg` with what a flagged frame carries besides its JPEG: the vectors the station retrains from (every
        input head selection can choose from) and the heatmap PNG; encoded without the JPEG."""
        if outputs is not None:
            vectors = frame_vectors(guard.backend.card, outputs)
            msg.features = schemas.features_to_wire(vectors)
            if self.cfg.explain:
                h = explain.heatmap(guard.bundle, outputs, vectors, guard.backend.card.anomaly_map)
                msg.heatmap = None if h is None else explain.heatmap_png(h)
        return msg.encode_head()
