"""The outbox as the loop's output: a flagged frame (or an accepted one sampled for audit) becomes a frame
message on disk, with its JPEG, the vectors the station retrains from and the heatmap.

The message is written on the outbox's own thread while the loop decides the next frames (its JPEG, vectors,
heatmap and commit were a tenth of the loop's time on a line flagging one frame in ten). Order and durability
stay the loop's: the writer takes jobs in frame order, a finite source's frame is marked done only after its
message is on disk (kill -9 then re-decides it on the next run), at most `WRITE_AHEAD` jobs wait (a slow disk holds
the loop back rather than filling memory), and a write that fails (a full disk) is raised on the loop's thread at
its next frame, and nothing after it is marked done."""

from __future__ import annotations

import logging
import queue
import threading
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

log = logging.getLogger("bouncer.device")
WRITE_AHEAD = 4  # jobs (flagged frames to write, frames to mark done) waiting for the writer thread
Job = Callable[[], None]


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
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=WRITE_AHEAD)
        self._writer: threading.Thread | None = None
        self._failed: BaseException | None = None  # the first failed write: the writer does nothing after it
        self._said = False  # raised on the loop's thread (once)

    def frame(self, done: FrameDone) -> None:
        self._raise_failed()
        d = done.decision
        rate = self.cfg.audit_rate
        audit = d.decision == Verdict.ACCEPT and rate > 0 and self._audit_rng.random() < rate
        if d.decision != Verdict.ACCEPT or audit:
            done.frame_id = self.flag(done.item, d, done.outputs, done.source_uri, done.finite, audit)
        if done.finite:
            source, key = done.source_uri, done.item.key
            self._submit(lambda: self.outbox.mark_done(source, key))
        self.metrics.outbox_depth.set(self.outbox.depth())  # in memory: no query per frame
        self.metrics.outbox_bytes.set(self.outbox.bytes)

    def flush(self) -> None:
        """Wait for what is queued to be on disk, then say any failure."""
        self._jobs.join()
        self._raise_failed()

    def stop(self) -> None:
        """Wait for what is queued to be on disk (a SIGTERM loses nothing decided), then say any failure."""
        if self._writer is not None:
            self._jobs.put(None)
            self._writer.join()
            self._writer = None
        self._helper.shutdown()
        self._raise_failed()

    def flag(
        self,
        item: FrameItem,
        decision: Decision,
        outputs: dict[str, np.ndarray] | None,
        source_uri: str,
        finite: bool,
        audit: bool = False,
    ) -> str:
        """Queue a flagged (or audited) frame for the outbox; returns its message id (a function of the device,
        source and frame: known before the message is written)."""
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
        self._submit(lambda: self._write(guard, msg, item.frame, outputs, decision.decision))
        return msg.id

    # ---- the writer thread ------------------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_jobs, name="bouncer-outbox", daemon=True)
            self._writer.start()
        self._jobs.put(job)  # blocks while WRITE_AHEAD jobs wait

    def _write_jobs(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._failed is None:  # after a failed write nothing more is marked done (nor written out of order)
                    job()
            except BaseException as exc:  # raised on the loop's thread at its next frame
                log.error("outbox: %s", exc)
                self._failed = exc
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _raise_failed(self) -> None:
        if self._failed is not None and not self._said:
            self._said = True
            raise self._failed

    def _write(self, guard: Guard, msg: schemas.FrameMessage, frame: np.ndarray | None,
               outputs: dict[str, np.ndarray] | None, verdict: str) -> None:  # fmt: skip
        """The rest of the message (feature vectors, heatmap, JSON) is built on a helper thread while this one
        encodes the JPEG, which releases the GIL at once, so the two share the cores (the JPEG alone was 40%
        of a flagged frame's cost). The other way round, the helper waited for the GIL before it could start."""
        t1 = time.perf_counter()
        job = self._helper.submit(self._explain, guard, msg, outputs)
        jpeg = b"" if frame is None else encode_jpeg(frame, self.cfg.jpeg_max_side, self.cfg.jpeg_quality)
        payload = msg.with_jpeg(job.result(), jpeg)
        evicted = self.outbox.put(msg.id, schemas.topic(self.device, "frames"), payload, verdict)
        self.metrics.outbox_timer.observe(time.perf_counter() - t1)
        if evicted:
            self.metrics.evictions.inc(len(evicted))
            self.emit(
                "eviction",
                evicted=len(evicted),
                total_evicted=self.outbox.counter("evicted"),
                order="oldest reject first, then oldest review",
            )

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
