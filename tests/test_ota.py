"""Over-the-air gate updates against a real TUF repository served over real HTTP: every refusal case, the
canary and trial rollbacks, commit, and what a device boots after a power cut."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

from bouncer.devices.loop import Device
from bouncer.devices.ota import COMMIT, Canary, Candidate, GateSlots, OtaUpdater, Trial
from bouncer.runtime import backends
from bouncer.runtime.config import OtaSection, load_config
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.images import read_bgr
from bouncer.runtime.outbox import Outbox
from bouncer.sim import simulator
from bouncer.station.tufrepo import TufRepo


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def repo(tmp_path):
    """A station-side TUF repository and an HTTP server over its served folder."""
    r = TufRepo(tmp_path / "station")
    r.init()
    handler = functools.partial(Quiet, directory=str(r.metadata_dir.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    r.url = f"http://127.0.0.1:{server.server_port}"
    yield r
    server.shutdown()


@pytest.fixture(scope="module")
def guard(sim_gate, built_models) -> Guard:
    return Guard(GateBundle.load(sim_gate), backends.load(built_models["onnx_int8"]))


def variant(sim_gate: Path, out: Path, version: str, **changes: object) -> GateBundle:
    b = dataclasses.replace(GateBundle.load(sim_gate), version=version, **changes)
    b.save(out)
    return b


def publish(repo: TufRepo, bundle: GateBundle, path: Path, serial: int, **custom: object) -> None:
    info = {"version": bundle.version, "serial": serial, "backbone_hash": bundle.backbone_hash, **custom}
    repo.publish(path, "default", info)


class Harness:
    def __init__(self, repo: TufRepo, data: Path, guard: Guard, serial: int = 0, **ota: object) -> None:
        cfg = OtaSection(url=f"{repo.url}", root=str(repo.root_json), **ota)
        self.events: list[dict] = []
        self.offers: list = []
        self.updater = OtaUpdater(
            cfg, data, lambda: (guard, serial), self.offers.append,
            lambda kind, **f: self.events.append({"event": kind, **f}), lambda: None,
        )  # fmt: skip
        self.updater.prepare()

    def reasons(self, kind: str) -> str:
        return " | ".join(e.get("reason", "") for e in self.events if e["event"] == kind)


def test_a_verified_gate_is_warmed_and_offered(repo, guard, sim_gate, tmp_path):
    b = variant(sim_gate, tmp_path / "v2.gate", "v2")
    publish(repo, b, tmp_path / "v2.gate", 1)
    h = Harness(repo, tmp_path / "dev", guard)
    cand = h.updater.check()
    assert cand is not None and cand.serial == 1 and cand.version == "v2"
    assert cand.guard.bundle.version == "v2" and h.offers == [cand] and not h.events


def _altered(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize(
    "tamper,error",
    [
        (_altered, "LengthOrHashMismatch"),  # same length, bytes changed
        (lambda d: d[: len(d) // 2], "LengthOrHashMismatch"),  # truncated
        (lambda d: d + b"\0" * 4096, "DownloadLengthMismatchError"),  # 4 KB appended
    ],
    ids=["altered", "truncated", "appended"],
)
def test_a_tampered_bundle_is_refused_with_its_version(repo, guard, sim_gate, tmp_path, tamper, error):
    b = variant(sim_gate, tmp_path / "v2.gate", "v2")
    publish(repo, b, tmp_path / "v2.gate", 1)
    (served,) = (repo.targets_dir / "gates").glob("*.default.bouncer")
    served.write_bytes(tamper(served.read_bytes()))
    h = Harness(repo, tmp_path / "dev", guard)
    assert h.updater.check() is None and not h.offers
    assert error in h.reasons("gate_update_rejected")
    (event,) = [e for e in h.events if e["event"] == "gate_update_rejected"]
    assert event["version"] == "v2" and event["serial"] == 1  # the station files the refusal under this gate


def test_metadata_signed_by_the_wrong_key_is_refused(repo, guard, sim_gate, tmp_path):
    from securesystemslib.signer import CryptoSigner

    b = variant(sim_gate, tmp_path / "v2.gate", "v2")
    publish(repo, b, tmp_path / "v2.gate", 1)
    targets = repo._load("targets")
    targets.signed.version += 1
    targets.signed.targets["gates/default.bouncer"].unrecognized_fields["custom"]["serial"] = 9
    repo._sign_and_write(targets, "targets", CryptoSigner.generate_ed25519())  # an attacker's key
    repo.snapshot_and_timestamp(targets.signed.version)
    h = Harness(repo, tmp_path / "dev", guard)
    assert h.updater.check() is None and not h.offers
    assert "UnsignedMetadataError" in h.reasons("gate_update_rejected")


def test_expired_metadata_is_refused(repo, guard, sim_gate, tmp_path):
    b = variant(sim_gate, tmp_path / "v2.gate", "v2")
    repo.publish(tmp_path / "v2.gate", "default", {"version": "v2", "serial": 1, "backbone_hash": b.backbone_hash},
                 expires_days=-1)  # fmt: skip
    h = Harness(repo, tmp_path / "dev", guard)
    assert h.updater.check() is None and not h.offers
    assert "ExpiredMetadataError" in h.reasons("gate_update_rejected")


def test_replayed_older_metadata_is_refused(repo, guard, sim_gate, tmp_path):
    b1 = variant(sim_gate, tmp_path / "v1.gate", "v1")
    publish(repo, b1, tmp_path / "v1.gate", 1)
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    b2 = variant(sim_gate, tmp_path / "v2.gate", "v2")
    publish(repo, b2, tmp_path / "v2.gate", 2)
    h = Harness(repo, tmp_path / "dev", guard)
    assert h.updater.check().serial == 2  # the device now trusts the newer metadata
    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)  # a mirror replays the old state
    assert h.updater.check() is None
    assert "BadVersionNumberError" in h.reasons("gate_update_rejected")


def test_an_older_gate_is_refused(repo, guard, sim_gate, tmp_path):
    b = variant(sim_gate, tmp_path / "old.gate", "old")
    publish(repo, b, tmp_path / "old.gate", 3)
    h = Harness(repo, tmp_path / "dev", guard, serial=5)
    assert h.updater.check() is None and not h.offers
    assert "older gate old (serial 3 < active 5)" in h.reasons("gate_update_rejected")


def test_a_gate_for_another_backbone_is_refused(repo, guard, sim_gate, tmp_path):
    b = variant(sim_gate, tmp_path / "other.gate", "other")
    publish(repo, b, tmp_path / "other.gate", 1, backbone_hash="0" * 64)
    h = Harness(repo, tmp_path / "dev", guard)
    assert h.updater.check() is None
    assert "is for backbone 000000000000" in h.reasons("gate_update_rejected")
    # a bundle that lies in its metadata is caught when it loads
    b = variant(sim_gate, tmp_path / "liar.gate", "liar", backbone_hash="f" * 64)
    publish(repo, b, tmp_path / "liar.gate", 2, backbone_hash=guard.backend.card.model_hash)
    assert h.updater.check() is None and not h.offers
    assert "was fitted on backbone" in h.reasons("gate_update_rejected")


def test_a_bad_gate_fails_the_canary_and_is_never_swapped_in(repo, guard, sim_gate, tmp_path):
    h = Harness(repo, tmp_path / "dev", guard, canary_size=8, canary_every=1)
    frames = simulator.write_dataset(tmp_path / "canary", per_class=2, seed=5)
    for p in sorted(frames.rglob("*.png")):
        h.updater.canary.offer(read_bgr(p), "accept")
    assert len(h.updater.canary.frames()) == 8
    b = variant(sim_gate, tmp_path / "bad.gate", "bad", ood_threshold=-1e9)  # flags every frame
    publish(repo, b, tmp_path / "bad.gate", 1)
    assert h.updater.check() is None and not h.offers
    (rb,) = [e for e in h.events if e["event"] == "gate_rollback"]
    assert rb["stage"] == "canary" and "flags 100% of 8 accepted frames" in rb["reason"]
    assert 1 in GateSlots(tmp_path / "dev" / "gates").state["refused"]
    assert h.updater.check() is None and len(h.events) == 1, "a refused gate is not tried again"


def test_canary_keeps_a_ring_on_disk(tmp_path, sim_folder):
    c = Canary(tmp_path / "c", size=3, every=2)
    imgs = [read_bgr(p) for p in sorted(sim_folder.rglob("*.png"))[:10]]
    for img in imgs:
        c.offer(img, "accept")
        c.offer(img, "review")  # never kept
    assert len(list((tmp_path / "c").glob("*.jpg"))) == 3 and len(c.frames()) == 3


# ---- the device: swap, trial, commit or roll back, boot ----------------------------------------------


def run_device(repo: TufRepo, sim_gate: Path, tmp_path: Path, frames: Path, data: Path, **ota: object) -> Device:
    cfg = load_config(
        None,
        {
            "device.id": "cam-ota", "device.data_dir": str(data), "source.uri": str(frames),
            "source.max_fps": 60.0, "gate.bundle": str(sim_gate), "ota.url": repo.url,
            "ota.root": str(repo.root_json), "ota.canary_size": 0, **{f"ota.{k}": v for k, v in ota.items()},
        },
    )  # fmt: skip
    device = Device(cfg)
    device.run(once=True)
    return device


def device_events(data: Path) -> list[dict]:
    box = Outbox(data / "outbox.sqlite")
    out = [json.loads(p.payload) for p in box.pending(limit=10_000) if p.kind == "event"]
    box.close()
    return out


@pytest.fixture(scope="module")
def line_frames(tmp_path_factory) -> Path:
    return simulator.write_dataset(tmp_path_factory.mktemp("line"), per_class=20, seed=9)


def test_a_bad_gate_is_rolled_back_after_its_trial(repo, sim_gate, tmp_path, line_frames, built_models):
    b = variant(sim_gate, tmp_path / "bad.gate", "bad", ood_threshold=-1e9)
    publish(repo, b, tmp_path / "bad.gate", 1)
    device = run_device(repo, sim_gate, tmp_path, line_frames, tmp_path / "dev", trial_frames=10)
    events = device_events(tmp_path / "dev")
    kinds = [e["event"] for e in events]
    assert kinds.index("gate_swap") < kinds.index("gate_rollback")
    rb = next(e for e in events if e["event"] == "gate_rollback")
    assert rb["stage"] == "trial" and "flagged 100% of 10 live frames" in rb["reason"]
    assert rb["restored"] == GateBundle.load(sim_gate).version
    assert device.guard.bundle.version != "bad" and device.serial == 0
    d = device.summary.decisions
    assert d["accept"] >= device.summary.frames - 15, d  # only the trial frames went to review
    slots = GateSlots(tmp_path / "dev" / "gates")
    assert not (slots.root / "active").exists() and 1 in slots.state["refused"]


def test_a_good_gate_is_committed_and_booted_after_a_restart(repo, sim_gate, tmp_path, line_frames, built_models):
    b = variant(sim_gate, tmp_path / "v2.gate", "v2")
    publish(repo, b, tmp_path / "v2.gate", 1)
    device = run_device(repo, sim_gate, tmp_path, line_frames, tmp_path / "dev", trial_frames=10)
    kinds = [e["event"] for e in device_events(tmp_path / "dev")]
    assert "gate_swap" in kinds and "gate_commit" in kinds and "gate_rollback" not in kinds
    assert device.guard.bundle.version == "v2" and device.serial == 1
    active = (tmp_path / "dev" / "gates" / "active").resolve()
    assert active.name == "1-v2.bouncer"
    bundle, serial = GateSlots(tmp_path / "dev" / "gates").boot(sim_gate)
    assert (bundle.version, serial) == ("v2", 1)


def test_a_power_cut_mid_update_boots_the_old_gate(repo, sim_gate, tmp_path, line_frames, built_models):
    b = variant(sim_gate, tmp_path / "v2.gate", "v2")
    publish(repo, b, tmp_path / "v2.gate", 1)
    # the trial never ends within this run: the process stops as if the power went
    device = run_device(repo, sim_gate, tmp_path, line_frames, tmp_path / "dev", trial_frames=100_000,
                        first_check_s=120.0)  # fmt: skip
    assert device.guard.bundle.version == "v2"  # it was serving the candidate on trial
    # from the very first frame: the device checks for a new gate before it starts (the station answered)
    assert device.trial.frames == device.summary.frames == 80
    bundle, serial = GateSlots(tmp_path / "dev" / "gates").boot(sim_gate)
    assert serial == 0 and bundle.version == GateBundle.load(sim_gate).version

    # a committed gate whose file is damaged later: the device falls back to the previous slot
    slots = GateSlots(tmp_path / "dev2" / "gates")
    slots.commit(tmp_path / "v2.gate", 1, "v2")
    v3 = variant(sim_gate, tmp_path / "v3.gate", "v3")
    slots.commit(tmp_path / "v3.gate", 2, v3.version)
    (slots.root / "active").resolve().write_bytes(b"not a zip")
    bundle, serial = slots.boot(sim_gate)
    assert (bundle.version, serial) == ("v2", 1)


def test_quiet_stations_keep_their_metadata_fresh(repo, guard, sim_gate, tmp_path):
    from tuf.api.metadata import Metadata

    b = variant(sim_gate, tmp_path / "v2.gate", "v2")
    publish(repo, b, tmp_path / "v2.gate", 1)
    assert repo.refresh(min_days=3) == []  # nothing expires within three days of a publish
    before = Metadata.from_file(str(repo.metadata_dir / "timestamp.json")).signed
    assert repo.refresh(min_days=8) == ["timestamp"]  # the timestamp (7 days) is re-signed first
    after = Metadata.from_file(str(repo.metadata_dir / "timestamp.json")).signed
    assert after.version == before.version + 1 and after.expires >= before.expires
    assert repo.refresh(min_days=31) == ["snapshot", "timestamp"]
    assert repo.refresh(min_days=91) == ["targets", "snapshot", "timestamp"]
    h = Harness(repo, tmp_path / "dev", guard)
    cand = h.updater.check()  # a device verifies the whole re-signed chain and still finds the gate
    assert cand is not None and cand.version == "v2" and not h.events


def test_the_trial_compares_with_the_old_gate_on_the_same_frames(repo, guard, tmp_path):
    """A camera that now sees mostly a new part type: the old gate flagged all of its trial frames, so a gate
    retrained for that type, which still flags 80% of them, is better and commits; the same 80% where the old
    gate flagged none of them rolls back."""
    h = Harness(repo, tmp_path / "dev", guard, trial_frames=10)
    cand = Candidate(guard, 1, "v2", tmp_path / "v2.gate", allowance_rate=0.05, latency_limit_s=10.0)
    assert h.updater.judge(Trial(cand, guard, 0, frames=10, flagged=8, old_flagged=10, seconds=0.1)) == COMMIT
    verdict = h.updater.judge(Trial(cand, guard, 0, frames=10, flagged=8, old_flagged=0, seconds=0.1))
    assert verdict is not None and not verdict.commit
    assert verdict.reason.startswith("trial: flagged 80% of 10 live frames")
    assert h.updater.judge(Trial(cand, guard, 0, frames=9, flagged=0, old_flagged=0, seconds=0.1)) is None  # runs on


def test_the_gate_a_device_runs_is_not_installed_again(repo, guard, sim_gate, tmp_path):
    """The station publishes the very gate the device was configured with (its first champion): no swap."""
    publish(repo, guard.bundle, sim_gate, 1)
    h = Harness(repo, tmp_path / "dev", guard)
    assert h.updater.check() is None and not h.offers and not h.events
