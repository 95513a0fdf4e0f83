"""The station's TUF repository (python-tuf metadata API): signed gate bundles for the devices.

Layout under the station's data folder:
    keys/<role>.pem          ed25519 private keys, mode 0600, never served
    tuf/metadata/            1.root.json, N.targets.json, N.snapshot.json, timestamp.json (served)
    tuf/targets/gates/       <sha256>.<group>.bouncer (served; consistent snapshots)

One target per group, `gates/<group>.bouncer`, whose custom field carries the gate version, a serial
that only grows, and the backbone hash; a device refuses a serial it has already passed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    SPECIFICATION_VERSION,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from bouncer.runtime.errors import BouncerError
from bouncer.station.objects import Objects

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 7}


def target_name(group: str) -> str:
    return f"gates/{group}.bouncer"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class TufRepo:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.keys_dir = self.root / "keys"
        self.metadata_dir = self.root / "tuf" / "metadata"
        self.targets_dir = self.root / "tuf" / "targets"
        self._mirrored: dict[str, str] | None = None  # object key -> sha256 of what mirror() last wrote there

    @property
    def exists(self) -> bool:
        return (self.metadata_dir / "timestamp.json").is_file()

    @property
    def root_json(self) -> Path:
        """The trusted root a device is provisioned with."""
        return self.metadata_dir / "1.root.json"

    # ---- keys ------------------------------------------------------------------------------------

    def signer(self, role: str) -> CryptoSigner:
        path = self.keys_dir / f"{role}.pem"
        try:
            private = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise BouncerError(f"{path}: unreadable signing key ({exc})") from None
        return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))

    # ---- writing ---------------------------------------------------------------------------------

    def _write(self, md: Metadata, name: str) -> None:
        path = self.metadata_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
        os.replace(tmp, path)

    def _sign_and_write(self, md: Metadata, role: str, signer: CryptoSigner | None = None) -> None:
        md.signatures.clear()
        md.sign(signer or self.signer(role), append=True)
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        self._write(md, name)

    def _load(self, role: str) -> Metadata:
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json")]
        if not versions:
            raise BouncerError(f"{self.metadata_dir}: no {role} metadata (run `bouncer station init`)")
        return Metadata.from_file(str(self.metadata_dir / f"{max(versions)}.{role}.json"))

    def init(self) -> None:
        """New keys and version-1 metadata of every role; refuses to overwrite an existing repository."""
        if self.exists:
            raise BouncerError(f"{self.metadata_dir}: a TUF repository already exists (keys kept)")
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        (self.targets_dir / "gates").mkdir(parents=True, exist_ok=True)
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        signers = {}
        for role in ROLES:
            s = CryptoSigner.generate_ed25519()
            path = self.keys_dir / f"{role}.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(s.private_bytes)
            signers[role] = s
        now = _now()
        root = Metadata(Root(expires=now + timedelta(days=EXPIRY_DAYS["root"])))
        for role in ROLES:
            root.signed.add_key(signers[role].public_key, role)
        targets = Metadata(Targets(expires=now + timedelta(days=EXPIRY_DAYS["targets"])))
        snapshot = Metadata(Snapshot(expires=now + timedelta(days=EXPIRY_DAYS["snapshot"])))
        timestamp = Metadata(Timestamp(expires=now + timedelta(days=EXPIRY_DAYS["timestamp"])))
        assert root.signed.spec_version.split(".")[0] == SPECIFICATION_VERSION[0]
        self._sign_and_write(root, "root", signers["root"])
        self._sign_and_write(targets, "targets", signers["targets"])
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        self._sign_and_write(snapshot, "snapshot", signers["snapshot"])
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._sign_and_write(timestamp, "timestamp", signers["timestamp"])

    def publish(self, bundle: Path, group: str, custom: dict[str, Any], expires_days: float | None = None) -> int:
        """Add (or replace) the group's gate as a target, then new targets, snapshot and timestamp.

        Returns the new targets version. `expires_days` overrides the targets expiry (tests use a past one).
        """
        name = target_name(group)
        data = Path(bundle).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        dest = self.targets_dir / "gates" / f"{digest}.{group}.bouncer"
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(bundle, tmp)
        os.replace(tmp, dest)
        now = _now()
        targets = self._load("targets")
        info = TargetFile.from_file(name, str(dest), ["sha256"])
        info.unrecognized_fields["custom"] = custom
        targets.signed.targets[name] = info
        targets.signed.version += 1
        days = EXPIRY_DAYS["targets"] if expires_days is None else expires_days
        targets.signed.expires = now + timedelta(days=days)
        self._sign_and_write(targets, "targets")
        self.snapshot_and_timestamp(targets.signed.version)
        return targets.signed.version

    def snapshot_and_timestamp(self, targets_version: int) -> None:
        now = _now()
        snapshot = self._load("snapshot")
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets_version)
        snapshot.signed.version += 1
        snapshot.signed.expires = now + timedelta(days=EXPIRY_DAYS["snapshot"])
        self._sign_and_write(snapshot, "snapshot")
        timestamp = self._load("timestamp")
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        timestamp.signed.version += 1
        timestamp.signed.expires = now + timedelta(days=EXPIRY_DAYS["timestamp"])
        self._sign_and_write(timestamp, "timestamp")

    def refresh(self, min_days: float = 3.0) -> list[str]:
        """Re-sign what expires within `min_days` (timestamp every few days, snapshot and targets less often):
        without it a quiet station's metadata would expire and every device would refuse it. Returns the
        roles re-signed. (Root expires after a year; rotating it is an operator's job.)"""
        if not self.exists:
            return []
        now = _now()
        soon = now + timedelta(days=min_days)
        targets = self._load("targets")
        if targets.signed.expires <= soon:
            targets.signed.version += 1
            targets.signed.expires = now + timedelta(days=EXPIRY_DAYS["targets"])
            self._sign_and_write(targets, "targets")
            self.snapshot_and_timestamp(targets.signed.version)
            return ["targets", "snapshot", "timestamp"]
        if self._load("snapshot").signed.expires <= soon:
            self.snapshot_and_timestamp(targets.signed.version)
            return ["snapshot", "timestamp"]
        timestamp = self._load("timestamp")
        if timestamp.signed.expires <= soon:
            timestamp.signed.version += 1
            timestamp.signed.expires = now + timedelta(days=EXPIRY_DAYS["timestamp"])
            self._sign_and_write(timestamp, "timestamp")
            return ["timestamp"]
        return []

    def mirror(self, objects: Objects) -> int:
        """Copy the repository under `tuf/` to an object store, so that any web worker serves it from there (its
        signatures, not its server, make it trustworthy). Targets first, then the versioned metadata, then
        timestamp.json, so a client never finds metadata naming a file not yet there. Versioned files never
        change and go once; timestamp.json whenever it changed. Returns the files written."""
        if self._mirrored is None:  # what an earlier run of this station already copied
            self._mirrored = {key: "" for key, _ in objects.list("tuf/")}
        tuf = self.metadata_dir.parent
        targets = sorted(p for p in self.targets_dir.rglob("*") if p.is_file() and p.suffix != ".tmp")
        versioned = sorted(self.metadata_dir.glob("[0-9]*.json"), key=lambda p: (int(p.name.split(".")[0]), p.name))
        written = 0
        for path in [*targets, *versioned, self.metadata_dir / "timestamp.json"]:
            if not path.is_file():
                continue
            key = f"tuf/{path.relative_to(tuf)}"
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if key in self._mirrored and (path.name != "timestamp.json" or self._mirrored[key] == digest):
                continue
            objects.put(key, data)
            self._mirrored[key] = digest
            written += 1
        return written

    def current(self, group: str) -> dict[str, Any] | None:
        """The custom fields of the group's published gate, or None."""
        if not self.exists:
            return None
        info = self._load("targets").signed.targets.get(target_name(group))
        return dict(info.unrecognized_fields.get("custom", {})) if info else None
