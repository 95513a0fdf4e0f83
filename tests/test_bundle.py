"""Gate bundles: round trip, size, and every kind of corrupt or hostile file refused with a clear error."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bouncer.fitting.fit import fit_logistic
from bouncer.fitting.select import conformal_quantile
from bouncer.runtime.gates.bundle import Acceptance, BundleError, GateBundle
from bouncer.runtime.gates.heads import Fusion, GaussianHead, KnnHead
from bouncer.runtime.gates.quality import QualityGate, quality_stats
from bouncer.runtime.preprocess import Preprocessing
from bouncer.sim import simulator


def synthetic_bundle(n_classes: int = 16, per_class: int = 60) -> GateBundle:
    """A bundle with the default backbone's dimensions, fitted on random features."""
    rng = np.random.default_rng(0)
    n = n_classes * per_class
    y = np.repeat(np.arange(n_classes), per_class)
    feats = rng.normal(size=(n_classes, 1280))[y] + rng.normal(size=(n, 1280))
    pool = rng.normal(size=(n, 192))
    fmap = np.abs(rng.normal(size=(n, 112, 14, 14))).astype(np.float32)
    heads = [KnnHead.fit("pool_s32", pool), KnnHead.fit("map_s16", fmap, reduce="max")]
    raw = np.column_stack([h.score({h.source: x}) for h, x in zip(heads, (pool, fmap), strict=True)])
    baseline = GaussianHead.fit("features", feats, y, spatial=False)
    frames = [simulator.render("gear", rng) for _ in range(20)]
    return GateBundle(
        version="7",
        created="2026-11-27T00:00:00+00:00",
        backbone_hash="ab" * 32,
        backbone_name="lite0",
        classes=[f"c{i}" for i in range(n_classes)],
        preprocessing=Preprocessing(),
        quality=QualityGate.fit([quality_stats(f)[0] for f in frames]),
        task=fit_logistic(feats, y, n_classes, iters=50),
        ood_heads=heads,
        fusion=Fusion.fit(["knn:pool_s32", "knn:map_s16@max"], raw),
        ood_threshold=2.5,
        ood_quantile=0.99,
        acceptance=Acceptance(0.97, 0.99, 0.1, 0.009, 400, 300, 0, 230),
        fit_metrics={"train_images": n},
        baseline=baseline,
        baseline_threshold=conformal_quantile(baseline.score_vectors(feats), 0.99),
        selection={"rule": "named with --heads", "chosen": {"heads": ["knn:pool_s32", "knn:map_s16@max"]}},
        explainer=heads[1],
    )


@pytest.fixture(scope="module")
def bundle() -> GateBundle:
    return synthetic_bundle()


