"""The station's rows on a real PostgreSQL (started by the tests, stopped by its process id): the same store code
as on SQLite, idempotent inserts, the append-only audit log enforced by the database, one audit chain from
several writers at once, and a clear error for a database that is not there."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from helpers import free_port, run_cli, station_config

from bouncer.runtime import schemas
from bouncer.runtime.errors import BouncerError
from bouncer.station.db import DatabaseUnavailable
from bouncer.station.store import Store


def frame(i: int) -> schemas.FrameMessage:
    return schemas.FrameMessage(
        v=1, id=f"f{i:04d}", device="cam-1", ts=1000.0 + i, source=f"/frames/{i}.png", decision="review", label="gear",
        confidence=0.7, ood_score=1.0, reasons=["low_confidence"], details=[], quality={"mean": 100.0},
        gate_version="v1", backbone_hash="b" * 64, jpeg=b"\xff\xd8jpeg", group="default", features={},
    )  # fmt: skip


def test_the_store_on_postgres_keeps_one_copy_and_refuses_to_rewrite_the_audit(postgres, tmp_path):
    store = Store(tmp_path / "st", postgres)
    assert store.db.dialect == "postgresql"
    assert store.add_frame(frame(1)) and not store.add_frame(frame(1)), "a redelivered frame is stored once"
    ev = {"v": 1, "id": "e1", "device": "cam-1", "ts": 1.0, "event": "drift", "signal": "brightness"}
    assert store.add_event(ev) and not store.add_event(ev)
    assert store.frame("f0001").predicted == "gear" and store.image("f0001") == b"\xff\xd8jpeg"
    for event in ("fitted", "approved", "published"):
        store.audit("v2", event, "user:ann", {"n": 1})
    check = store.verify_audit()
    assert check["ok"] and check["records"] == 3, check
    with psycopg.connect(postgres, autocommit=True) as conn:
        for sql in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.Error, match="append-only"):
                conn.execute(sql)
        assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 3
    store.close()
    again = Store(tmp_path / "st", postgres)  # a second start: the schema is there, nothing is lost
    assert again.counts()["frames"] == 1 and again.verify_audit()["records"] == 3
    again.close()


def test_two_writers_at_once_make_one_audit_chain(postgres, tmp_path):
    """Two stations (workers) on one database: the advisory lock orders their audit records into one chain."""
    stores = [Store(tmp_path / f"w{i}", postgres) for i in range(2)]

    def write(store: Store, who: str) -> None:
        for i in range(40):
            store.audit("v1", "fitted", who, {"i": i})

    threads = [threading.Thread(target=write, args=(s, f"worker:{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check = stores[0].verify_audit()
    assert check["ok"] and check["records"] == 80, check
    for s in stores:
        s.close()


def test_a_database_that_is_not_there_is_one_clear_error(tmp_path):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(BouncerError, match="unreachable") as exc:
        Store(tmp_path / "st", url, connect_timeout=2.0)
    assert "nowhere" in str(exc.value)
    cfg = station_config(tmp_path / "s.toml", tmp_path / "st", database="mysql://x")
    res = run_cli("station", "user", "list", str(cfg))
    assert res.returncode == 2 and "station.database" in res.stderr and "Traceback" not in res.stderr


def test_frames_on_s3_object_first_then_row_and_orphans_swept(postgres, s3_server, tmp_path):
    """Objects under keys derived from the message id, then the rows; an object a crash left without a row is
    removed by the sweep once older than the grace period, never one a row points at."""
    objects = s3_server.bucket()
    store = Store(tmp_path / "st", postgres, objects=objects)
    msgs = [frame(i) for i in range(5)]
    assert store.add_frames([*msgs, msgs[0]]) == [True] * 5 + [False], "a duplicate in the batch is stored once"
    assert store.add_frames(msgs[:2]) == [False, False]
    assert store.image("f0003") == b"\xff\xd8jpeg" and store.image("nope") is None
    assert not (tmp_path / "st" / "frames").exists(), "nothing on the local disk"
    store.objects.put("frames/f9/f9999.jpg", b"left by a crash before its row")
    assert store.sweep(grace_s=3600) == 0, "too young to be an orphan"
    assert store.sweep(grace_s=-1) == 1 and store.objects.get("frames/f9/f9999.jpg") is None
    assert all(store.image(m.id) for m in msgs), "objects with rows stay"
    store.close()


def test_an_object_store_that_is_down_missing_or_refusing_is_an_error_naming_it(postgres, s3_server, tmp_path,
                                                                               monkeypatch, caplog):  # fmt: skip
    """At start the worker waits for the object store, saying so, then fails with one line naming it; a missing
    bucket or refused credentials fail at once."""
    down = f"s3://frames?endpoint=http://127.0.0.1:{free_port()}"
    with pytest.raises(
        BouncerError, match=r"station.objects: s3://frames/ at http://127\.0\.0\.1:\d+ unreachable for 2 s"
    ):
        Store(tmp_path / "st", postgres, connect_timeout=2.0, objects=down)
    assert "not reachable yet" in caplog.text and "retrying" in caplog.text
    with pytest.raises(BouncerError, match="bucket 'nosuchbucket' does not exist"):
        Store(tmp_path / "st", postgres, objects=s3_server.url("nosuchbucket"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(BouncerError, match="refused the credentials"):
        Store(tmp_path / "st", postgres, objects=s3_server.bucket())
    cfg = station_config(tmp_path / "s.toml", tmp_path / "st", objects="ftp://x")
    res = run_cli("station", "user", "list", str(cfg))
    assert res.returncode == 2 and "station.objects" in res.stderr and "Traceback" not in res.stderr


def test_an_ingest_worker_waits_out_a_database_and_an_object_store_restart_and_loses_nothing(
    broker, postgres_server, tmp_path, monkeypatch, caplog
):
    """Frames published while PostgreSQL or the object store is down stay unacknowledged (the worker logs that it
    retries) and are all stored, once, when the servers are back."""
    import time

    from helpers import SeaweedFS, publish_all, wait_until
    from test_station import frame_message

    from bouncer.runtime.config import MqttSection
    from bouncer.station.consumer import Consumer

    s3 = SeaweedFS(tmp_path / "s3").start()
    try:
        s3.create_bucket("frames")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.SECRET)
        db = postgres_server.database()
        store = Store(tmp_path / "st", db, objects=s3.url("frames"), connect_timeout=5)
        c = Consumer(MqttSection(broker=broker.url), store, "workers", "w1", groups=["default"])
        c.start()
        assert c.connected.wait(10)
        time.sleep(0.3)
        publish_all(broker.port, [(schemas.topic("cam-1", "frames"), frame_message("cam-1", i).encode())
                                  for i in range(10)])  # fmt: skip
        wait_until(lambda: store.counts()["frames"] == 10, 30)
        s3.stop()  # the object store goes away mid-run
        publish_all(broker.port, [(schemas.topic("cam-1", "frames"), frame_message("cam-1", i).encode())
                                  for i in range(10, 20)])  # fmt: skip
        wait_until(lambda: c.counts["retries"] >= 2, 60)
        assert store.counts()["frames"] == 10
        s3.start()
        wait_until(lambda: store.counts()["frames"] == 20, 90)
        postgres_server.stop()  # and then the database
        publish_all(broker.port, [(schemas.topic("cam-1", "frames"), frame_message("cam-1", i).encode())
                                  for i in range(20, 30)] + [(schemas.topic("cam-1", "frames"),
                                  frame_message("cam-1", 3).encode())])  # fmt: skip
        before = c.counts["retries"]
        wait_until(lambda: c.counts["retries"] >= before + 2, 60)
        postgres_server.start()

        def stored() -> int:
            """The test's own look at the rows: while the pool reconnects after the restart (its backoff grew
            while the server was down) a read may wait past its timeout; the worker's recovery is what counts."""
            try:
                return store.counts()["frames"]
            except DatabaseUnavailable:
                return -1

        wait_until(lambda: stored() == 30, 90)
        assert all(store.image(f.id) for f in store.queue(100)), "every row has its object"
        assert c.counts["frames"] == 30 and c.counts["duplicates"] == 1 and c.counts["quarantined"] == 0, c.counts
        logged = caplog.text
        assert "retrying" in logged and "not acknowledged" in logged and "object store s3://frames/" in logged
        assert "PostgreSQL at postgresql://postgres@127.0.0.1" in logged, logged[-2000:]
        c.stop()
        store.close()
    finally:
        s3.stop()


