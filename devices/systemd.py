"""`bouncer run` as a systemd service: the sd_notify protocol (READY, WATCHDOG, STATUS, STOPPING) and the unit file
`bouncer install` writes.

The protocol is one datagram per message on the socket systemd names in $NOTIFY_SOCKET; with `WatchdogSec=` set,
systemd also passes $WATCHDOG_USEC and restarts the service when no WATCHDOG=1 arrives in time. The frame loop
feeds it once per frame (at most twice per period), so a loop stuck on a camera read, a model call or a full disk
is restarted, while a loop that merely waits between frames at its frame rate is not. Written here rather than
taken from a library: the whole protocol is a datagram, and the libraries that speak it need libsystemd headers to
build (systemd-python) or are unmaintained (sdnotify).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

from bouncer.runtime.errors import BouncerError


class Notifier:
    """sd_notify to $NOTIFY_SOCKET; does nothing when the process was not started by systemd."""

    def __init__(self, address: str | None, watchdog_s: float | None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._sock: socket.socket | None = None
        self._last = 0.0
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._target = "\0" + address[1:] if address.startswith("@") else address  # abstract namespace

    @classmethod
    def from_env(cls) -> Notifier:
        address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watchdog = None
        if usec and (not pid or pid == str(os.getpid())):  # the watchdog is this process's, not a parent's
            try:
                watchdog = int(usec) / 1e6
            except ValueError:
                print(f"bouncer: ignoring WATCHDOG_USEC={usec!r}: not an integer", file=sys.stderr)
        return cls(address, watchdog)

    @property
    def active(self) -> bool:
        return self._sock is not None

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self._target)
        except OSError as exc:  # systemd gone or the socket unreachable: the service runs on without it
            print(f"bouncer: sd_notify to {self.address}: {exc}", file=sys.stderr)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def alive(self) -> None:
        """Feed the watchdog (rate-limited to twice per watchdog period)."""
        if self.watchdog_s is None or self._sock is None:
            return
        now = time.monotonic()
        if now - self._last >= self.watchdog_s / 2:
            self._last = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")


UNIT = """\
# Bouncer guard, written by `bouncer install` (docs/service.md)
[Unit]
Description=Bouncer guard for camera {device}
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m bouncer run {config}
Environment=BOUNCER_HOME={state}/models
WorkingDirectory={state}
User={user}
Group={user}
StateDirectory={state_name}
# a frame loop that stops feeding the watchdog (a stuck camera read, a hung model call) is killed and restarted
WatchdogSec={watchdog}
Restart=always
RestartSec=2
TimeoutStopSec=30
# the guard reads its camera and its files and talks to the broker; nothing else
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={state}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictNamespaces=yes
SystemCallArchitectures=native
SupplementaryGroups=video

[Install]
WantedBy=multi-user.target
"""


def unit_file(config: Path, device: str, user: str = "bouncer", name: str = "bouncer", watchdog_s: int = 30,
              python: str | None = None) -> str:  # fmt: skip
    """The service unit for one camera's config; its state (outbox, gate slots, models) lives in /var/lib/NAME,
    where the config's `device.data_dir` should point."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise BouncerError(f"--name {name!r}: a folder name under /var/lib (letters, digits, _ . -)")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise BouncerError(f"--user {user!r}: a system user name")
    if watchdog_s < 2:
        raise BouncerError("--watchdog: at least 2 seconds")
    return UNIT.format(device=device, python=python or sys.executable, config=config.resolve(),
                       state=f"/var/lib/{name}", state_name=name, user=user, watchdog=watchdog_s)  # fmt: skip
