"""The per-part verdict as an OPC UA server (asyncua), for lines whose controller or SCADA reads OPC UA
(docs/line.md).

Under Objects/Bouncer/<device id>: `Verdict` (Int16: 0 hold, 1 accept, 2 review, 3 reject), `VerdictName`,
`Sequence` (UInt32, frames since start), `PartId` (UInt64: a triggered camera's part, 0 without parts),
`Heartbeat` (UInt32, advanced every `line.heartbeat_s`), `Health` (Boolean), `GateVersion` (String) and the
counters `Accepted`, `Reviewed`, `Rejected` (UInt64). A verdict and its part are written before its sequence, so
a client that acts when `Sequence` changes reads that frame's verdict and part. The same fail-safe rules as
Modbus: late verdicts are written as hold, so is the verdict while the camera is lost or silent, the guard leaves
hold and Health false on its way out, and a client holds the line when the heartbeat stops moving or the session
drops (a killed guard).
"""

from __future__ import annotations

import logging
from typing import Any

from bouncer.devices.plc import CODES, LineOutput
from bouncer.runtime.errors import BouncerError

log = logging.getLogger("bouncer.line")
NAMES = {v: k for k, v in CODES.items()}
NAMESPACE = "urn:bouncer:line"


class OpcUaLine(LineOutput):
    name = "line-opcua"

    def __init__(self, endpoint: str, device: str, gate_version: str, deadline_ms: float, heartbeat_s: float) -> None:
        try:
            from asyncua import ua
            from asyncua.sync import Server, ThreadLoop
        except ImportError:
            raise BouncerError("line.opcua needs asyncua (the [line] extra): pip install 'bouncer[line]'") from None
        if not endpoint.startswith("opc.tcp://"):
            raise BouncerError(f"line.opcua: expected opc.tcp://HOST:PORT/PATH, got {endpoint!r}")
        super().__init__(deadline_ms, heartbeat_s)
        self.ua = ua
        for noisy in ("asyncua", "asyncua.server", "asyncua.uaprotocol"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        self.tloop = ThreadLoop()
        self.tloop.start()
        self.server = Server(tloop=self.tloop)
        self.server.set_endpoint(endpoint)
        self.server.set_server_name(f"Bouncer guard {device}")
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])  # plant network; see docs/line.md
        idx = self.server.register_namespace(NAMESPACE)
        root = self.server.nodes.objects.add_object(idx, "Bouncer").add_object(idx, device)
        V = ua.VariantType
        kinds = {"Verdict": (0, V.Int16), "VerdictName": ("hold", V.String), "PartId": (0, V.UInt64),
                 "Sequence": (0, V.UInt32),
                 "Heartbeat": (0, V.UInt32), "Health": (True, V.Boolean), "GateVersion": (gate_version, V.String),
                 "Accepted": (0, V.UInt64), "Reviewed": (0, V.UInt64), "Rejected": (0, V.UInt64)}  # fmt: skip
        self.nodes = {name: root.add_variable(idx, name, value, varianttype=kind) for name, (value, kind) in
                      kinds.items()}  # fmt: skip
        self.counts = {"Accepted": 0, "Reviewed": 0, "Rejected": 0}
        try:
            self.server.start()
        except OSError as exc:
            self.tloop.stop()
            raise BouncerError(f"line.opcua: cannot serve {endpoint} ({exc})") from None

    def _set(self, values: dict[str, Any]) -> bool:
        V = self.ua.VariantType
        kinds = {"Verdict": V.Int16, "VerdictName": V.String, "PartId": V.UInt64, "Sequence": V.UInt32,
                 "Heartbeat": V.UInt32,
                 "Health": V.Boolean, "GateVersion": V.String, "Accepted": V.UInt64, "Reviewed": V.UInt64,
                 "Rejected": V.UInt64}  # fmt: skip
        try:
            for name, value in values.items():
                self.nodes[name].write_value(self.ua.Variant(value, kinds[name]))
        except Exception as exc:  # the server's loop gone: nothing more can be said to clients
            log.error("line: OPC UA server: %s", exc)
            return False
        return True

    def _verdict(self, code: int, sequence: int, part: int) -> bool:
        counter = {1: "Accepted", 2: "Reviewed", 3: "Rejected"}.get(code)
        if counter:
            self.counts[counter] += 1
        extra = {counter: self.counts[counter]} if counter else {}
        return self._set({"Verdict": code, "VerdictName": NAMES[code], "PartId": part, **extra,
                          "Sequence": sequence & 0xFFFFFFFF})  # fmt: skip

    def _hold(self) -> bool:
        return self._set({"Verdict": CODES["hold"], "VerdictName": "hold"})

    def _beat(self, n: int) -> bool:
        return self._set({"Heartbeat": n, "Health": True})

    def set_gate(self, version: str) -> None:
        self._set({"GateVersion": version})

    def _final(self) -> None:
        self._set({"Verdict": CODES["hold"], "VerdictName": "hold", "Health": False})
        try:
            self.server.stop()
        finally:
            self.tloop.stop()