def test_round_trip_and_size(bundle, tmp_path):
    path = bundle.save(tmp_path / "g.gate")
    assert path.stat().st_size < 10_000_000, path.stat().st_size  # 16 classes, 960 training frames
    back = GateBundle.load(path)
    assert back.classes == bundle.classes and back.acceptance == bundle.acceptance
    assert back.quality == bundle.quality and back.baseline_threshold == bundle.baseline_threshold
    x = np.random.default_rng(1).normal(size=(3, 1280))
    np.testing.assert_allclose(back.task.probs(x), bundle.task.probs(x), rtol=1e-6)
    fmap = np.abs(np.random.default_rng(2).normal(size=(3, 112, 14, 14)))
    out = {"map_s16": fmap}
    np.testing.assert_allclose(back.ood_heads[1].score(out), bundle.ood_heads[1].score(out), rtol=1e-6)
    raw = np.random.default_rng(3).gamma(2.0, 1.0, (5, 2)).astype(np.float32)
    np.testing.assert_array_equal(back.fusion.fuse(raw), bundle.fusion.fuse(raw))
    assert back.fusion.method == "max" and back.selection == bundle.selection
    assert back.explainer is not None and back.explainer.source == "map_s16" and back.explainer.reduce == "max"
    names = zipfile.ZipFile(path).namelist()
    assert sorted(names) == ["arrays.npz", "gate.json"]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def _rewrite(path: Path, out: Path, meta_fn=None, arrays_fn=None) -> Path:
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("gate.json"))
        arrays = dict(np.load(io.BytesIO(z.read("arrays.npz"))))
    if meta_fn:
        meta_fn(meta)
    if arrays_fn:
        arrays_fn(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("gate.json", json.dumps(meta))
        z.writestr("arrays.npz", buf.getvalue())
    return out


@pytest.mark.parametrize(
    "meta_fn,arrays_fn,msg",
    [
        (lambda m: m.update(format="other"), None, "not a Bouncer gate bundle"),
        (lambda m: m.update(format_version=99), None, "format version 99"),
        (lambda m: m.pop("classes"), None, "classes"),
        (lambda m: m["classes"].pop(), None, "does not match"),
        (lambda m: m["task"].update(temperature=-1), None, "temperature"),
        (lambda m: m["task"].update(kind="magic"), None, "unknown task kind 'magic'"),
        (lambda m: m["task"].update(kind="scores", score_kind="odds"), None, "score_kind 'odds'"),
        (lambda m: m["task"].update(kind="anomaly"), None, "task.reference"),
        (None, lambda a: a.update({"task.bias": np.zeros(3, np.float32)}), "does not match 16 classes"),
        (lambda m: m["ood"]["heads"][0].update(kind="magic"), None, "unknown OOD head kind"),
        (lambda m: m["ood"]["heads"][0].update(k=10**6), None, "k=1000000"),
        (None, lambda a: a.pop("ood1.bank"), "ood1.bank"),
        (None, lambda a: a.update({"baseline.basis": np.zeros((3, 3), np.float32)}), "inconsistent shapes"),
        (lambda m: m["ood"]["fusion"]["names"].pop(), None, "fusion knots: expected 1 rows"),
        (lambda m: m["ood"]["fusion"].update(method="magic"), None, "fusion method 'magic'"),
        (None, lambda a: a.update({"fusion.knots_x": a["fusion.knots_x"][:, ::-1].copy()}), "increase strictly"),
        (None, lambda a: a.pop("fusion.slope_hi"), "fusion.slope_hi"),
        (lambda m: m["explain"].update(reduce=None), None, "explain head"),
    ],
)
def test_invalid_bundles(bundle, tmp_path, meta_fn, arrays_fn, msg):
    good = bundle.save(tmp_path / "good.gate")
    bad = _rewrite(good, tmp_path / "bad.gate", meta_fn, arrays_fn)
    with pytest.raises(BundleError, match=msg) as exc:
        GateBundle.load(bad)
    assert "bad.gate" in str(exc.value)


def test_corrupt_files(bundle, tmp_path):
    good = bundle.save(tmp_path / "good.gate").read_bytes()
    cases = {
        "empty.gate": b"",
        "text.gate": b"hello, I am not a zip",
        "truncated.gate": good[: len(good) // 2],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BundleError, match="corrupt gate bundle"):
            GateBundle.load(tmp_path / name)
    with pytest.raises(BundleError, match="not found"):
        GateBundle.load(tmp_path / "absent.gate")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3))
def test_flipped_bits_load_or_are_refused_in_one_line(bundle, tmp_path, flips):
    """Damage anywhere (zip headers, deflate streams, CRCs, JSON, arrays) is a BundleError naming the file, or a
    bundle that loads (a flip in slack bytes): never zlib.error or another traceback."""
    data = bytearray(_GOOD.setdefault("bytes", bundle.save(tmp_path / "good.gate").read_bytes()))
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    bad = tmp_path / "flipped.gate"
    bad.write_bytes(bytes(data))
    try:
        GateBundle.load(bad)
    except BundleError as exc:
        assert "flipped.gate" in str(exc) and "\n" not in str(exc)


_GOOD: dict[str, bytes] = {}


def test_pickled_arrays_are_refused(bundle, tmp_path):
    good = bundle.save(tmp_path / "good.gate")
    objs = np.empty(1, dtype=object)
    objs[0] = {"evil": True}
    bad = _rewrite(good, tmp_path / "pickle.gate", arrays_fn=lambda a: a.update({"task.bias": objs}))
    with pytest.raises(BundleError, match=r"pickle\.gate"):
        GateBundle.load(bad)


def test_the_fit_report_reads_each_task_and_old_bundles():
    """`GateBundle.fit` types the flat `fit_metrics` a bundle has always carried: the task's own section, defaults
    for what an older bundle lacks, a clear error for a malformed value."""
    from bouncer.runtime.errors import BouncerError
    from bouncer.runtime.gates.fit_report import FitReport

    classifier = {"train_images": 40, "train_accuracy": 1.0, "calibration_accuracy": 0.99, "temperature": 1.3,
                  "ece_before_scaling": 0.05, "ece_after_scaling": 0.01, "calibration_coverage": 0.9}  # fmt: skip
    f = FitReport.of(classifier)
    assert f.kind == "classifier" and f.calibration_accuracy == 0.99 and f.classifier.temperature == 1.3
    detector = {"calibration_boxes": 9, "platt_frames": 5, "threshold_frames": 5, "platt_own_classes": ["gear"],
                "calibration_accuracy": 0.6, "ece_before_calibration": 0.2, "ece_after_calibration": 0.05}  # fmt: skip
    assert FitReport.of(detector).kind == "detector" and FitReport.of(detector).calibration_accuracy == 0.6
    an = FitReport.of({"anomaly": {"basis": "p-values", "false_alarm_bound": 0.012, "unknown_key": 1}})
    assert an.kind == "anomaly" and an.anomaly.false_alarm_bound == 0.012
    old = FitReport.of({"train_images": 3})
    assert old.kind == "unknown" and old.drift_reference == {} and old.calibration_coverage is None
    with pytest.raises(BouncerError, match="fit_metrics"):
        FitReport.of({"train_images": "many"})
