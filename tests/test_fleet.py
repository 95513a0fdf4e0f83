"""Many lines at once: three groups, six cameras (plus one asking for a group that does not exist). Each group
retrains on its own labels and rolls out on its own; a bad challenger in one group is refused and reaches
nobody; nothing crosses between groups. Real Mosquitto, real HTTP, real TUF, device processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import StationProcess, free_port, http_json, run_cli, wait_until

from bouncer.sim import simulator
from bouncer.station.retrain import is_heldout

GROUPS = ("line-a", "line-b", "line-c")


def toml(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    path.write_text("".join(f"[{n}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in s.items())
                            for n, s in sections.items()))  # fmt: skip
    return path


@pytest.mark.parametrize("station_database", ["sqlite", "postgres"], indirect=True)
def test_three_groups_retrain_and_roll_out_independently(broker, sim_gate, tmp_path, bouncer_home, station_database,
                                                         station_objects):  # fmt: skip
    """On SQLite + files with one station process, and on PostgreSQL + S3 with a second, stateless worker that
    ingests (sharing the subscription with the first) and serves the TUF repository to the cameras from the object
    store, with nothing of it on its own disk."""
    root = sim_gate.parent
    st_dir = tmp_path / "station"
    db = {"database": station_database, "objects": station_objects} if station_database else {}
    cfg = toml(tmp_path / "station.toml", {"station": {"data_dir": str(st_dir), "groups": list(GROUPS), "worker": "w1",
                                                       **db}, "mqtt": {"broker": broker.url}})  # fmt: skip
    for g in GROUPS:
        res = run_cli("station", "init", str(cfg), "--group", g, "--gate", str(sim_gate), "--train",
                      str(root / "train"), "--calib", str(root / "calib"))  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
    again = run_cli("station", "init", str(cfg), "--group", "line-a", "--gate", str(sim_gate), "--train",
                    str(root / "train"), "--calib", str(root / "calib"))  # fmt: skip
    assert again.returncode == 2 and "already has a gate" in again.stderr
    station = StationProcess(cfg, free_port()).start()
    workers = [station]
    if station_database:  # a second, stateless worker: the same database and bucket, its own folder and client id
        second = {"data_dir": str(tmp_path / "w2"), "groups": list(GROUPS), "worker": "w2", "roles": ["ingest", "web"],
                  **db}  # fmt: skip
        cfg2 = toml(tmp_path / "station2.toml", {"station": second, "mqtt": {"broker": broker.url}})
        workers.append(StationProcess(cfg2, free_port()).start())
    procs: list[subprocess.Popen] = []
    try:
        # two cameras per group flag a part type none of the gates knows
        runs = []
        for k, g in enumerate(GROUPS):
            for cam in (1, 2):
                dev = f"{g}-cam{cam}"
                frames = simulator.write_dataset(
                    # 32 per camera: the hash split of the frame ids (new each run) leaves each group 8 or more
                    # calibration frames of the new type (24 left 6 once in five runs)
                    tmp_path / f"bolts-{dev}",
                    ("bolt",),
                    per_class=32,
                    seed=100 + 2 * k + cam,
                )
                conf = toml(tmp_path / f"{dev}.toml", {
                    "device": {"id": dev, "group": g, "data_dir": str(tmp_path / f"flag-{dev}")},
                    "source": {"uri": str(frames)}, "gate": {"bundle": str(sim_gate)}, "mqtt": {"broker": broker.url},
                })  # fmt: skip
                runs.append(subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(conf), "--once"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
        for r in runs:
            assert r.wait(timeout=300) == 0, r.stderr.read().decode()[-2000:]
        queues = {g: wait_until(lambda g=g: (q := http_json(f"{station.url}/api/queue?group={g}&limit=500")[1])
                                ["counts"]["frames"] >= 44 and q, 60) for g in GROUPS}  # fmt: skip
        for g, q in queues.items():
            assert {f["group"] for f in q["frames"]} == {g} and {f["device"][: len(g)] for f in q["frames"]} == {g}

        # line-a and line-b name the new type; line-c's operator labels held-out frames as garbage and the rest
        # as a new class: a challenger that contradicts its own held-out labels (a bad one, by construction)
        for g, q in queues.items():
            for f in q["frames"]:
                label = "garbage" if g == "line-c" and is_heldout(f["id"]) else "new:bolt"
                assert http_json(f"{station.url}/api/frames/{f['id']}/label", {"label": label})[0] == 200
        results = {g: http_json(f"{station.url}/api/retrain?group={g}", {})[1] for g in GROUPS}
        assert results["line-a"]["published"] and results["line-b"]["published"], results
        assert not results["line-c"]["published"] and "accepted error" in results["line-c"]["reason"]
        versions = {g: r["version"] for g, r in results.items()}
        assert len(set(versions.values())) == 3
        published = {g: http_json(f"{station.url}/api/gates?group={g}")[1]["published"] for g in GROUPS}
        for g in GROUPS:
            assert published[g]["group"] == g
            assert ("bolt" in published[g]["classes"]) == (g != "line-c")
        # every web worker serves every gate's card (from the object store on PostgreSQL + S3)
        with urllib.request.urlopen(f"{workers[-1].url}/api/gates/{versions['line-a']}/card.md") as r:
            assert versions["line-a"] in r.read().decode()

        # bad input: approving the refused gate, an unknown group
        status, body = http_json(f"{station.url}/api/gates/{versions['line-c']}/approve", {"user": "eve"})
        assert status == 409 and "only a pending gate that passed its checks" in body["detail"]
        status, body = http_json(f"{station.url}/api/retrain?group=line-z", {})
        assert status == 404 and "not managed by this station" in body["detail"]

        # every camera runs with over-the-air updates; one more asks for a group the station does not have
        ota = {"url": f"{workers[-1].url}/tuf", "root": str(st_dir / "tuf/metadata/1.root.json"), "trial_frames": 8,
               "poll_s": 2.0, "canary_size": 0}  # fmt: skip
        cams = [(f"{g}-cam{c}", g) for g in GROUPS for c in (1, 2)] + [("stray-cam", "line-z")]
        more = simulator.write_dataset(tmp_path / "more", ("bolt", "gear"), per_class=6, seed=7)
        for dev, g in cams:
            conf = toml(tmp_path / f"ota-{dev}.toml", {
                "device": {"id": dev, "group": g, "data_dir": str(tmp_path / f"dev-{dev}")},
                "source": {"uri": str(more), "loop": True, "max_fps": 8.0}, "gate": {"bundle": str(sim_gate)},
                "mqtt": {"broker": broker.url}, "ota": ota,
            })  # fmt: skip
            procs.append(subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(conf)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip

        def commits() -> dict[str, str]:
            return {e["device"]: e["version"] for e in http_json(f"{station.url}/api/events?kind=gate_commit")[1]}

        # line-a's and line-b's cameras commit their retrained gates (line-c's may commit line-c's renamed first
        # gate meanwhile: a count of commits alone is not the four)
        wanted = {f"{g}-cam{c}": versions[g] for g in ("line-a", "line-b") for c in (1, 2)}

        def all_committed() -> dict[str, str] | None:
            c = commits()
            return c if all(c.get(d) == v for d, v in wanted.items()) else None

        done = wait_until(all_committed, timeout=300, every=1.0)
        stray = wait_until(lambda: [e for e in http_json(f"{station.url}/api/events?kind=gate_update")[1]
                                    if e["device"] == "stray-cam"], timeout=60)  # fmt: skip
        time.sleep(3)  # line-c's cameras had every chance to (wrongly) swap too
        events = http_json(f"{station.url}/api/events?kind=gate_&limit=1000")[1]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        for w in workers:
            w.stop()
    for g in ("line-a", "line-b"):
        for c in (1, 2):
            assert done.get(f"{g}-cam{c}") == versions[g], (g, done, versions)
    # line-c's cameras only ever took line-c's champion (its first gate), never the refused challenger
    line_c = [e for e in events if e["device"].startswith("line-c") and e["event"] in ("gate_swap", "gate_commit")]
    assert {e["version"] for e in line_c} <= {published["line-c"]["version"]}
    assert not [e for e in events if e.get("version") == versions["line-c"]]
    assert "publishes no gate for group 'line-z'" in stray[0]["reason"]
    if station_database:  # the cameras updated through the second worker, which holds no TUF file itself
        assert not (tmp_path / "w2" / "tuf").exists()
        from bouncer.station.objects import S3Objects

        keys = {k for k, _ in S3Objects(station_objects).list("tuf/")}
        assert "tuf/metadata/timestamp.json" in keys and "tuf/metadata/1.root.json" in keys
        assert sum(k.startswith("tuf/targets/gates/") for k in keys) >= 5, "3 first gates, 2 retrained"
    trail = http_json_offline(st_dir, station_database, station_objects)
    assert ("rejected", versions["line-c"]) in trail and ("published", versions["line-c"]) not in trail


def http_json_offline(st_dir: Path, database: str, objects: str) -> set[tuple[str, str]]:
    """(event, gate version) pairs of the station's audit log, read from its database after the run."""
    from bouncer.station.store import Store

    store = Store(st_dir, database, objects=objects)
    try:
        return {(a["event"], a["gate_version"]) for a in store.audit_log()}
    finally:
        store.close()