@pytest.mark.heavy  # real servers, a minute
def test_bench_station_stores_every_frame_once_through_every_fault(tmp_path):
    """`bouncer bench station`, small: its own servers, one and two ingest workers, then a worker SIGKILLed and
    PostgreSQL, the object store and the broker restarted; every frame published has one row and one object."""
    import json

    res = run_cli("bench", "station", "--messages", "240", "--workers", "1,2", "--publishers", "2", "--devices",
                  "4", "--size-kb", "20", timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for run in [*out["runs"], out["paced"], out["faults"]]:
        assert run["stored"] == run["published"] and run["lost"] == 0 and run["objects"] == run["stored"], run
        assert run["msgs_per_s"] > 0 and run["p50_ms"] <= run["p99_ms"], run
    assert [f["fault"] for f in out["faults"]["faults"]] == [
        "worker SIGKILLed", "PostgreSQL restarted", "object store restarted", "broker restarted"
    ]  # fmt: skip
    assert "| 2 + faults paced at" in res.stdout and "CPU per 1000 frames" in res.stdout


def test_the_tuf_repository_is_copied_to_the_object_store_in_order_and_once(s3_server, tmp_path):
    """Targets, then versioned metadata, then timestamp.json; what is there already is not written again; a
    new publication writes only its own four files; a device's TUF client trusts what the store holds."""
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import Updater
    from tuf.ngclient.fetcher import FetcherInterface

    from bouncer.station.objects import S3Objects
    from bouncer.station.tufrepo import TufRepo

    objects = S3Objects(s3_server.bucket())
    repo = TufRepo(tmp_path / "station")
    repo.init()
    bundle = tmp_path / "g1.bouncer"
    bundle.write_bytes(b"gate one")
    repo.publish(bundle, "line-a", {"version": "g1", "serial": 1})
    written: list[str] = []
    put = objects.put
    objects.put = lambda key, data: (written.append(key), put(key, data))[1]  # type: ignore[method-assign]
    assert repo.mirror(objects) == len(written) == 7  # 1 target, root, 2 targets, 2 snapshots, timestamp
    assert written[0].startswith("tuf/targets/gates/") and written[-1] == "tuf/metadata/timestamp.json"
    assert repo.mirror(objects) == 0
    bundle.write_bytes(b"gate two")
    repo.publish(bundle, "line-a", {"version": "g2", "serial": 2})
    assert repo.mirror(objects) == 4
    assert TufRepo(tmp_path / "station").mirror(objects) == 1, "a restarted station rewrites timestamp.json only"
    # what a device fetches, read straight from the store: the TUF client verifies it end to end
    local = tmp_path / "device"
    (local / "targets").mkdir(parents=True)
    (local / "root.json").write_bytes(objects.get("tuf/metadata/1.root.json") or b"")

    class StoreFetcher(FetcherInterface):  # what the web worker serves at /tuf/: the store's objects
        def _fetch(self, url: str):
            data = objects.get("tuf/" + url.split("/tuf/", 1)[1])
            if data is None:
                raise DownloadHTTPError(url, 404)
            return iter([data])

    fetcher = StoreFetcher()
    up = Updater(str(local), "http://store/tuf/metadata/", str(local / "targets"), "http://store/tuf/targets/",
                 fetcher=fetcher, bootstrap=None)  # fmt: skip
    up.refresh()
    info = up.get_targetinfo("gates/line-a.bouncer")
    assert info is not None and info.custom["version"] == "g2"
    assert Path(up.download_target(info)).read_bytes() == b"gate two"


@pytest.mark.parametrize("station_database", ["", "postgres"], indirect=True)
def test_retention_removes_old_unlabelled_frames_with_their_objects_and_keeps_labelled_ones(
    station_database, request, tmp_path
):
    """On SQLite + files and on PostgreSQL + S3: rows first, then objects; labelled frames, young frames and the
    audit log stay; `station.retention_days` must not be negative."""
    objects = request.getfixturevalue("s3_server").bucket() if station_database else ""
    store = Store(tmp_path / "st", station_database, objects=objects)
    store.add_frames([frame(i) for i in range(6)])
    store.set_label("f0001", "class", "gear", "ann")
    store.db.execute("UPDATE frames SET received = received - 40 * 86400 WHERE id IN ('f0000', 'f0001', 'f0002')")
    qid = store.quarantine("bouncer/v1/cam-1/frames", b"garbage", "not JSON")
    store.db.execute("UPDATE quarantine SET received = received - 40 * 86400")
    store.set_stats({"device": "cam-1", "ts": 1000.0})
    store.set_stats({"device": "cam-1"})
    store.audit("v1", "fitted", "test", {})
    before = {k for k, _ in store.objects.list("")}
    assert store.expire(30 * 86400) == {"frames": 2, "quarantine": 1, "device_stats": 1}
    assert store.frame("f0000") is None and store.image("f0000") is None and store.frame("f0002") is None
    assert store.image("f0001") == b"\xff\xd8jpeg", "a labelled frame is kept however old"
    assert all(store.image(f"f{i:04d}") for i in range(3, 6)), "young frames are kept"
    after = {k for k, _ in store.objects.list("")}
    assert len(before - after) == 3 and f"quarantine/{qid}.bin" in before - after
    assert len(store.audit_log()) == 1
    assert store.expire(30 * 86400) == {"frames": 0, "quarantine": 0, "device_stats": 0}
    store.close()
    cfg = station_config(tmp_path / "s.toml", tmp_path / "st")
    cfg.write_text(cfg.read_text().replace("[station]\n", "[station]\nretention_days = -1\n"))
    res = run_cli("station", "user", "list", str(cfg))
    assert res.returncode == 2 and "station.retention_days" in res.stderr and "Traceback" not in res.stderr
