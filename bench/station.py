"""`bouncer bench station`: the station's sustained ingest on real servers (Mosquitto, PostgreSQL, SeaweedFS's S3
gateway, all on this machine), with 1, 2 and 4 ingest workers, then the same with faults injected: an ingest
worker SIGKILLed, PostgreSQL restarted, the object store restarted, the broker restarted.

Simulated devices publish flagged frames (about 50 KB each, QoS 1) as fast as the station takes them, from
publisher processes of their own. Sustained ingest is messages over the time from the first publish to the last
row stored; latency is each row's `received` minus the frame's publish time. A fault run passes when every id
published has exactly one row and one object."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.bench.servers import Mosquitto, Postgres, SeaweedFS, free_port
from bouncer.runtime import schemas
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.decision import Verdict

TS_MARK = 1111111111.111111  # a publish time placeholder of the same width as time.time() with 6 decimals
ID_MARK = "f" * 32


def _template(device: str, size_kb: int) -> bytes:
    """A flagged frame of about `size_kb` KB (a noisy JPEG and the backbone vector), with placeholders for the
    id and the publish time."""
    rng = np.random.default_rng(zlib.crc32(device.encode()))
    side = int(np.sqrt(size_kb * 1024 * 0.75 / 1.1))  # base64 adds a third; noise JPEGs run ~1.1 B per pixel
    img = rng.integers(0, 255, (side, side, 3), np.uint8)
    jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])[1].tobytes()
    msg = schemas.FrameMessage(
        v=1, id=ID_MARK, device=device, ts=TS_MARK, source="/bench/frame.png", decision=Verdict.REVIEW, label="gear",
        confidence=0.61, ood_score=3.2, reasons=["ood"], details=[], quality={"mean": 100.0}, gate_version="bench",
        backbone_hash="b" * 64, jpeg=jpeg, features=schemas.features_to_wire({"features": rng.normal(size=1280)}),
    )  # fmt: skip
    return msg.encode()


def _publisher(port: int, name: str, devices: list[str], count: int, size_kb: int, started: Any, done: Any,
               rate: float) -> None:  # fmt: skip
    """One publisher process: `count` frames round-robin over `devices`, QoS 1, a persistent session (so a
    broker restart loses nothing it has not acknowledged); `rate` frames/s, or 0 for as fast as it goes."""
    import paho.mqtt.client as mqtt

    templates = {d: _template(d, size_kb) for d in devices}
    mark = f"{TS_MARK:.6f}".encode()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{name}", clean_session=False)
    client.max_inflight_messages_set(256)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(1, 2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    acked = threading.Semaphore(0)
    client.on_publish = lambda *a: acked.release()
    started.value = t0 = time.time()
    for i in range(count):
        if rate and (wait := t0 + i / rate - time.time()) > 0:
            time.sleep(wait)
        device = devices[i % len(devices)]
        payload = templates[device].replace(ID_MARK.encode(), f"{name}{i:08d}".ljust(32, "0").encode(), 1)
        payload = payload.replace(mark, f"{time.time():.6f}".encode(), 1)
        client.publish(schemas.topic(device, "frames"), payload, qos=1)
        if i >= 512:
            acked.acquire()  # at most ~512 not yet acknowledged: publish as fast as the broker takes them
    for _ in range(min(count, 512)):
        acked.acquire()
    done.value = time.time()
    client.disconnect()
    client.loop_stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, of the children it has reaped (PostgreSQL's ended backends) and of
    those still running."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for i, p in enumerate([pid, *_children(pid)]):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11 : 15 if i == 0 else 13]) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, work: Path, say: Any) -> None:
        self.work, self.say = work, say
        self.broker = Mosquitto(work / "broker", extra="max_inflight_messages 1000\nmax_queued_bytes 0\n")
        # a folder of its own under /tmp: as root the server runs as `postgres`, which cannot enter `work`
        self.pg_dir = Path(tempfile.mkdtemp(prefix="bouncer-bench-pg-"))
        self.pg = Postgres(self.pg_dir)
        self.s3 = SeaweedFS(work / "s3")
        self.workers: dict[str, subprocess.Popen] = {}
        self.worker_cpu = 0.0  # CPU seconds of the ingest workers stopped so far

    def start(self) -> None:
        self.broker.start()
        self.pg.start()
        self.s3.start()
        os.environ.update(AWS_ACCESS_KEY_ID=self.s3.KEY, AWS_SECRET_ACCESS_KEY=self.s3.SECRET)

    def stop(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        self.s3.stop()
        self.pg.stop()
        self.broker.stop()
        shutil.rmtree(self.pg_dir, ignore_errors=True)

    def start_worker(self, name: str, database: str, objects: str, share: str) -> None:
        folder = self.work / "workers" / name
        folder.mkdir(parents=True, exist_ok=True)
        cfg = folder / "station.toml"
        cfg.write_text(
            f'[station]\ndata_dir = "{folder}"\ndatabase = "{database}"\nobjects = "{objects}"\nworker = "{name}"\n'
            f'share_group = "{share}"\nroles = ["ingest"]\n[mqtt]\nbroker = "{self.broker.url}"\nprotocol = "v5"\n'
            f"[http]\nport = {free_port()}\n"
        )
        log = open(folder / "station.log", "ab")  # noqa: SIM115  # the process keeps it
        seen = log.tell()  # the log of earlier starts: wait for this start's line
        self.workers[name] = subprocess.Popen([sys.executable, "-m", "bouncer", "station", "serve", str(cfg)],
                                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while b"roles " not in (folder / "station.log").read_bytes()[seen:]:
            if self.workers[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start: {(folder / 'station.log').read_text()[-1500:]}")
            time.sleep(0.1)
        self.worker_cpu -= _cpu_s(self.workers[name].pid)  # its start-up (imports, connections) is not ingest

    def server_cpu(self) -> dict[str, float]:
        pids = {"broker": self.broker.proc, "postgres": self.pg.proc, "object store": self.s3.proc}
        return {k: _cpu_s(p.pid) for k, p in pids.items() if p is not None}

    def stop_worker(self, name: str, kill: bool = False) -> None:
        self.worker_cpu += _cpu_s(self.workers[name].pid)
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        proc.wait(timeout=60)

    def rows(self, database: str) -> int:
        import psycopg

        try:
            with psycopg.connect(database, connect_timeout=2) as conn:
                row = conn.execute("SELECT COUNT(*) FROM frames").fetchone()
                return int(row[0]) if row else 0
        except psycopg.Error:
            return -1  # the server is being restarted

    def run(self, workers: int, messages: int, publishers: int, devices: int, size_kb: int,
            faults: bool = False, rate: float = 0.0, timeout_s: float = 600.0) -> dict[str, Any]:  # fmt: skip
        """`rate`: total frames/s (0: as fast as they are taken, where latency is mostly queueing)."""
        database = self.pg.database()
        objects = self.s3.bucket()
        names = [f"w{i}" for i in range(workers)]
        self.worker_cpu = 0.0
        # a share group per run: Mosquitto keeps routing to a stopped member's persistent session (docs/station.md)
        share = f"bench-{uuid.uuid4().hex[:6]}"
        for name in names:
            self.start_worker(name, database, objects, share)
        ctx = mp.get_context("spawn")
        per = messages // publishers
        starts = [ctx.Value("d", 0.0) for _ in range(publishers)]
        ends = [ctx.Value("d", 0.0) for _ in range(publishers)]
        run_id = uuid.uuid4().hex[:4]
        procs = [
            ctx.Process(target=_publisher, args=(
                self.broker.port, f"{run_id}p{p}", [f"cam-{p:02d}-{d:03d}" for d in range(devices // publishers)],
                per, size_kb, starts[p], ends[p], rate / publishers), daemon=True)
            for p in range(publishers)
        ]  # fmt: skip
        total = per * publishers
        cpu0, busy0, wall0 = self.server_cpu(), _busy_s(), time.monotonic()
        for p in procs:
            p.start()
        injected: list[dict[str, Any]] = []
        plan = (
            [(0.2, "worker SIGKILLed"), (0.4, "PostgreSQL restarted"), (0.6, "object store restarted"),
             (0.8, "broker restarted")] if faults else []
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        stored = 0
        while time.monotonic() < deadline:
            stored = self.rows(database)
            if plan and stored >= plan[0][0] * total:
                _, what = plan.pop(0)
                t0 = time.monotonic()
                self._inject(what, names[0], database, objects, share)
                injected.append({"fault": what, "at_rows": stored, "down_s": round(time.monotonic() - t0, 2)})
                self.say(f"  {what} at {stored} rows")
            if stored >= total and not plan and not any(p.is_alive() for p in procs):
                break
            time.sleep(0.25)
        for p in procs:
            p.join(timeout=30)
        for name in list(self.workers):
            self.stop_worker(name)
        cpu1, busy = self.server_cpu(), _busy_s() - busy0
        # (a restarted server starts at 0; PostgreSQL's backends of stopped workers can end unreaped: no figure)
        cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1 if not faults and cpu1[k] >= cpu0.get(k, 0.0)}
        cpu["ingest workers"] = self.worker_cpu
        cpu["everything"] = busy
        wall = time.monotonic() - wall0
        for name in names:  # retire the run's workers: their sessions would keep taking a copy of every frame
            cfg = self.work / "workers" / name / "station.toml"
            res = subprocess.run([sys.executable, "-m", "bouncer", "station", "drain", str(cfg), "--idle-s", "1"],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            if res.returncode:
                raise BouncerError(f"bench station: draining worker {name} failed: {res.stderr.strip()[-800:]}")
        out = self._measure(database, objects, total, min(s.value for s in starts), workers, size_kb, injected)
        out["cpu_s_per_1000"] = {k: round(v / max(out["stored"], 1) * 1000, 2) for k, v in cpu.items()}
        out["cores_busy"] = round(busy / wall, 2)
        return out

    def _inject(self, what: str, worker: str, database: str, objects: str, share: str) -> None:
        if what.startswith("worker"):
            self.stop_worker(worker, kill=True)
            time.sleep(1.0)
            self.start_worker(worker, database, objects, share)  # same id: its persistent session resumes
        elif what.startswith("PostgreSQL"):
            self.pg.stop()
            time.sleep(1.0)
            self.pg.start()
        elif what.startswith("object store"):
            self.s3.stop()
            time.sleep(1.0)
            self.s3.start()
        else:
            self.broker.stop()
            time.sleep(1.0)
            self.broker.start()

    def _measure(self, database: str, objects: str, total: int, first: float, workers: int, size_kb: int,
                 injected: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        import psycopg

        with psycopg.connect(database) as conn:
            rows = conn.execute("SELECT ts, received FROM frames").fetchall()
        from bouncer.station.objects import S3Objects

        n_objects = sum(1 for _ in S3Objects(objects).list(""))
        ts = np.array([r[0] for r in rows])
        received = np.array([r[1] for r in rows])
        span = float(received.max() - first) if len(rows) else float("nan")
        lat = (received - ts) * 1e3
        out: dict[str, Any] = {
            "workers": workers, "published": total, "stored": len(rows), "lost": total - len(rows),
            "objects": n_objects, "msgs_per_s": round(len(rows) / span, 1),
            "mb_per_s": round(len(rows) * size_kb / 1024 / span, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(rows) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(rows) else None,
        }  # fmt: skip
        if injected:
            out["faults"] = injected
        return out


def bench_station(
    messages: int = 10000,
    publishers: int = 2,
    devices: int = 20,
    size_kb: int = 50,
    worker_counts: tuple[int, ...] = (1, 2, 4),
    faults: bool = True,
    say: Any = print,
) -> dict[str, Any]:
    for tool in ("mosquitto",):
        if shutil.which(tool) is None:
            raise BouncerError(f"bench station needs {tool} (apt-get install {tool})")
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        raise BouncerError("bench station needs PostgreSQL's server (apt-get install postgresql)")
    with tempfile.TemporaryDirectory(prefix="bouncer-bench-station-") as tmp:
        try:
            bench = Bench(Path(tmp), say)
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            raise BouncerError(f"bench station: could not set up its servers ({exc})") from None
        bench.start()
        try:
            runs = []
            for n in worker_counts:
                say(f"{n} ingest worker(s): {messages} frames of {size_kb} KB from {devices} devices")
                runs.append(bench.run(n, messages, publishers, devices, size_kb))
                say(f"  {runs[-1]}")
            best = max(runs, key=lambda r: r["msgs_per_s"])
            paced_rate = round(best["msgs_per_s"] / 2)
            say(f"{best['workers']} ingest worker(s), paced at {paced_rate} frames/s (half the best): latency")
            paced = bench.run(best["workers"], messages // 2, publishers, devices, size_kb, rate=paced_rate)
            paced["rate"] = paced_rate
            say(f"  {paced}")
            fault_run = None
            if faults:
                say(f"2 ingest workers, faults injected: {messages} frames at {paced_rate}/s")
                fault_run = bench.run(2, messages, publishers, devices, size_kb, faults=True, rate=paced_rate)
                fault_run["rate"] = paced_rate
                say(f"  {fault_run}")
        finally:
            bench.stop()
    return {"runs": runs, "paced": paced, "faults": fault_run, "cores": os.cpu_count()}


def print_cpu(res: dict[str, Any]) -> None:
    """Where the CPU went, per 1000 frames stored (the run with the most ingest workers)."""
    r = max(res["runs"], key=lambda r: r["workers"])
    parts = ", ".join(f"{k} {v} s" for k, v in r["cpu_s_per_1000"].items())
    print(f"CPU per 1000 frames ({r['workers']} workers, {r['cores_busy']} of {res['cores']} cores busy): {parts}")


def print_station(res: dict[str, Any]) -> None:
    print("| ingest workers | msgs/s | MB/s | p50 ms | p99 ms | published | stored | lost |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["runs"] + [res["paced"]] + ([res["faults"]] if res["faults"] else []):
        label = f"{r['workers']}" + (" + faults" if "faults" in r else "")
        label += f" paced at {r['rate']}/s" if "rate" in r else ""
        print(f"| {label} | {r['msgs_per_s']} | {r['mb_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['published']} "
              f"| {r['stored']} | {r['lost']} |")  # fmt: skip
