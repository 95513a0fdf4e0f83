"""The per-part verdict to the line's controller over Modbus TCP (pymodbus), fail-safe by design (docs/line.md).

Six holding registers from `line.register` on the PLC: the verdict of the last frame (0 hold, 1 accept, 2 review,
3 reject), its sequence number (frames since start, modulo 65536), a heartbeat counter the guard advances every
`line.heartbeat_s`, health (1 while the guard runs with a gate, 0 when it stops), and the frame's part id (a
triggered camera's trigger count, 32 bits, high word first; 0 for sources without parts). A verdict is one write
of all six, so the PLC never reads a sequence with another frame's verdict or part. The PLC acts on a verdict
when its sequence changes, and holds the part when the heartbeat stops moving for a few periods: a guard that
crashed, hung or lost its network can never leave "accept" standing. A verdict decided later than
`line.deadline_ms` after its frame came in is written as hold, not as the verdict the part has already passed;
a camera lost or silent past `camera.trigger_timeout_s` writes hold (sequence unchanged) until frames come again.

Writes happen on their own thread: the frame loop hands over (code, sequence, time in) and never waits for the
PLC. A PLC that is unreachable, refuses writes or answers slowly is logged once per change of state, retried at
the heartbeat, and costs the loop nothing; meanwhile the PLC sees no heartbeat and holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any
from urllib.parse import urlparse

import numpy as np

from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime.config import LineSection
from bouncer.runtime.errors import BouncerError

log = logging.getLogger("bouncer.line")
CODES = {"hold": 0, "accept": 1, "review": 2, "reject": 3}
HOLD_EVENTS = ("camera_lost", "trigger_timeout")  # no frame is coming: nothing may stand as the last verdict


def parse_modbus_url(url: str) -> tuple[str, int]:
    u = urlparse(url)
    if u.scheme != "modbus" or not u.hostname:
        raise BouncerError(f"line.modbus: expected modbus://HOST[:PORT], got {url!r}")
    try:
        return u.hostname, u.port or 502
    except ValueError:
        raise BouncerError(f"line.modbus: bad port in {url!r}") from None


class LineOutput(Output):
    """What every way of telling the line shares: the hand-over from the frame loop (never blocking), the deadline,
    the writer thread with its heartbeat, the hold on the way out, the figures. A subclass says how a verdict, a
    heartbeat and the final hold are written (`_verdict`, `_beat`, `_final`), each returning whether it worked."""

    name = "line"
    section = "line"

    def __init__(self, deadline_ms: float, heartbeat_s: float) -> None:
        self.deadline_s, self.heartbeat_s = deadline_ms / 1000, heartbeat_s
        self._q: queue.Queue[tuple[int, int | None, int, float] | None] = queue.Queue(maxsize=10000)
        self.latencies: list[float] = []  # seconds from frame in to verdict written
        self.written = self.late = self.failed = self.dropped = 0
        self._beat_n = 0
        self._gate: str | None = None  # the gate version last shown
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- the frame loop's side --------------------------------------------------------------------

    def verdict(self, decision: str, sequence: int, t_in: float, part: int | None = None) -> None:
        """Hand over a frame's verdict (t_in: time.perf_counter() when the frame came in); never blocks."""
        code = CODES[decision]
        if time.perf_counter() - t_in > self.deadline_s:
            code = CODES["hold"]  # too late for the part it belongs to
            self.late += 1
        self._put((code, sequence, part or 0, t_in))

    def _put(self, item: tuple[int, int | None, int, float]) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind in HOLD_EVENTS:
            self._put((CODES["hold"], None, 0, time.perf_counter()))

    def frame(self, done: FrameDone) -> None:
        self.verdict(done.decision.decision, done.sequence, done.t_in, done.item.part)
        if done.gate_version != self._gate:
            if self._gate is not None:
                self.set_gate(done.gate_version)
            self._gate = done.gate_version

    def set_gate(self, version: str) -> None:
        """The gate now deciding (a swap over the air); outputs that show it override this."""

    def stop(self) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then leave the line on hold (health 0)."""
        if self._thread.ident is not None:  # started
            self._q.put(None)
            self._thread.join(timeout)
        self._final()

    def report(self) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1e3
        return {"written": self.written, "late": self.late, "failed": self.failed, "dropped": self.dropped,
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 3) if len(lat) else None}  # fmt: skip

    # ---- the writer thread ------------------------------------------------------------------------

    def _verdict(self, code: int, sequence: int, part: int) -> bool:
        raise NotImplementedError

    def _hold(self) -> bool:
        """The verdict register to hold, sequence unchanged (no frame is coming)."""
        raise NotImplementedError

    def _beat(self, n: int) -> bool:
        raise NotImplementedError

    def _final(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._beat_n = (self._beat_n + 1) & 0xFFFF
                self._beat(self._beat_n)
                next_beat = now + self.heartbeat_s
            try:
                item = self._q.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                continue
            if item is None:
                return
            code, seq, part, t_in = item
            if seq is None:
                self._hold()
            elif self._verdict(code, seq, part):
                self.written += 1
                self.latencies.append(time.perf_counter() - t_in)
            else:
                self.failed += 1


def _modbus_client(url: str, timeout_s: float) -> Any:
    try:
        from pymodbus.client import ModbusTcpClient
    except ImportError:
        raise BouncerError("line.modbus needs pymodbus (the [line] extra): pip install 'bouncer[line]'") from None
    host, port = parse_modbus_url(url)
    return ModbusTcpClient(host, port=port, timeout=timeout_s, retries=0)


class ModbusPartId:
    """The part id the PLC writes into two holding registers (`line.part_register`, high word first) before it
    triggers the camera, read as the frame comes in: the PLC's own numbering travels with the verdict, so parts
    can be matched even across a guard restart or a camera reconnect, where a trigger count starts again.

    The read is in the frame loop (the id must be the one of this frame's part, not a later one) with its own
    budget (`line.part_timeout_ms`) and its own connection (the verdict writer's is another thread's). An
    unanswered read gives part id 0, which the PLC cannot match and so holds, and is logged once per change of
    state; after a failure reads resume at the heartbeat, so a PLC that is gone costs the loop one timeout per
    `line.heartbeat_s`, not one per frame."""

    def __init__(self, url: str, unit: int, register: int, timeout_ms: float, retry_s: float) -> None:
        self.client = _modbus_client(url, timeout_ms / 1000)
        self.url, self.unit, self.register, self.retry_s = url, unit, register, retry_s
        self.read_ok = self.unread = 0
        self._ok: bool | None = None
        self._next_try = 0.0

    def read(self) -> int:
        if self._ok is False and time.monotonic() < self._next_try:
            self.unread += 1
            return 0
        try:
            if not self.client.connected and not self.client.connect():
                raise ConnectionError("no connection")
            rr = self.client.read_holding_registers(self.register, count=2, device_id=self.unit)
            if rr.isError() or len(rr.registers) != 2:
                raise ConnectionError(f"the PLC refused the read ({rr})")
        except Exception as exc:  # pymodbus raises ModbusException, ConnectionError, OSError ...
            if self._ok is not False:
                log.error("line: part id from %s register %d unreadable (%s); verdicts carry part 0 (the PLC "
                          "holds those parts) until it answers", self.url, self.register, exc)  # fmt: skip
            self._ok, self._next_try = False, time.monotonic() + self.retry_s
            self.client.close()
            self.unread += 1
            return 0
        if self._ok is False:
            log.warning("line: part id from %s readable again", self.url)
        self._ok = True
        self.read_ok += 1
        hi, lo = rr.registers
        return (hi << 16) | lo

    def report(self) -> dict[str, int]:
        return {"read": self.read_ok, "unread": self.unread}

    def close(self) -> None:
        self.client.close()


def part_id_reader(c: LineSection) -> ModbusPartId | None:
    """The PLC's part ids, when the configuration says the PLC writes them (`line.part_register`)."""
    if c.part_register is None:
        return None
    return ModbusPartId(c.modbus, c.unit, c.part_register, c.part_timeout_ms, c.heartbeat_s)


class ModbusLine(LineOutput):
    name = "line-modbus"

    def __init__(self, url: str, unit: int, register: int, deadline_ms: float, heartbeat_s: float,
                 timeout_s: float) -> None:  # fmt: skip
        self.client = _modbus_client(url, timeout_s)
        super().__init__(deadline_ms, heartbeat_s)
        self.host, self.port = parse_modbus_url(url)
        self.unit, self.base = unit, register
        self._ok: bool | None = None  # the PLC's state as last logged

    def _verdict(self, code: int, sequence: int, part: int) -> bool:
        part &= 0xFFFFFFFF
        return self._write(self.base, [code, sequence & 0xFFFF, self._beat_n, 1, part >> 16, part & 0xFFFF])

    def _hold(self) -> bool:
        return self._write(self.base, [CODES["hold"]])

    def _beat(self, n: int) -> bool:
        return self._write(self.base + 2, [n, 1])  # heartbeat, health

    def _final(self) -> None:
        self._write(self.base, [CODES["hold"]])
        self._write(self.base + 3, [0])
        self.client.close()

    def _write(self, address: int, values: list[int]) -> bool:
        try:
            if not self.client.connected and not self.client.connect():
                raise ConnectionError("no connection")
            rr = self.client.write_registers(address, values, device_id=self.unit)
            if rr.isError():
                raise ConnectionError(f"the PLC refused the write ({rr})")
        except Exception as exc:  # pymodbus raises ModbusException, ConnectionError, OSError ...
            if self._ok is not False:
                log.error("line: PLC at %s:%d unreachable or refusing writes (%s); verdicts not delivered, the "
                          "PLC's heartbeat check holds the line", self.host, self.port, exc)  # fmt: skip
            self._ok = False
            self.client.close()
            return False
        if self._ok is False:
            log.warning("line: PLC at %s:%d reachable again", self.host, self.port)
        self._ok = True
        return True
