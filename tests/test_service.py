"""`bouncer run` as a supervised service: the sd_notify protocol against a socket this test listens on, playing
systemd's part (Type=notify, WatchdogSec, Restart=always), and the unit file `bouncer install` writes, checked by
systemd's own `systemd-analyze verify`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import device_toml, run_cli

from bouncer.sim import simulator

WATCHDOG_S = 2.0


class Supervisor:
    """What systemd does with a Type=notify service: wait for READY=1, expect WATCHDOG=1 at least every
    WatchdogSec, kill a service that misses it (SIGABRT, then SIGKILL) and start it again."""

    def __init__(self, tmp: Path, argv: list[str]) -> None:
        self.path = tmp / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.argv = argv
        self.log: list[tuple[int, str]] = []  # (start number, message)
        self.starts = 0
        self.kills = 0

    def start(self) -> subprocess.Popen:
        self.starts += 1
        env = {**os.environ, "NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ready_at: float | None = None
        self.last_ping = time.monotonic()
        return self.proc

    def poll(self) -> None:
        try:
            data = self.sock.recv(4096).decode()
        except TimeoutError:
            data = ""
        for line in data.splitlines():
            self.log.append((self.starts, line))
            if line == "READY=1":
                self.ready_at = self.last_ping = time.monotonic()
            elif line == "WATCHDOG=1":
                self.last_ping = time.monotonic()
        if self.ready_at is not None and self.proc.poll() is None and time.monotonic() - self.last_ping > WATCHDOG_S:
            self.kills += 1  # the watchdog ran out: systemd's SIGABRT, then SIGKILL
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.start()  # Restart=always

    def messages(self, start: int) -> list[str]:
        return [m for s, m in self.log if s == start]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.sock.close()


def test_a_hung_loop_is_restarted_by_the_watchdog_and_resumes_with_nothing_lost(sim_gate, tmp_path):
    frames = simulator.write_dataset(tmp_path / "line", ("gear", "washer"), per_class=60, seed=4)
    n = len([p for p in frames.rglob("*.png")])
    cfg = device_toml(tmp_path / "device.toml", device={"id": "cam-s", "data_dir": str(tmp_path / "state")},
                      source={"uri": str(frames), "max_fps": 25.0}, gate={"bundle": str(sim_gate)})  # fmt: skip
    sup = Supervisor(tmp_path, [sys.executable, "-m", "bouncer", "run", str(cfg), "--once"])
    sup.start()
    try:
        deadline = time.monotonic() + 120
        while sup.messages(1).count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            sup.poll()
        assert sup.messages(1)[0] == "READY=1" and any(m.startswith("STATUS=guarding") for m in sup.messages(1))
        assert sup.proc.poll() is None, "still running: the frames last several seconds at 25 fps"
        sup.proc.send_signal(signal.SIGSTOP)  # the loop hangs (as on a stuck camera read): no more watchdog
        while sup.starts < 2 and time.monotonic() < deadline:
            sup.poll()
        assert sup.kills == 1 and sup.starts == 2
        while sup.proc.poll() is None and time.monotonic() < deadline:
            sup.poll()
        out, err = sup.proc.communicate(timeout=30)
        assert sup.proc.returncode == 0, err[-2000:]
        summary = json.loads(out.strip().splitlines()[-1])
        # the restart resumed the folder where the hung run had stored its last frame: every frame decided, once
        assert summary["skipped_done"] > 0 and summary["frames"] + summary["skipped_done"] == n, summary
        second = sup.messages(2)
        assert second[0] == "READY=1" and "WATCHDOG=1" in second and second[-1] == "STOPPING=1", second
    finally:
        sup.close()


def test_without_systemd_nothing_is_sent_and_the_run_is_the_same(sim_gate, tmp_path):
    from bouncer.devices.systemd import Notifier

    assert not Notifier(None, None).active
    Notifier(None, 1.0).alive()  # no socket: a no-op, never an error
    os.environ.pop("NOTIFY_SOCKET", None)
    assert not Notifier.from_env().active


def test_the_unit_file_is_one_systemd_accepts(sim_gate, tmp_path):
    cfg = device_toml(
        tmp_path / "device.toml",
        device={"id": "cam-9", "data_dir": "/var/lib/bouncer/cam-9"},
        source={"uri": "0"},
        gate={"bundle": str(sim_gate)},
        mqtt={"broker": "mqtt://broker:1883"},
    )
    res = run_cli("install", str(cfg), "--unit-dir", str(tmp_path / "units"), "--watchdog", "20")
    assert res.returncode == 0, res.stderr[-2000:]
    unit = tmp_path / "units" / "bouncer-cam-9.service"
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=20", "Restart=always", "User=bouncer", "StateDirectory=bouncer",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/bouncer",
                 f"ExecStart={sys.executable} -m bouncer run {cfg.resolve()}"):  # fmt: skip
        assert line in text.splitlines(), (line, text)
    assert "systemctl daemon-reload && systemctl enable --now bouncer-cam-9.service" in res.stdout
    analyze = shutil.which("systemd-analyze")
    assert analyze, "scripts/test installs systemd for systemd-analyze"
    check = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not check.stderr.strip(), check.stderr
    # bad input: a data_dir the service could not write, no device id, a bad user name
    outside = device_toml(tmp_path / "out.toml", device={"id": "cam-9", "data_dir": "/home/x"},
                          source={"uri": "0"}, gate={"bundle": str(sim_gate)})  # fmt: skip
    res = run_cli("install", str(outside), "--print")
    assert res.returncode == 2 and "lies outside /var/lib/bouncer" in res.stderr, res.stderr
    res = run_cli("install", str(cfg), "--print", "--user", "Root Admin")
    assert res.returncode == 2 and "--user 'Root Admin'" in res.stderr, res.stderr
