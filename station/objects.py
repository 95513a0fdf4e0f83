"""Where the station keeps blobs (frame JPEGs, heatmaps, quarantined payloads): a folder (the embedded default)
or an S3-compatible object store (`station.objects = "s3://BUCKET/PREFIX"`), behind one small interface.

Keys derive from the message id, so a message delivered twice writes the same object twice and the row that
points at it once (`ON CONFLICT DO NOTHING`). The write order is object, then row, then the MQTT ack: a crash
between the first two leaves an object no row points at, which `sweep` removes after a grace period; a row
never points at a missing object, and nothing is acknowledged that is not stored.

Every failure of the store (down, refused, full) is an `ObjectStoreError`, an OSError: the consumer leaves the
message unacknowledged and the broker delivers it again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from bouncer.runtime.errors import BouncerError

log = logging.getLogger("bouncer.station.objects")


class ObjectStoreError(OSError):
    """The object store could not do what was asked (unreachable, refused, full)."""


class Objects(Protocol):
    where: str  # for log lines and errors

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, keys: list[str]) -> None: ...

    def list(self, prefix: str) -> Iterator[tuple[str, float]]: ...  # (key, modified, epoch seconds)


class FolderObjects:
    """Files under a folder, written atomically (temporary file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.where = str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"object key {key!r} leaves the store")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ObjectStoreError(exc.errno, f"{path}: {exc.strerror or exc}") from None

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                yield str(path.relative_to(self.root)), path.stat().st_mtime


class S3Objects:
    """An S3-compatible store through obstore (Rust's object_store: a PUT costs the worker about a seventh of the
    CPU boto3's does, measured in docs/station.md, and a worker's PUTs bound its ingest).
    `url`: s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=R]; credentials from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN), a web identity or an instance role."""

    def __init__(self, url: str, connect_timeout: float = 5.0) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise BouncerError("station.objects on S3 needs obstore: pip install 'bouncer[station-scale]'") from None
        u = urlsplit(url)
        if u.scheme != "s3" or not u.netloc:
            raise BouncerError(f"station.objects: s3://BUCKET[/PREFIX][?endpoint=URL], got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise BouncerError(f"station.objects: unknown option(s) {', '.join(sorted(unknown))} (endpoint, region)")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.where = f"s3://{self.bucket}/{self.prefix}" + (f" at {query['endpoint']}" if "endpoint" in query else "")
        endpoint = query.get("endpoint", "")
        plain = endpoint.startswith("http://")
        extra: dict[str, Any] = {"endpoint": endpoint} if endpoint else {}
        # over TLS (which protects the body) no payload hash: it costs CPU per PUT. Few, quick retries: the
        # consumer retries a failed batch itself, saying so, and must not sit minutes in a client's backoff
        try:
            self._store = S3Store(
                self.bucket, prefix=self.prefix or None, region=query.get("region", "us-east-1"),
                unsigned_payload=not plain, client_options={
                    "allow_http": plain, "connect_timeout": f"{connect_timeout}s", "timeout": "30s"},
                retry_config={"max_retries": 2, "retry_timeout": timedelta(seconds=10)}, **extra,
            )  # fmt: skip
        except Exception as exc:  # obstore checks its configuration here (a malformed endpoint, say)
            raise BouncerError(f"station.objects: {self.where}: {exc}") from None

    def _fail(self, what: str, exc: Exception) -> ObjectStoreError:
        return ObjectStoreError(f"object store {self.where}: {what} failed ({type(exc).__name__}: {_first_line(exc)})")

    def wait_ready(self, timeout: float) -> None:
        """At a worker's start: the bucket answers, or a clear error. A store still starting is waited for (up to
        `timeout` seconds, saying so); a missing bucket or refused credentials are errors at once."""
        import obstore

        deadline = time.monotonic() + timeout
        while True:
            try:
                next(iter(obstore.list(self._store, chunk_size=1)), None)
                return
            except Exception as exc:
                text = str(exc)
                if "NoSuchBucket" in text:
                    raise BouncerError(f"station.objects: bucket {self.bucket!r} does not exist at {self.where}: "
                                       "create it first") from None  # fmt: skip
                refused = ("403 Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
                if any(code in text for code in refused):
                    raise BouncerError(f"station.objects: {self.where} refused the credentials "
                                       f"({_first_line(exc)})") from None  # fmt: skip
                error = _first_line(exc)
            if time.monotonic() >= deadline:
                raise BouncerError(f"station.objects: {self.where} unreachable for {timeout:.0f} s ({error})")
            log.warning("object store %s not reachable yet (%s), retrying for %.0f s more", self.where, error,
                        deadline - time.monotonic())  # fmt: skip
            time.sleep(1.0)

    def put(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self._store, key, data)
        except Exception as exc:
            raise self._fail(f"put {key}", exc) from None

    def get(self, key: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(self._store, key).bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(f"get {key}", exc) from None

    def delete(self, keys: list[str]) -> None:
        import obstore

        try:
            obstore.delete(self._store, keys)  # bulk requests of up to 1000 keys, as S3 allows
        except Exception as exc:
            raise self._fail("delete", exc) from None

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        import obstore

        try:
            for chunk in obstore.list(self._store, prefix=prefix or None):
                for meta in chunk:
                    yield meta["path"], meta["last_modified"].timestamp()
        except Exception as exc:
            raise self._fail("list", exc) from None


def _first_line(exc: Exception) -> str:
    """obstore's messages carry a debug dump after the first line; the first says what failed."""
    return str(exc).strip().split("\n", 1)[0][:400]


def open_objects(spec: str, root: Path, wait_s: float = 30.0) -> FolderObjects | S3Objects:
    """`spec`: empty for the folder `root` (the embedded default), or s3://BUCKET[/PREFIX][?endpoint=URL] (waited
    for up to `wait_s` seconds)."""
    if not spec:
        return FolderObjects(root)
    if spec.startswith("s3://"):
        store = S3Objects(spec)
        store.wait_ready(wait_s)
        return store
    raise BouncerError(f"station.objects: empty (files in the data folder) or s3://BUCKET/PREFIX, got {spec!r}")
