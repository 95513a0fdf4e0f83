"""What the fleet page draws on a time axis, per group: each device's flag rate and outbox depth (from the stats
the devices send every `metrics.stats_every_s`), each drift signal's CUSUM statistic against its alarm line, the
review backlog (frames received and not yet labelled at each moment), and gate versions as markers (published at
the station, committed on each device)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bouncer.station.store import Store

BACKLOG_POINTS = 60


def device_series(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One device's stats messages, oldest first -> its series. The flag rate of an interval is the share of the
    frames it processed that were sent to review or rejected (null when it processed none: a restart resets
    the counters, so a drop in `frames` starts afresh)."""
    ts: list[float] = []
    rate: list[float | None] = []
    outbox: list[Any] = []
    drift: dict[str, list[Any]] = {}
    prev: tuple[int, int] | None = None
    for p in points:
        dec = p.get("decisions") or {}
        flagged, frames = int(dec.get("review", 0)) + int(dec.get("reject", 0)), int(p.get("frames") or 0)
        r = None
        if prev is not None and frames > prev[1]:
            r = round(max(flagged - prev[0], 0) / (frames - prev[1]), 4)
        prev = (flagged, frames)
        ts.append(float(p["ts"]))
        rate.append(r)
        outbox.append(p.get("outbox_depth"))
        for name, value in (p.get("drift_stats") or {}).items():
            drift.setdefault(name, [None] * (len(ts) - 1)).append(value)
        for values in drift.values():
            values.extend([None] * (len(ts) - len(values)))
    h = (points[-1].get("drift_h") or {}) if points else {}
    return {"ts": ts, "flag_rate": rate, "outbox_depth": outbox, "drift": drift,
            "alarm": {name: h.get("rate" if name.endswith("_rate") else "signal") for name in drift}}  # fmt: skip


def group_series(store: Store, group: str, minutes: float = 60.0, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    since = now - minutes * 60
    by_device: dict[str, list[dict[str, Any]]] = {}
    for p in store.stats_history(since):
        if (p.get("group") or "default") == group and "ts" in p:
            by_device.setdefault(p["device"], []).append(p)
    devices = {d: device_series(sorted(ps, key=lambda p: p["ts"])) for d, ps in sorted(by_device.items())}
    starts = [s["ts"][0] for s in devices.values() if s["ts"]]
    t0 = min([*starts, now]) if starts else since
    times = [float(t) for t in np.linspace(t0, now, BACKLOG_POINTS)]
    markers = [{"ts": float(e["ts"]), "device": e["device"], "version": e.get("version"), "event": e["event"]}
               for e in store.events("gate_commit", 500) if e["device"] in by_device and e["ts"] >= since]  # fmt: skip
    published = [g for g in store.gates(group) if g["role"] in ("champion", "retired") and g["created"] >= since]
    markers += [{"ts": float(g["created"]), "device": None, "version": g["version"], "event": "published"}
                for g in published]  # fmt: skip
    return {
        "group": group,
        "since": since,
        "now": now,
        "devices": devices,
        "backlog": {"ts": times, "unlabelled": store.backlog(group, times)},
        "gates": sorted(markers, key=lambda m: m["ts"]),
    }
