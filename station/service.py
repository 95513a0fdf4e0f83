"""The station as one object: store, TUF repository, base features, MQTT consumer, and the operations
the CLI and the web UI share (init, label, retrain, approve and publish), one gate per group (line or
camera group). Groups never share data: a group's labels retrain only its gate."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bouncer.fitting.fit import extract, gate_inputs, load_split, synthetic_defects, task_splits, to_features
from bouncer.runtime import schemas
from bouncer.runtime.backends import Backend
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.detector import DetectorTask
from bouncer.runtime.gates.heads import input_sources
from bouncer.station.accounts import Accounts
from bouncer.station.broker_auth import BrokerIdentities
from bouncer.station.config import RetrainSection, StationConfig
from bouncer.station.retrain import BaseData, RetrainResult, retrain
from bouncer.station.store import Frame, QueueFilter, Store
from bouncer.station.tufrepo import TufRepo

if TYPE_CHECKING:
    from bouncer.station.consumer import Consumer

log = logging.getLogger("bouncer.station")
APPROVAL_RULE = "rule: guarantee holds and not worse than the champion on held-out labels"


class GroupError(BouncerError):
    """A group this station does not manage."""


class Station:
    def __init__(self, cfg: StationConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.station.data_dir)
        self.groups = list(cfg.station.groups)
        self.store = Store(self.root, cfg.station.database, cfg.station.wait_s, objects=cfg.station.objects)
        self.accounts = Accounts(self.store)
        self.broker_identities = BrokerIdentities(self.store, self.root / "broker")
        self.repo = TufRepo(self.root)
        self.consumer: Consumer | None = None
        self._retrain_lock = threading.Lock()
        self._repo_lock = threading.Lock()  # one writer of the TUF metadata at a time
        self._tuf_pending = threading.Event()  # the object store missed the latest TUF files: retry soon
        self._stop = threading.Event()

    def check_group(self, group: str | None) -> str:
        group = group or self.groups[0]
        if group not in self.groups:
            raise GroupError(f"group {group!r} is not managed by this station (groups: {', '.join(self.groups)})")
        return group

    def base(self, group: str) -> BaseData:
        return BaseData(self.root / "base" / group)

    def gates_dir(self, group: str) -> Path:
        return self.root / "gates" / group

    # ---- set-up ---------------------------------------------------------------------------------

    def init(
        self, bundle_path: Path, backend: Backend, train_dir: Path, calib_dir: Path, group: str | None = None
    ) -> dict[str, Any]:
        """Keys and TUF repository (once), base features of the group's training and calibration folders
        (with the backbone, once), and the gate as the group's first published champion."""
        group = self.check_group(group)
        if self.store.champion(group) is not None:
            raise BouncerError(f"group {group!r} already has a gate; retrain it instead")
        bundle = GateBundle.load(bundle_path)
        if bundle.backbone_hash != backend.card.model_hash:
            raise BouncerError(f"{bundle_path}: fitted on another backbone than {backend.path.name}")
        source: Path | None = bundle_path
        if self.store.gate(bundle.version) is not None:  # versions name one gate across all groups
            bundle.version, source = f"{group}-{bundle.version}", None
        if not self.repo.exists:
            self.repo.init()
        if isinstance(bundle.task, DetectorTask):  # a frozen detector: what retraining refits is its calibration
            from bouncer.fitting.detector import detection_frames

            calib = detection_frames(bundle, backend, calib_dir)
            meta = {"task": "detector", "features": backend.card.detections, "classes": bundle.classes}
            self.base(group).save_detections(calib, meta)
            self._first_gate(bundle, group, source, train_dir)
            return {"group": group, "train": 0, "calib": len(calib), "root": str(self.repo.root_json)}
        # every input head selection may choose from, so that retraining can choose again
        keys = gate_inputs(backend.card, None)
        sources = {s for k in keys for s in input_sources(k)} | {backend.card.task_input}
        sets, calib_paths = [], []
        if backend.card.task == "anomaly":  # good frames to train on; good and defective ones to calibrate
            _, tp, tl, cp, cl = task_splits(backend.card, train_dir, calib_dir, log.info)
            splits = [(tp, tl), (cp, cl)]
        else:
            splits = [load_split(folder, bundle.classes)[1:] for folder in (train_dir, calib_dir)]
        for paths, labels in splits:
            ex = extract(backend, bundle.preprocessing, paths, labels, sources)
            sets.append(to_features(ex, backend.card.task_input, keys))
            calib_paths = ex.paths
        task_input = backend.card.task_input
        pseudo = synthetic_defects(backend, bundle.preprocessing, calib_paths, sources, task_input, keys, 0)
        self.base(group).save(sets[0], sets[1], {"features": task_input, "classes": bundle.classes}, pseudo=pseudo)
        self._first_gate(bundle, group, source, train_dir)
        return {"group": group, "train": len(sets[0]), "calib": len(sets[1]), "root": str(self.repo.root_json)}

    def _first_gate(self, bundle: GateBundle, group: str, source: Path | None, train_dir: Path) -> None:
        summary = _fit_summary(bundle, group=group, train_dir=str(train_dir))
        self.store.audit(bundle.version, "fitted", "bouncer fit", summary)
        self.store.audit(bundle.version, "approved", "operator (bouncer station init)", {"group": group})
        self.publish(bundle, group, source, role_metrics={"origin": f"bouncer fit ({train_dir})"})

    # ---- gates ----------------------------------------------------------------------------------

    def champion(self, group: str | None = None) -> GateBundle:
        group = self.check_group(group)
        g = self.store.champion(group)
        if g is None:
            raise BouncerError(f"group {group!r} has no published gate (run `bouncer station init --group {group}`)")
        return GateBundle.load(Path(g["path"]))

    def publish(
        self, bundle: GateBundle, group: str, path: Path | None = None, role_metrics: dict | None = None,
        serial: int | None = None,
    ) -> int:  # fmt: skip
        serial = serial or self.store.next_serial()
        gates_dir = self.gates_dir(group)
        gates_dir.mkdir(parents=True, exist_ok=True)
        dest = gates_dir / f"{bundle.version}.bouncer"
        if path is not None and Path(path).resolve() != dest.resolve():
            shutil.copyfile(path, dest)
        elif path is None:
            bundle.save(dest)
        custom = {"version": bundle.version, "serial": serial, "backbone_hash": bundle.backbone_hash,
                  "classes": bundle.classes, "group": group}  # fmt: skip
        with self._repo_lock:
            targets_version = self.repo.publish(dest, group, custom)
            self._mirror_tuf()  # before the announcement below sends devices to fetch it
        self.store.audit(bundle.version, "published", "station", {"serial": serial, "group": group,
                                                                  "tuf_targets_version": targets_version})  # fmt: skip
        old = self.store.champion(group)
        if old:
            self.store.set_gate_role(old["version"], "retired")
        self.store.add_gate(bundle.version, group, serial, "champion", dest,
                            {**bundle.fit_metrics, **(role_metrics or {})})  # fmt: skip
        self.write_card(bundle, group, self._load_version(old["path"]) if old else None)
        self._announce(group, bundle, serial)
        log.info("published gate %s (serial %d) for group %s", bundle.version, serial, group)
        return serial

    def _mirror_tuf(self) -> None:
        """With frames on an object store the TUF repository goes there too, so every web worker serves the same
        repository whatever machine it runs on. An object store that is down delays it (retried every 30 s by
        the maintenance loop) and does not undo the publication: devices keep the gate they have meanwhile."""
        from bouncer.station.objects import FolderObjects

        if isinstance(self.store.objects, FolderObjects):  # the folder is data_dir itself: already in place
            return
        try:
            written = self.repo.mirror(self.store.objects)
            self._tuf_pending.clear()
            if written:
                log.info("copied %d TUF file(s) to %s", written, self.store.objects.where)
        except OSError as exc:
            self._tuf_pending.set()
            log.error("could not copy the TUF repository to the object store (retrying in 30 s): %s", exc)

    def _announce(self, group: str, bundle: GateBundle, serial: int) -> None:
        if self.consumer is not None:
            ann = schemas.GateAnnouncement(group, bundle.version, serial, bundle.backbone_hash)
            self.consumer.announce(group, ann)

    @contextmanager
    def _publisher(self) -> Iterator[None]:
        """Retraining, approval and publishing run in one process at a time across every worker on this database
        (the `retrain` role lock), so two workers never sign and publish two gates."""
        with self._retrain_lock, self.store.db.role("retrain") as held:
            if not held:
                raise BouncerError("another station worker is retraining or publishing now: try again later")
            yield

    def retrain(self, group: str | None = None, log_fn=None) -> RetrainResult:
        group = self.check_group(group)
        with self._publisher():
            champion = self.champion(group)
            current = self.store.champion(group)
            started = time.time()  # labels labelled from now on are new to the next retraining, even mid-fit
            since = self.store.labels_since(group, labels_until(current)) if current else 1
            if not since:  # the same labels would fit the same gate again under a new serial
                result = RetrainResult(False, f"no new labels since gate {champion.version}: nothing published", None)
                self.store.add_retrain(
                    group, {"published": False, "pending_approval": False, "reason": result.reason}, started
                )
                return result
            serial = self.store.next_serial()
            say = log_fn or (lambda m: log.info(m))
            result = retrain(self.store, self.base(group), champion, serial, group, log=say)
            result.metrics["labelled_by"] = self.store.labellers(group)  # in the audit record of the fit
            ch = result.challenger
            if ch is not None:
                path = self.gates_dir(group) / f"{ch.version}.bouncer"
                ch.save(path)
                self.store.audit(
                    ch.version, "fitted", "station retrain", _fit_summary(ch, group=group, **result.metrics)
                )
                seen = {"labels_until": started}
                if not result.publish:
                    self.store.audit(ch.version, "rejected", "station retrain", {"reason": result.reason})
                    self.store.add_gate(ch.version, group, serial, "rejected", path,
                                        {**ch.fit_metrics, **seen, "rejected_because": result.reason})  # fmt: skip
                elif self.cfg.retrain.approval == "manual":
                    self.store.audit(ch.version, "awaiting_approval", "station retrain", {"reason": result.reason})
                    self.store.add_gate(ch.version, group, serial, "pending", path, {**ch.fit_metrics, **seen})
                else:
                    self.store.audit(ch.version, "approved", APPROVAL_RULE, {"reason": result.reason})
                    self.publish(ch, group, path, role_metrics=seen, serial=serial)
                if not result.publish or self.cfg.retrain.approval == "manual":
                    self.write_card(ch, group, champion)
            pending = result.publish and self.cfg.retrain.approval == "manual"
            self.store.add_retrain(group, {
                "published": result.publish and not pending, "pending_approval": pending, "reason": result.reason,
                **result.metrics,
            }, started)  # fmt: skip
            return result

    def approve(self, version: str, user: str) -> dict[str, Any]:
        """An operator approves a pending challenger (manual approval): only one that passed its checks."""
        g = self.store.gate(version)
        if g is None:
            raise KeyError(version)
        if g["role"] != "pending":
            why = g["metrics"].get("rejected_because", "")
            raise BouncerError(
                f"gate {version} is {g['role']}: only a pending gate that passed its checks can be approved"
                + (f" (it failed: {why})" if why else "")
            )
        with self._publisher():
            bundle = GateBundle.load(Path(g["path"]))
            self.store.audit(version, "approved", f"user:{user}", {"group": g["group"]})
            seen = {"labels_until": labels_until(g)}
            serial = self.publish(bundle, g["group"], Path(g["path"]), role_metrics=seen, serial=int(g["serial"]))
        return {"version": version, "group": g["group"], "serial": serial}

    def due_for_retraining(self, group: str, now: float) -> bool:
        return retraining_due(self.store, self.cfg.retrain, group, now)

    def retrain_loop(self, every_s: float = 5.0) -> None:
        """Retrain each group on its schedule or once enough new labels arrived (the serve command runs this)."""
        while not self._stop.wait(every_s):
            for group in self.groups:
                if self.store.champion(group) is None or not self.due_for_retraining(group, time.time()):
                    continue
                try:
                    result = self.retrain(group)
                    log.info("scheduled retraining of %s: %s", group, result.reason)
                except BouncerError as exc:
                    log.warning("scheduled retraining of %s failed: %s", group, exc)

    def maintain_loop(self, every_s: float = 3600.0) -> None:
        """Keep the TUF metadata from expiring on a station that publishes nothing for a while, sweep objects a
        crash left without a row, and apply the retention (station.retention_days)."""
        while True:
            try:
                with self._repo_lock:
                    roles = self.repo.refresh()
                    self._mirror_tuf()
                if roles:
                    log.info("re-signed TUF metadata: %s", ", ".join(roles))
                swept = self.store.sweep(self.cfg.station.sweep_grace_s)
                if swept:
                    log.info("removed %d object(s) no row points at", swept)
                if self.cfg.station.retention_days:
                    gone = self.store.expire(self.cfg.station.retention_days * 86400)
                    if any(gone.values()):
                        log.info("retention (%g days) removed %s", self.cfg.station.retention_days,
                                 ", ".join(f"{n} {what}" for what, n in gone.items()))  # fmt: skip
            except OSError as exc:
                log.error("maintenance failed, next try in %.0f s: %s", every_s, exc)
            if self._stop.wait(min(every_s, 30.0) if self._tuf_pending.is_set() else every_s):
                return

    def _load_version(self, path: str) -> GateBundle | None:
        try:
            return GateBundle.load(Path(path))
        except BouncerError:
            return None

    def card(self, version: str) -> str | None:
        """The gate card, from where the station keeps objects (so any web worker serves it); KeyError for a
        version the station does not have."""
        g = self.store.gate(version)
        if g is None:
            raise KeyError(version)
        data = self.store.objects.get(_card_key(g["group"], version))
        return None if data is None else data.decode()

    def write_card(self, bundle: GateBundle, group: str, previous: GateBundle | None) -> None:
        from bouncer.station.gatecard import gate_card

        text = gate_card(bundle, previous, self.store.audit_log(bundle.version))
        self.store.objects.put(_card_key(group, bundle.version), text.encode())

    # ---- labels ---------------------------------------------------------------------------------

    def label(self, frame_id: str, value: Any, user: str, boxes: Any = None) -> dict[str, Any]:
        """`value`: a class label; on a detector group's frame `boxes` (its true boxes) or "correct" / "garbage"."""
        frame = self.store.frame(frame_id)
        if frame is None:
            raise KeyError(frame_id)
        kind, name = self._parse_label(frame, value, boxes)
        self.store.set_label(frame_id, kind, name, user)
        return {"id": frame_id, "kind": kind, "label": json.loads(name) if kind == "boxes" and name else name}

    def _parse_label(self, frame: Frame, value: Any, boxes: Any) -> tuple[str, str | None]:
        champion = self.champion(frame.group)
        if isinstance(champion.task, DetectorTask):
            size = (frame.size[0], frame.size[1]) if frame.size else None
            return schemas.parse_box_label(value, boxes, champion.classes, frame.boxes, size)
        return schemas.parse_label(value, champion.classes, frame.predicted)

    def incidents(
        self, group: str, limit: int = 50, frames: int = 2000, filters: QueueFilter | None = None
    ) -> list[dict[str, Any]]:
        """The group's unlabelled frames (the oldest `frames` that `filters` lets through) grouped into incidents,
        oldest first."""
        from bouncer.station.incidents import group_frames

        rows, vectors = self.store.queue_vectors(group, frames, filters)
        return [i.to_dict() for i in group_frames(rows, vectors)[:limit]]

    def label_frames(self, frame_ids: list[str], value: Any, user: str, boxes: Any = None) -> dict[str, Any]:
        """One label for many frames (an incident), all checked before any is written; frames someone labelled
        meanwhile are left as they are and counted."""
        frames = []
        for fid in dict.fromkeys(frame_ids):
            frame = self.store.frame(fid)
            if frame is None:
                raise KeyError(fid)
            frames.append(frame)
        todo = [(f, self._parse_label(f, value, boxes)) for f in frames if f.label_kind is None]
        for f, (kind, name) in todo:
            self.store.set_label(f.id, kind, name, user)
        kinds = Counter(kind for _, (kind, _) in todo)
        return {"labelled": len(todo), "already_labelled": len(frames) - len(todo),
                "kind": kinds.most_common(1)[0][0] if kinds else None}  # fmt: skip

    # ---- running --------------------------------------------------------------------------------

    def start_mqtt(self) -> None:
        if not self.cfg.mqtt.broker:
            return
        from bouncer.station.consumer import Consumer

        self.consumer = Consumer(
            self.cfg.mqtt, self.store, self.cfg.station.share_group, self.cfg.station.worker, self.groups,
            subscribe="ingest" in self.cfg.station.roles,
        )  # fmt: skip
        self.consumer.start()
        if "retrain" not in self.cfg.station.roles:
            return  # announcing is the publisher's: its folder has the bundles
        for group in self.groups:  # re-announce each current gate (retained) in case the broker lost it
            g = self.store.champion(group)
            if g is not None:
                self._announce(group, GateBundle.load(Path(g["path"])), int(g["serial"]))

    def ingest_health(self) -> dict[str, Any] | None:
        """The MQTT ingest's liveness (Consumer.health); None where this worker does not ingest."""
        if self.consumer is None or not self.consumer.subscribe:
            return None
        return self.consumer.health()

    def stop(self) -> None:
        self._stop.set()
        if self.consumer is not None:
            self.consumer.stop()
        self.store.close()


