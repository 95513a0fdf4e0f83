"""The per-part verdict to the line's PLC over Modbus TCP, against pymodbus's own server on loopback playing the
PLC: every frame's verdict arrives in order; a guard that stops, is killed or is late leaves the line on hold; an
unreachable PLC costs the frame loop nothing."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import BASE, Plc, device_toml, free_port, run_cli, wait_until

from bouncer.sim import simulator

HOLD, ACCEPT, REVIEW, REJECT = 0, 1, 2, 3


def line_config(tmp_path, source: dict, gate, plc_port: int, **line):
    return device_toml(tmp_path / "device.toml", device={"id": "cam-l", "data_dir": str(tmp_path / "d")},
                       source=source, gate={"bundle": str(gate)},
                       line={"modbus": f"modbus://127.0.0.1:{plc_port}", "register": BASE, **line})  # fmt: skip


def test_every_frames_verdict_reaches_the_plc_in_order_and_the_guard_leaves_it_on_hold(sim_gate, tmp_path):
    plc = Plc()
    parts = simulator.write_dataset(tmp_path / "parts", ("gear", "washer", "bolt"), per_class=14, seed=9)
    cfg = line_config(tmp_path, {"uri": str(parts)}, sim_gate, plc.port, deadline_ms=1000.0)
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    verdicts = plc.verdicts()
    assert [s for _, _, s in verdicts] == list(range(1, 43)), "every frame's verdict, in order"
    codes = [c for _, c, _ in verdicts]
    d = summary["decisions"]
    assert (codes.count(ACCEPT), codes.count(REVIEW), codes.count(REJECT)) == (d["accept"], d["review"], d["reject"])
    assert codes.count(ACCEPT) > 0 and codes.count(REVIEW) > 0  # the bolts go to review, never through
    line = summary["line"]["line-modbus"]
    assert line["written"] == 42 and line["late"] == 0 and line["failed"] == 0, line
    assert 0 < line["latency_ms_p50"] <= line["latency_ms_p99"] < 1000, line
    last = plc.writes[-2:]  # the guard stops: the line on hold, health 0
    assert [(a, v) for _, a, v in last] == [(BASE, [HOLD]), (BASE + 3, [0])], last


def test_a_killed_guard_leaves_the_line_on_hold_within_three_heartbeats(sim_gate, tmp_path):
    """The PLC's rule (docs/line.md): act on a verdict when the sequence moves; hold when the heartbeat has not
    moved for three periods. Killing the guard (SIGKILL: it writes nothing more) trips that rule in time."""
    plc = Plc()
    period = 0.2
    cfg = line_config(tmp_path, {"uri": "sim:5", "max_fps": 20.0}, sim_gate, plc.port, heartbeat_s=period)
    proc = subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (len(plc.beats()) < 8 or len(plc.verdicts()) < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(plc.beats()) >= 8 and len(plc.verdicts()) >= 10
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    killed = time.monotonic()
    time.sleep(4 * period)
    beats = plc.beats()
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 3 * period, gaps  # while it ran, the heartbeat never looked stale to the PLC
    last = max(beats)
    assert last <= killed and not [w for w in plc.writes if w[0] > killed], "nothing written after the kill"
    hold_at = last + 3 * period  # when the PLC's rule holds the line
    assert hold_at - killed < 3 * period + 0.1, hold_at - killed


def test_an_unreachable_plc_costs_the_loop_nothing_and_says_so_once(sim_gate, tmp_path):
    parts = simulator.write_dataset(tmp_path / "parts", ("gear",), per_class=20, seed=2)
    cfg = line_config(tmp_path, {"uri": str(parts)}, sim_gate, free_port(), timeout_s=0.2)
    t0 = time.monotonic()
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 20 and summary["line"]["line-modbus"]["written"] == 0, summary
    said = [ln for ln in res.stderr.splitlines() if "unreachable or refusing writes" in ln]
    assert len(said) == 1 and "the PLC's heartbeat check holds the line" in said[0], res.stderr[-2000:]
    assert time.monotonic() - t0 < 120


def test_a_plc_that_refuses_writes_or_answers_late_is_said_once_and_costs_the_loop_nothing(sim_gate, tmp_path):
    """Registers the PLC does not have (it answers with an exception), then a PLC that answers after the write's
    timeout: every such write counts as failed (never as written), the run goes on, the failure is said once.
    What the PLC then does is its rule's job (docs/line.md): a heartbeat that stops moving holds the line."""
    parts = simulator.write_dataset(tmp_path / "parts", ("gear", "bolt"), per_class=10, seed=4)
    refusing = Plc()
    cfg = line_config(tmp_path, {"uri": str(parts)}, sim_gate, refusing.port, register=100)  # 100..105: it has 0..99
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])["line"]["line-modbus"]
    assert line["written"] == 0 and line["failed"] == 20, line
    said = [ln for ln in res.stderr.splitlines() if "refusing writes" in ln]
    assert len(said) == 1 and "refused the write" in said[0], res.stderr[-2000:]

    slow = Plc(delay_s=0.3)
    (tmp_path / "slow").mkdir()
    cfg = line_config(tmp_path / "slow", {"uri": str(parts)}, sim_gate, slow.port, timeout_s=0.1)
    t0 = time.monotonic()
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    line = summary["line"]["line-modbus"]
    assert summary["frames"] == 20 and line["written"] == 0 and line["failed"] >= 1, line  # none answered in time
    assert slow.writes, "the writes reached the PLC; its answers came too late"
    said = [ln for ln in res.stderr.splitlines() if "unreachable or refusing writes" in ln]
    assert len(said) == 1, res.stderr[-2000:]
    assert time.monotonic() - t0 < 90


