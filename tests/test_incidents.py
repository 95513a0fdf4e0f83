"""Incidents: flagged frames that belong together, labelled with one key; grouped by kind, time and vector."""

from __future__ import annotations

import numpy as np

from bouncer.station.incidents import GAP_S, group_frames
from bouncer.station.store import Frame, pack_features


def frame(i: int, ts: float, decision: str = "review", reasons: tuple[str, ...] = ("ood",)) -> Frame:
    return Frame(id=f"f{i:04d}", group="default", device="cam-1", ts=ts, received=ts, source=None, decision=decision,
                 predicted="gear", confidence=0.5, ood_score=9.0, reasons=list(reasons), details=[], quality={},
                 gate_version="1", label_kind=None, label=None, heatmap_path=None, audit=0)  # fmt: skip


def test_frames_group_by_kind_time_and_vector():
    rng = np.random.default_rng(0)
    giraffe, bolt = rng.normal(size=64), rng.normal(size=64)  # two unknown part types, seen interleaved
    frames, vectors = [], {}
    for i in range(20):
        f = frame(i, 100.0 + i)
        frames.append(f)
        base = giraffe if i % 2 else bolt
        vectors[f.id] = pack_features({"features": (base + 0.2 * rng.normal(size=64)).astype(np.float32)})
    for i in range(20, 26):  # a smeared lens: rejected by the quality gate, no vector
        f = frame(i, 130.0 + i, "reject", ("blur",))
        frames.append(f)
        vectors[f.id] = None
    frames.append(frame(99, 140.0, "reject", ("dark", "occluded")))  # a lens cap, another kind of reject
    late = frame(100, 125.0 + GAP_S + 1)  # a giraffe again after a long pause: a new incident
    frames.append(late)
    vectors[late.id] = pack_features({"features": giraffe.astype(np.float32)})
    incidents = group_frames(frames[::-1], vectors)  # any order in
    sizes = sorted((len(i.frames), i.kind) for i in incidents)
    assert sizes == [(1, ("dark", "occluded")), (1, ("ood",)), (6, ("blur",)), (10, ("ood",)), (10, ("ood",))]
    for inc in incidents:  # each incident is one thing
        ids = {int(f.id[1:]) for f in inc.frames}
        assert ids <= set(range(1, 20, 2)) or ids <= set(range(0, 20, 2)) or len(inc.frames) <= 6 or ids == {100}
    d = incidents[0].to_dict(preview=4)
    assert d["count"] == len(d["frame_ids"]) and len(d["preview"]) <= 4 and d["first_ts"] <= d["last_ts"]
    assert [i.frames[0].ts for i in incidents] == sorted(i.frames[0].ts for i in incidents)  # oldest first


def test_device_series_rates_restarts_and_late_signals():
    from bouncer.station.series import device_series

    def point(ts: float, frames: int, review: int, reject: int, drift: dict[str, float]) -> dict:
        return {"ts": ts, "frames": frames, "decisions": {"accept": frames - review - reject, "review": review,
                "reject": reject}, "outbox_depth": 2, "drift_stats": drift,
                "drift_h": {"signal": 20.0, "rate": 14.0}}  # fmt: skip

    s = device_series([point(1, 100, 5, 5, {"brightness": 0.5}), point(2, 200, 10, 15, {"brightness": 1.5}),
                       point(3, 50, 1, 0, {"brightness": 0.0, "review_rate": 2.0}),  # restarted: counters reset
                       point(4, 150, 11, 0, {"brightness": 3.0, "review_rate": 4.0})])  # fmt: skip
    assert s["ts"] == [1, 2, 3, 4] and s["flag_rate"] == [None, 0.15, None, 0.1]
    assert s["drift"] == {"brightness": [0.5, 1.5, 0.0, 3.0], "review_rate": [None, None, 2.0, 4.0]}
    assert s["alarm"] == {"brightness": 20.0, "review_rate": 14.0} and s["outbox_depth"] == [2, 2, 2, 2]
    assert device_series([]) == {"ts": [], "flag_rate": [], "outbox_depth": [], "drift": {}, "alarm": {}}