def _card_key(group: str, version: str) -> str:
    """Beside the bundle in data_dir (gates/<group>/) on the folder store, the same key on an object store."""
    return f"gates/{group}/{version}.md"


def _fit_summary(bundle: GateBundle, **extra: Any) -> dict[str, Any]:
    """What a `fitted` audit record keeps: data used, metrics, the guarantee achieved."""
    f = bundle.fit
    return {"train_images": f.train_images, "calibration_images": f.calibration_images, "class_counts": f.class_counts,
            "calibration_accuracy": f.calibration_accuracy, "calibration_coverage": f.calibration_coverage,
            "ece_after_scaling": f.classifier.ece_after_scaling if f.classifier else None, "classes": bundle.classes,
            "guarantee": bundle.acceptance.__dict__, **extra}  # fmt: skip


def labels_until(gate: dict[str, Any]) -> float:
    """When the labels a gate was fitted on were read: labels that arrive while it fits are new to the next one."""
    return float(gate["metrics"].get("labels_until", gate["created"]))


def retraining_due(store: Store, r: RetrainSection, group: str, now: float) -> bool:
    """Since the group's newest gate (fitted, pending or refused) or retraining read its labels: the schedule has
    run out, or enough labels arrived: `min_new_labels`, or fewer when the last retraining left a new class out
    and said how many more labels it needs (a schedule that fires on the 20th of 35 labels leaves the other 15
    below `min_new_labels`, and the class waited for good). Read from the store, so a restart keeps the count."""
    tried = store.last_retrain(group)
    last = max([labels_until(g) for g in store.gates(group)] + [tried["ts"] if tried else 0.0])
    new = store.labels_since(group, last)
    if r.every_s and now - last >= r.every_s and new:  # nothing new since the last gate: nothing to learn
        return True
    if not r.min_new_labels:
        return False
    promised = [int(p["labels_needed"]) for p in (tried or {}).get("pending_classes", {}).values()]
    return new >= min([r.min_new_labels, *(max(n, 1) for n in promised)])
