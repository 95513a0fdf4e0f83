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
        except FileNotFoundError:
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
    """An S3-compatible store through boto3. `url`: s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=R];
    credentials as boto3 finds them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role)."""

    def __init__(self, url: str, connect_timeout: float = 5.0) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise BouncerError("station.objects on S3 needs boto3: pip install 'bouncer[station-scale]'") from None
        u = urlsplit(url)
        if u.scheme != "s3" or not u.netloc:
            raise BouncerError(f"station.objects: s3://BUCKET[/PREFIX][?endpoint=URL], got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise BouncerError(f"station.objects: unknown option(s) {', '.join(sorted(unknown))} (endpoint, region)")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.where = f"s3://{self.bucket}/{self.prefix}" + (f" at {query['endpoint']}" if "endpoint" in query else "")
        endpoint = query.get("endpoint", "https://")
        # checksums only where S3 requires them, and over TLS (which protects the body) no payload signing: each
        # costs CPU per PUT, and a station worker's PUTs are what bounds its ingest (docs/station.md)
        cfg = Config(connect_timeout=connect_timeout, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"},
                     max_pool_connections=32, request_checksum_calculation="when_required",
                     s3={"payload_signing_enabled": not endpoint.startswith("https://")})  # fmt: skip
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=query.get("endpoint"), region_name=query.get("region", "us-east-1"), config=cfg
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, exc: Exception) -> ObjectStoreError:
        return ObjectStoreError(f"object store {self.where}: {what} failed ({type(exc).__name__}: {exc})")

    def wait_ready(self, timeout: float) -> None:
        """At a worker's start: the bucket answers, or a clear error. A store still starting is waited for (up to
        `timeout` seconds, saying so); a missing bucket or refused credentials are errors at once."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout
        while True:
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("404", "NoSuchBucket", "NotFound"):
                    raise BouncerError(f"station.objects: bucket {self.bucket!r} does not exist at {self.where}: "
                                       "create it first") from None  # fmt: skip
                if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise BouncerError(f"station.objects: {self.where} refused the credentials ({code})") from None
                error: Exception = exc
            except BotoCoreError as exc:
                error = exc
            if time.monotonic() >= deadline:
                raise BouncerError(f"station.objects: {self.where} unreachable for {timeout:.0f} s ({error})")
            log.warning("object store %s not reachable yet (%s), retrying for %.0f s more", self.where, error,
                        deadline - time.monotonic())  # fmt: skip
            time.sleep(1.0)

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(f"put {key}", exc) from None

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return bytes(self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._fail(f"get {key}", exc) from None
        except BotoCoreError as exc:
            raise self._fail(f"get {key}", exc) from None

    def delete(self, keys: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for i in range(0, len(keys), 1000):  # the S3 limit per request
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except (BotoCoreError, ClientError) as exc:
                raise self._fail("delete", exc) from None

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        from botocore.exceptions import BotoCoreError, ClientError

        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            ):
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:], obj["LastModified"].timestamp()
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", exc) from None


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
