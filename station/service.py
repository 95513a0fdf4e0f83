"""The station as one object: store, TUF repository, base features, MQTT consumer, and the operations
the CLI and the web UI share (init, label, retrain and publish)."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from bouncer.runtime import schemas
from bouncer.runtime.backends import Backend
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.fit import (
    BASELINE_HEAD,
    FeatureSet,
    extract,
    head_input,
    load_split,
    parse_head,
)
from bouncer.station.config import StationConfig
from bouncer.station.retrain import BaseData, RetrainResult, retrain
from bouncer.station.store import Store
from bouncer.station.tufrepo import TufRepo

log = logging.getLogger("bouncer.station")


class Station:
    def __init__(self, cfg: StationConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.station.data_dir)
        self.group = cfg.station.group
        self.store = Store(self.root)
        self.repo = TufRepo(self.root)
        self.base = BaseData(self.root / "base")
        self.gates_dir = self.root / "gates"
        self.consumer = None
        self._retrain_lock = threading.Lock()
        self.last_retrain: dict[str, Any] | None = None

    # ---- set-up ---------------------------------------------------------------------------------

    def init(self, bundle_path: Path, backend: Backend, train_dir: Path, calib_dir: Path) -> dict[str, Any]:
        """Keys and TUF repository, base features of the gate's training and calibration folders (with the
        backbone, once), and the gate as the first published champion."""
        bundle = GateBundle.load(bundle_path)
        if bundle.backbone_hash != backend.card.model_hash:
            raise BouncerError(f"{bundle_path}: fitted on another backbone than {backend.path.name}")
        self.repo.init()
        specs = [*bundle.fusion.names, BASELINE_HEAD]
        sources = {backend.card.features} | {parse_head(s)[1] for s in specs}
        sets = []
        for folder in (train_dir, calib_dir):
            _, paths, labels = load_split(folder, bundle.classes)
            ex = extract(backend, bundle.preprocessing, paths, labels, sources)
            vectors = {s: head_input(s, ex.outputs[parse_head(s)[1]]) for s in specs}
            sets.append(FeatureSet(ex.labels, ex.outputs[backend.card.features], vectors, ex.stats))
        self.base.save(sets[0], sets[1], {"features": backend.card.features, "classes": bundle.classes})
        self.store.audit(bundle.version, "fitted", "bouncer fit", _fit_summary(bundle, train_dir=str(train_dir)))
        self.store.audit(bundle.version, "approved", "operator (bouncer station init)", {})
        self.publish(bundle, bundle_path, role_metrics={"origin": f"bouncer fit ({train_dir})"})
        return {"train": len(sets[0]), "calib": len(sets[1]), "root": str(self.repo.root_json)}

    # ---- gates ----------------------------------------------------------------------------------

    def champion(self) -> GateBundle:
        g = self.store.champion()
        if g is None:
            raise BouncerError(f"{self.root}: no published gate (run `bouncer station init`)")
        return GateBundle.load(Path(g["path"]))

    def publish(self, bundle: GateBundle, path: Path | None = None, role_metrics: dict | None = None) -> int:
        serial = self.store.next_serial()
        self.gates_dir.mkdir(parents=True, exist_ok=True)
        dest = self.gates_dir / f"{bundle.version}.bouncer"
        if path is not None:
            shutil.copyfile(path, dest)
        else:
            bundle.save(dest)
        custom = {"version": bundle.version, "serial": serial, "backbone_hash": bundle.backbone_hash,
                  "classes": bundle.classes}  # fmt: skip
        targets_version = self.repo.publish(dest, self.group, custom)
        self.store.audit(bundle.version, "published", "station", {"serial": serial, "group": self.group,
                                                                  "tuf_targets_version": targets_version})  # fmt: skip
        old = self.store.champion()
        self.write_card(bundle, self._load_version(old["path"]) if old else None)
        if old:
            self.store.set_gate_role(old["version"], "retired")
        self.store.add_gate(bundle.version, serial, "champion", dest, {**bundle.fit_metrics, **(role_metrics or {})})
        if self.consumer is not None:
            self.consumer.announce(
                self.group, schemas.GateAnnouncement(self.group, bundle.version, serial, bundle.backbone_hash)
            )
        log.info("published gate %s (serial %d) for group %s", bundle.version, serial, self.group)
        return serial

    def retrain(self, log_fn=None) -> RetrainResult:
        with self._retrain_lock:
            champion = self.champion()
            serial = self.store.next_serial()
            result = retrain(self.store, self.base, champion, serial, log=log_fn or (lambda m: log.info(m)))
            if result.challenger is not None:
                self.store.audit(result.challenger.version, "fitted", "station retrain",
                                 _fit_summary(result.challenger, **result.metrics))  # fmt: skip
                if result.publish:
                    self.store.audit(result.challenger.version, "approved", "rule: guarantee holds and not worse "
                                     "than the champion on held-out labels", {"reason": result.reason})  # fmt: skip
                else:
                    self.store.audit(
                        result.challenger.version, "rejected", "station retrain", {"reason": result.reason}
                    )
            if result.challenger is not None and not result.publish:
                path = self.gates_dir / f"{result.challenger.version}.bouncer"
                result.challenger.save(path)
                self.store.add_gate(result.challenger.version, serial, "rejected", path,
                                    {**result.challenger.fit_metrics, "rejected_because": result.reason})  # fmt: skip
                self.write_card(result.challenger, champion)
            if result.publish and result.challenger is not None:
                self.publish(result.challenger)
            self.last_retrain = {"published": result.publish, "reason": result.reason, **result.metrics}
            return result

    def _load_version(self, path: str) -> GateBundle | None:
        try:
            return GateBundle.load(Path(path))
        except BouncerError:
            return None

    def card_path(self, version: str) -> Path:
        return self.gates_dir / f"{version}.md"

    def write_card(self, bundle: GateBundle, previous: GateBundle | None) -> Path:
        from bouncer.station.gatecard import gate_card

        self.gates_dir.mkdir(parents=True, exist_ok=True)
        path = self.card_path(bundle.version)
        path.write_text(gate_card(bundle, previous, self.store.audit_log(bundle.version)))
        return path

    # ---- labels ---------------------------------------------------------------------------------

    def label(self, frame_id: str, value: Any, user: str) -> dict[str, Any]:
        frame = self.store.frame(frame_id)
        if frame is None:
            raise KeyError(frame_id)
        classes = self.champion().classes
        kind, name = schemas.parse_label(value, classes, frame.predicted)
        self.store.set_label(frame_id, kind, name, user)
        return {"id": frame_id, "kind": kind, "label": name}

    # ---- running --------------------------------------------------------------------------------

    def start_mqtt(self) -> None:
        if not self.cfg.mqtt.broker:
            return
        from bouncer.station.consumer import Consumer

        self.consumer = Consumer(self.cfg.mqtt, self.store, self.cfg.station.share_group, self.cfg.station.worker)
        self.consumer.start()
        g = self.store.champion()
        if g is not None:  # re-announce the current gate (retained) in case the broker lost it
            self.consumer.announce(
                self.group,
                schemas.GateAnnouncement(self.group, g["version"], int(g["serial"]), self.champion().backbone_hash),
            )

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
        self.store.close()


def _fit_summary(bundle: GateBundle, **extra: Any) -> dict[str, Any]:
    """What a `fitted` audit record keeps: data used, metrics, the guarantee achieved."""
    m = bundle.fit_metrics
    keep = ("train_images", "calibration_images", "class_counts", "calibration_accuracy", "calibration_coverage",
            "ece_after_scaling")  # fmt: skip
    return {**{k: m.get(k) for k in keep}, "classes": bundle.classes, "guarantee": bundle.acceptance.__dict__, **extra}