def test_part_ids_the_plc_writes_travel_with_each_verdict_and_an_unreadable_one_is_part_0(sim_gate, tmp_path):
    """The PLC numbers its parts (32 bits, two registers) and writes the number before it triggers: each verdict
    carries the number that stood when its frame came in, in order. A part-id register the guard cannot read
    gives part 0 (the PLC cannot match it, so it holds the part), said once, and the loop goes on."""
    plc = Plc()
    plc.set(50, [1, 4464])  # part 70000
    cfg = line_config(tmp_path, {"uri": "sim:5", "max_fps": 20.0}, sim_gate, plc.port, part_register=50)
    proc = subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: len(plc.parts()) >= 5, timeout=60)
        plc.set(50, [1, 4465])
        changed = len(plc.parts())
        wait_until(lambda: len(plc.parts()) >= changed + 5, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    ids = [p for _, _, p in plc.parts()]
    assert set(ids) == {70000, 70001} and ids == sorted(ids), ids
    assert ids[:5] == [70000] * 5 and ids[changed + 3 :] == [70001] * len(ids[changed + 3 :]), (changed, ids)
    summary = json.loads(out.strip().splitlines()[-1])
    read = summary["line"]["part_ids"]
    # read as each frame came in; at the stop up to three were read ahead and not decided (the PLC holds those)
    assert read["unread"] == 0 and summary["frames"] <= read["read"] <= summary["frames"] + 3, summary

    parts = simulator.write_dataset(tmp_path / "parts", ("gear",), per_class=12, seed=2)
    (tmp_path / "gone").mkdir()
    cfg = line_config(tmp_path / "gone", {"uri": str(parts)}, sim_gate, plc.port, part_register=99)  # 99, 100: no 100
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 12 and summary["line"]["part_ids"] == {"read": 0, "unread": 12}, summary
    assert summary["line"]["line-modbus"]["written"] == 12, "the verdicts themselves still reach the PLC"
    assert [p for _, _, p in plc.parts()][-12:] == [0] * 12
    said = [ln for ln in res.stderr.splitlines() if "part id from" in ln]
    assert len(said) == 1 and "register 99 unreadable" in said[0], res.stderr[-2000:]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"modbus": "tcp://plc:502"}, "line.modbus: expected modbus://HOST[:PORT]"),
        ({"modbus": "modbus://plc:502", "unit": 300}, "line.unit: Expected `int` <= 247"),
        ({"modbus": "modbus://plc:502", "deadline_ms": 0}, "line.deadline_ms: Expected `float` > 0"),
        ({"modbus": "modbus://plc:502", "verdict": 1}, "line.verdict: unknown key"),
        ({"part_register": 40}, "line.part_register: needs line.modbus"),
    ],
)
def test_a_bad_line_section_is_a_clear_error(sim_gate, tmp_path, line, needle):
    cfg = device_toml(tmp_path / "device.toml", device={"id": "cam-l", "data_dir": str(tmp_path / "d")},
                      source={"uri": "sim:1"}, gate={"bundle": str(sim_gate)}, line=line)  # fmt: skip
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_an_opc_ua_client_reads_each_verdict_and_holds_when_the_guard_dies(sim_gate, tmp_path):
    """`line.opcua`: the device serves its verdicts over OPC UA. A client (asyncua) sees the sequence move with
    counters that add up, the gate's version, a beating heart; when the guard is killed the session drops, which
    the client's rule turns into hold."""
    from asyncua.sync import Client, ThreadLoop

    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/bouncer/"
    cfg = device_toml(tmp_path / "device.toml", device={"id": "cam-u", "data_dir": str(tmp_path / "d")},
                      source={"uri": "sim:7", "max_fps": 20.0}, gate={"bundle": str(sim_gate)},
                      line={"opcua": endpoint, "heartbeat_s": 0.2})  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    tloop = ThreadLoop()  # one event-loop thread for every client attempt, stopped at the end
    tloop.start()
    try:
        deadline = time.monotonic() + 60
        client = None
        while client is None and time.monotonic() < deadline:
            try:
                client = Client(endpoint, timeout=2, tloop=tloop)
                client.connect()
            except Exception:
                client = None
                time.sleep(0.2)
        assert client is not None, "the device serves OPC UA"
        idx = client.get_namespace_index("urn:bouncer:line")
        node = {n: client.nodes.objects.get_child([f"{idx}:Bouncer", f"{idx}:cam-u", f"{idx}:{n}"]) for n in
                ("Verdict", "VerdictName", "Sequence", "Heartbeat", "Health", "GateVersion", "Accepted", "Reviewed",
                 "Rejected")}  # fmt: skip
        while node["Sequence"].read_value() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # served from the start; the first verdict comes after the backbone's first call
        seen, beats = [], []
        while len(seen) < 20 and time.monotonic() < deadline:
            seen.append(node["Sequence"].read_value())
            beats.append(node["Heartbeat"].read_value())
            time.sleep(0.1)
        assert seen == sorted(seen) and seen[-1] > seen[0] > 0 and len(set(beats)) > 3, (seen, beats)
        assert node["Health"].read_value() is True and node["GateVersion"].read_value()
        assert node["VerdictName"].read_value() in ("accept", "review", "reject")
        before = node["Sequence"].read_value()
        total = sum(node[n].read_value() for n in ("Accepted", "Reviewed", "Rejected"))
        after = node["Sequence"].read_value()
        assert before - 1 <= total <= after + 1, (before, total, after)  # the counters add up, reads apart
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with pytest.raises(Exception):  # noqa: B017  # the session is gone: the client's rule says hold
            for _ in range(30):
                node["Heartbeat"].read_value()
                time.sleep(0.1)
        client.disconnect_socket()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        tloop.stop()


def test_bench_line_prints_latency_beside_the_decision_alone(built_models, bouncer_home):
    res = run_cli("bench", "line", "--frames", "60", env={"BOUNCER_HOME": str(bouncer_home)})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["frames"] == 60
    alone = out["decision_alone"]
    for name in ("modbus", "opcua"):
        o = out[name]
        assert o["written"] == 60 and o["failed"] == 0 and o["late"] == 0, o
        # the verdict is written after the decision, so its latency includes it
        assert alone["p50_ms"] * 0.5 < o["latency_ms_p50"] <= o["latency_ms_p99"] < 1000, (alone, o)
    assert "verdict written to the PLC (Modbus TCP)" in res.stdout
