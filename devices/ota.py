"""Over-the-air gate updates on the device: TUF-verified download, warm-up and canary check beside the
running gate, swap between frames, live trial, then commit or roll back.

On disk (data_dir/gates/):
    versions/<serial>-<version>.bouncer   every gate this device has committed
    active, previous                     symlinks, replaced atomically (temp link + os.replace + fsync)
    state.json                           serials refused or rolled back (never tried again)
    tuf/                                 the TUF client's trusted metadata (root.json provisioned once)
A power cut before `commit` leaves `active` on the old gate: the device boots what last passed a trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.devices.outputs import Output
from bouncer.runtime.config import OtaSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.decision import Verdict
from bouncer.runtime.gates.guard import Guard

log = logging.getLogger("bouncer.ota")
TARGET = "gates/{group}.bouncer"  # the station's naming (station/tufrepo.py)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_symlink(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


class GateSlots:
    """The active and previous gates on disk, and what this device has refused."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.state: dict[str, Any] = {"serial": 0, "refused": []}
        if self.state_path.is_file():
            try:
                self.state |= json.loads(self.state_path.read_text())
            except ValueError:
                log.warning("%s unreadable; starting with an empty update state", self.state_path)

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_path)

    def boot(self, configured: Path) -> tuple[GateBundle, int]:
        """The committed active gate, else the previous one, else the configured bundle (serial 0)."""
        for name in ("active", "previous"):
            link = self.root / name
            if link.is_symlink() or link.exists():
                try:
                    bundle = GateBundle.load(link.resolve())
                    return bundle, int(link.resolve().name.split("-", 1)[0])
                except (BouncerError, ValueError) as exc:
                    log.warning("gate slot %s unusable (%s); trying the next", name, exc)
        return GateBundle.load(configured), 0

    def commit(self, downloaded: Path, serial: int, version: str) -> Path:
        dest = self.versions / f"{serial}-{version}.bouncer"
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(downloaded, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        active = self.root / "active"
        if active.exists():
            _atomic_symlink(active.resolve(), self.root / "previous")
        _atomic_symlink(dest, active)
        self.state["serial"] = serial
        self.save_state()
        return dest

    def refuse(self, serial: int) -> None:
        if serial not in self.state["refused"]:
            self.state["refused"].append(serial)
            self.save_state()


class Canary:
    """A few accepted frames kept on the device (JPEG files) to try a new gate on before it serves."""

    def __init__(self, root: Path, size: int, every: int) -> None:
        self.root, self.size, self.every = Path(root), size, every
        self.root.mkdir(parents=True, exist_ok=True)
        self._seen = 0
        self._next = len(list(self.root.glob("*.jpg"))) % max(size, 1)

    def offer(self, frame: np.ndarray, decision: str) -> None:
        if decision != Verdict.ACCEPT or not self.size:
            return
        self._seen += 1
        if self._seen % self.every:
            return
        path = self.root / f"{self._next:03d}.jpg"
        tmp = path.with_name(f".{path.name}.tmp.jpg")
        if cv2.imwrite(str(tmp), frame, [cv2.IMWRITE_JPEG_QUALITY, 90]):
            os.replace(tmp, path)
        self._next = (self._next + 1) % self.size

    def frames(self) -> list[np.ndarray]:
        out = []
        for p in sorted(self.root.glob("*.jpg"))[: self.size]:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is not None:
                out.append(img)
        return out


def flag_allowance(expected: float, n: int) -> float:
    """The highest flagged (review + reject) fraction a healthy gate shows on n frames whose expected rate is
    `expected`: three binomial standard deviations plus 10 points of slack for the line's own variation."""
    p = min(max(expected, 0.0), 1.0)
    return p + 3 * math.sqrt(p * (1 - p) / max(n, 1)) + 0.1


@dataclass
class Candidate:
    guard: Guard
    serial: int
    version: str
    path: Path
    allowance_rate: float
    latency_limit_s: float


@dataclass(frozen=True)
class TrialVerdict:
    commit: bool
    reason: str = ""  # why it was rolled back


COMMIT = TrialVerdict(True)


@dataclass
class Trial:
    candidate: Candidate
    old: Guard
    old_serial: int
    frames: int = 0
    flagged: int = 0
    old_flagged: int = 0  # what the old gate flags of the same frames
    seconds: float = 0.0


def expected_flag_rate(bundle: GateBundle) -> float:
    return 1.0 - float(bundle.fit.calibration_coverage or 0.0)


class OtaUpdater(Output):
    """Polls the station's TUF repository (and wakes on the retained MQTT announcement); hands a verified,
    warmed, canary-checked gate to the frame loop, which swaps it in between two frames."""

    name = "ota"

    def __init__(
        self,
        cfg: OtaSection,
        data_dir: Path,
        current: Callable[[], tuple[Guard, int]],
        offer: Callable[[Candidate], None],
        emit: Callable[..., None],
        recent_flag_rate: Callable[[], float | None],
        group: str = "default",
    ) -> None:
        self.cfg = cfg
        self.group = group
        self.slots = GateSlots(Path(data_dir) / "gates")
        self.canary = Canary(Path(data_dir) / "canary", cfg.canary_size, cfg.canary_every)
        self.current, self.offer, self.emit, self.recent_flag_rate = current, offer, emit, recent_flag_rate
        self.tuf_dir = self.slots.root / "tuf"
        self.download_dir = self.slots.root / "downloads"
        self._wake = threading.Event()
        self._first_check = threading.Event()
        self._stop = threading.Event()
        self._busy = threading.Event()  # a candidate is out for its swap and trial
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="bouncer-ota", daemon=True)
        self.checks = 0

    # ---- thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        """The first check runs at once, and the device's first frame waits for it (at most ota.first_check_s): a
        gate the station published since this device last ran decides that frame already, while a station
        that does not answer delays the camera by seconds, not by a network timeout; then the thread polls."""
        self.prepare()
        self._thread.start()
        self._first_check.wait(self.cfg.first_check_s)

    def prepare(self) -> None:
        """Provision the TUF client's trust (the root.json from `bouncer station init`) on first start."""
        self.tuf_dir.mkdir(parents=True, exist_ok=True)
        self.download_dir.mkdir(parents=True, exist_ok=True)
        if not (self.tuf_dir / "root.json").is_file():
            try:
                shutil.copyfile(self.cfg.root, self.tuf_dir / "root.json")
            except OSError as exc:
                raise BouncerError(f"ota.root: cannot read the trusted root {self.cfg.root!r} ({exc})") from None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def poke(self) -> None:
        """The station announced a gate: check now instead of at the next poll."""
        self._wake.set()

    def _check_safely(self) -> None:
        if self._busy.is_set():
            return
        try:
            self.check()
        except Exception as exc:  # the updater must never take the camera down
            log.exception("gate update check failed")
            self._report("gate_update_failed", f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        self._check_safely()
        self._first_check.set()
        while True:
            self._wake.wait(self.cfg.poll_s)  # a poll period, or an announcement (poke) or stop
            self._wake.clear()
            if self._stop.is_set():
                return
            self._check_safely()

    def _report(self, kind: str, reason: str, **fields: Any) -> None:
        key = f"{kind}|{fields.get('serial')}|{reason}"
        if key in self._reported:
            return  # once per distinct problem, not on every poll
        self._reported.add(key)
        self.emit(kind, reason=reason[:500], **fields)

    # ---- one check ------------------------------------------------------------------------------

    def check(self) -> Candidate | None:
        from tuf.api import exceptions as tuf_errors
        from tuf.ngclient import Updater

        self.checks += 1
        url = self.cfg.url.rstrip("/")
        try:
            updater = Updater(
                str(self.tuf_dir), f"{url}/metadata/", str(self.download_dir), f"{url}/targets/", bootstrap=None
            )
            updater.refresh()
            info = updater.get_targetinfo(TARGET.format(group=self.group))
        except tuf_errors.DownloadError as exc:
            log.info("gate repository unreachable: %s", exc)
            return None
        except tuf_errors.RepositoryError as exc:
            self._report("gate_update_rejected", f"metadata refused: {type(exc).__name__}: {exc}")
            return None
        if info is None:
            self._report("gate_update_rejected", f"the station publishes no gate for group {self.group!r}")
            return None
        custom = info.custom or {}
        try:
            serial, version, backbone = int(custom["serial"]), str(custom["version"]), str(custom["backbone_hash"])
        except (KeyError, TypeError, ValueError):
            self._report("gate_update_rejected", "target metadata lacks serial, version or backbone_hash")
            return None
        guard, active_serial = self.current()
        if serial == active_serial or serial in self.slots.state["refused"] or version == guard.bundle.version:
            return None  # already running it (a device booted from the gate the station published first)
        if serial < active_serial:
            self._report(
                "gate_update_rejected", f"older gate {version} (serial {serial} < active {active_serial})",
                serial=serial, version=version,
            )  # fmt: skip
            return None
        if backbone != guard.backend.card.model_hash:
            self.slots.refuse(serial)
            self._report(
                "gate_update_rejected", f"gate {version} is for backbone {backbone[:12]}, this device runs "
                f"{guard.backend.card.model_hash[:12]}", serial=serial, version=version,
            )  # fmt: skip
            return None
        try:
            path = Path(updater.download_target(info, str(self.download_dir / f"{serial}-{version}.bouncer")))
        except (tuf_errors.DownloadLengthMismatchError, tuf_errors.RepositoryError) as exc:
            # a bundle longer (or shorter, or other) than its signed metadata says: tampered, never installed
            self._report(
                "gate_update_rejected", f"bundle refused: {type(exc).__name__}: {exc}", serial=serial, version=version
            )
            return None
        except tuf_errors.DownloadError as exc:
            log.info("gate download failed: %s", exc)
            return None
        try:
            bundle = GateBundle.load(path)
            new = Guard(bundle, guard.backend)
        except BouncerError as exc:
            self.slots.refuse(serial)
            self._report("gate_update_rejected", str(exc), serial=serial, version=version)
            return None
        cand = self.warm_and_check(new, guard, serial, version, path)
        if cand is not None:
            self._busy.set()
            self.offer(cand)
        return cand

    def warm_and_check(self, new: Guard, old_guard: Guard, serial: int, version: str, path: Path) -> Candidate | None:
        """Score the canary frames with the new gate (and a private copy of the old one, for latency)."""
        frames = self.canary.frames()
        old = Guard(old_guard.bundle, old_guard.backend)  # its own buffers: the loop keeps using its guard
        times_new, times_old, flagged = [], [], 0
        for f in frames[:1] or []:
            new.score_frame(f)  # warm-up
        for f in frames:
            t0 = time.perf_counter()
            d, _, _ = new.score_frame(f)
            times_new.append(time.perf_counter() - t0)
            flagged += d.decision != Verdict.ACCEPT
            t0 = time.perf_counter()
            old.score_frame(f)
            times_old.append(time.perf_counter() - t0)
        expected = expected_flag_rate(new.bundle)
        recent = self.recent_flag_rate()
        base_rate = max(expected, recent) if recent is not None else expected
        lat_old = float(np.median(times_old)) if times_old else 0.0
        latency_limit = 2 * lat_old + 0.005 if times_old else math.inf
        if frames:
            rate = flagged / len(frames)
            allow = flag_allowance(expected, len(frames))
            lat_new = float(np.median(times_new))
            reason = None
            if rate > allow:
                reason = f"canary: flags {rate:.0%} of {len(frames)} accepted frames (expected at most {allow:.0%})"
            elif lat_new > latency_limit:
                reason = f"canary: {lat_new * 1e3:.1f} ms per frame vs {lat_old * 1e3:.1f} ms for the active gate"
            if reason:
                self.slots.refuse(serial)
                self.emit("gate_rollback", stage="canary", reason=reason, serial=serial, version=version)
                return None
        return Candidate(new, serial, version, path, base_rate, latency_limit)

    # ---- trial (called by the frame loop) --------------------------------------------------------

    def judge(self, trial: Trial) -> TrialVerdict | None:
        """None while the trial runs; else commit, or roll back with the reason."""
        if trial.frames < self.cfg.trial_frames:
            return None
        if trial.frames:
            rate = trial.flagged / trial.frames
            # a gate retrained for what this camera sees now is judged against what the old gate did with the
            # same frames, not only against the calibration set's rate
            base = max(trial.candidate.allowance_rate, trial.old_flagged / trial.frames)
            allow = flag_allowance(base, trial.frames)
            if rate > allow:
                return TrialVerdict(
                    False, f"trial: flagged {rate:.0%} of {trial.frames} live frames (allowed {allow:.0%})"
                )
            per_frame = trial.seconds / trial.frames
            limit = trial.candidate.latency_limit_s
            if per_frame > limit:
                return TrialVerdict(False, f"trial: {per_frame * 1e3:.1f} ms per frame (limit {limit * 1e3:.1f})")
        return COMMIT

    def finish(self, trial: Trial, verdict: TrialVerdict) -> None:
        c = trial.candidate
        if verdict.commit:
            self.slots.commit(c.path, c.serial, c.version)
            self.emit("gate_commit", serial=c.serial, version=c.version, trial_frames=trial.frames)
        else:
            self.slots.refuse(c.serial)
            self.emit("gate_rollback", stage="trial", reason=verdict.reason, serial=c.serial, version=c.version,
                      restored=trial.old.bundle.version)  # fmt: skip
        c.path.unlink(missing_ok=True)
        self._busy.clear()


class FlagRate:
    """The flagged fraction of the last n decisions (what a new gate's trial is compared with)."""

    def __init__(self, n: int = 500) -> None:
        self._d: deque[bool] = deque(maxlen=n)

    def add(self, flagged: bool) -> None:
        self._d.append(flagged)

    def rate(self) -> float | None:
        return sum(self._d) / len(self._d) if len(self._d) >= 20 else None
