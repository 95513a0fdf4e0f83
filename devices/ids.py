"""Message ids a device derives from its frames, keyed with a secret of its own.

A finite source (a folder) re-sent after a crash must reuse each frame's id, so the station stores it once.
Derived from public facts alone (device, source, file name) anyone could compute a camera's next ids and
publish them first, and the station would then drop the camera's own frames as duplicates. HMAC with a
per-device key, made on first start in the device's data_dir and never sent, keeps them unguessable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path

from bouncer.runtime.errors import BouncerError

KEY_FILE = "id.key"
KEY_BYTES = 32


def device_key(data_dir: Path) -> bytes:
    """The device's id key: read, or made once (0600) where the device keeps its state."""
    path = Path(data_dir) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    except OSError as exc:
        raise BouncerError(f"{path}: cannot read the device's id key: {exc}") from None
    if len(key) == KEY_BYTES:
        return key
    if key:
        raise BouncerError(f"{path}: the device's id key is {len(key)} bytes, not {KEY_BYTES} (delete it to make "
                           "a new one; re-sent frames then get new ids)")  # fmt: skip
    key = secrets.token_bytes(KEY_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    except FileExistsError:  # another process made it first: use theirs
        return device_key(data_dir)
    except OSError as exc:
        raise BouncerError(f"{path}: cannot write the device's id key: {exc}") from None
    return key


def message_id(key: bytes, device: str, source: str, frame_key: str, finite: bool) -> str:
    """Finite sources get ids derived from the frame (a re-run after a crash re-sends the same id); live ones
    a random id per frame."""
    if not finite:
        return uuid.uuid4().hex
    return hmac.new(key, f"{device}|{source}|{frame_key}".encode(), hashlib.sha256).hexdigest()[:32]
