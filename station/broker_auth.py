"""Who may say what on the broker: the station issues each device (and itself) a broker identity and writes
Mosquitto's password file and ACL from them, so a device can publish only under `bouncer/v1/<its id>/` and
read only its own commands and the gate announcements, and only the station may command devices or announce
gates. The station still checks every message's device against its topic (station/consumer.py): the ACL
keeps a forged message off the broker, the check keeps it out of the store if a broker is set up otherwise.

Passwords are random, shown once, and kept only as Mosquitto's own hash (PBKDF2-SHA512, `$7$`, what
`mosquitto_passwd` writes), so the files can be regenerated at any time. After a change, reload the broker
(SIGHUP: `systemctl reload mosquitto`); a removed identity cannot connect again.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bouncer.runtime import schemas
from bouncer.runtime.errors import BouncerError

if TYPE_CHECKING:
    from bouncer.station.store import Store

KINDS = ("device", "station")
ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12

ACL_HEAD = """\
# Bouncer's broker access control (written by `bouncer station device add|remove`; docs/mqtt.md, "Security").
# Every identity is a Mosquitto user; a device's user name is its device id.
# Devices: publish their own frames, events, alerts, status and stats; read their own commands and the gate
# announcements.
pattern write bouncer/v1/%u/frames
pattern write bouncer/v1/%u/events
pattern write bouncer/v1/%u/alerts
pattern write bouncer/v1/%u/status
pattern write bouncer/v1/%u/stats
pattern read bouncer/v1/%u/cmd
pattern read bouncer/v1/gates/#
"""

STATION_ACL = """\
# The review station ({name}): reads the fleet, commands devices, announces gates.
user {name}
topic read bouncer/v1/+/frames
topic read bouncer/v1/+/events
topic read bouncer/v1/+/alerts
topic read bouncer/v1/+/status
topic read bouncer/v1/+/stats
topic write bouncer/v1/+/cmd
topic readwrite bouncer/v1/gates/#
"""


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2's password-file hash: $7$ITERATIONS$SALT$PBKDF2-SHA512 (base64)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def acl_text(stations: list[str]) -> str:
    return ACL_HEAD + "".join("\n" + STATION_ACL.format(name=s) for s in stations)


class BrokerIdentities:
    def __init__(self, store: Store, out_dir: Path) -> None:
        """`out_dir`: where the broker's `passwd` and `acl` are written (point mosquitto.conf at them)."""
        self.store, self.out_dir = store, Path(out_dir)

    def add(self, name: str, kind: str = "device") -> str:
        """A new identity; returns its password (shown once: only its hash is kept)."""
        try:
            schemas.check_device_id(name)
        except schemas.SchemaError as exc:
            raise BouncerError(f"broker identity: {exc}") from None
        if kind not in KINDS:
            raise BouncerError(f"identity kind {kind!r}: one of {', '.join(KINDS)}")
        if self.store.rows("SELECT 1 FROM broker_identities WHERE name = ?", (name,)):
            raise BouncerError(f"broker identity {name!r} exists (remove it first to issue a new password)")
        password = secrets.token_urlsafe(24)
        self.store.run("INSERT INTO broker_identities (name, kind, pw_hash, created) VALUES (?, ?, ?, ?)",
                       (name, kind, mosquitto_hash(password), time.time()))  # fmt: skip
        self.write()
        return password

    def remove(self, name: str) -> None:
        if not self.store.run("DELETE FROM broker_identities WHERE name = ?", (name,)):
            raise BouncerError(f"no broker identity {name!r}")
        self.write()

    def list(self) -> list[dict[str, object]]:
        rows = self.store.rows("SELECT name, kind, created FROM broker_identities ORDER BY kind, name")
        return [{"name": n, "kind": k, "created": c} for n, k, c in rows]

    def write(self) -> tuple[Path, Path]:
        """The password file and the ACL, each replaced atomically (mode 0600)."""
        rows = self.store.rows("SELECT name, kind, pw_hash FROM broker_identities ORDER BY name")
        passwd = "".join(f"{n}:{h}\n" for n, _, h in rows)
        acl = acl_text([n for n, k, _ in rows if k == "station"])
        return _write(self.out_dir / "passwd", passwd), _write(self.out_dir / "acl", acl)


def _write(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        raise BouncerError(f"{path}: cannot write the broker's file: {exc}") from None
    return path
