"""`bouncer bench gates --rotation`: a protocol that cannot tune on the answer.

On every data set (the simulator and each real one given), every split of its classes into known and
unknown (or a seeded sample of them): a gate is fitted on the known classes alone, then judged on a mix of
clean test frames, the unknown classes, corruptions, garbage and foreign frames. Each head configuration is
fitted from the same cached backbone vectors, so the comparison is like for like. Reports mean and worst
case per configuration: accepted error, clean coverage, unknown frames accepted, unknown AUROC, and how
often the accepted error exceeds the bound the gate states.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.fitting.corruptions import CORRUPTIONS, GARBAGE
from bouncer.fitting.defects import synthesize
from bouncer.fitting.fit import (
    SYNTHETIC_MAX,
    FeatureSet,
    FitSettings,
    extract,
    fit_from_features,
    gate_inputs,
    to_features,
)
from bouncer.fitting.operating import DEFAULT_BUDGET
from bouncer.fitting.replay import replay
from bouncer.fitting.select import HEAD_BUDGET, auroc
from bouncer.runtime import backends
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.heads import input_sources
from bouncer.runtime.images import image_folder
from bouncer.sim import simulator

# train, calibration, test of each known class: half calibrates, so a small line (588 good solar cells) still
# has the 230 calibration frames a 99% guarantee at delta 0.1 needs
FRACTIONS = (0.25, 0.5, 0.25)
BLOCK = 16  # consecutive image numbers that share a split (neighbouring solar cells come from one module)
PER_CORRUPTION = 30
PER_GARBAGE = 15
BAD = ("unknown", "foreign", "garbage")
# the configurations compared: heads (None: chosen per line), fusion, review budget (None: the default), head budget
Config = tuple[tuple[str, ...] | None, str | None, float | None, int]
CONFIGS: dict[str, Config] = {
    "auto, budget 5% (default)": (None, None, None, HEAD_BUDGET),
    "auto, budget 3%": (None, None, 0.03, HEAD_BUDGET),
    "auto, budget 2%": (None, None, 0.02, HEAD_BUDGET),
    "auto, budget 1%": (None, None, 0.01, HEAD_BUDGET),
    "auto, budget 10%": (None, None, 0.10, HEAD_BUDGET),
    "knn:features, budget 5%": (("knn:features",), "max", None, HEAD_BUDGET),
    "maha:pool_s8+s16+s32, max, budget 5%": (
        ("maha:pool_s8", "maha:pool_s16", "maha:pool_s32"),
        "max",
        None,
        HEAD_BUDGET,
    ),
}
# with --patch, on one-class splits: the patch heads as candidates (each map's grid; the joined grid is left out of
# the cache to bound its memory), under a raised head budget
PATCH_INPUTS = ("map_s8@patch", "map_s16@patch")
PATCH_CONFIGS: dict[str, Config] = {
    "auto, budget 5%, patch heads allowed (head budget 40M)": (None, None, None, 40_000_000),
    "patchknn:map_s8, budget 5%": (("patchknn:map_s8",), "max", None, 40_000_000),
}
TILE_DEFECTS = ("blowhole", "break", "crack", "fray", "uneven")
ELPV_SCENARIOS = {
    "mono known, poly unknown": (("mono_ok", "mono_defective"), ("poly_ok", "poly_defective")),
    "poly known, mono unknown": (("poly_ok", "poly_defective"), ("mono_ok", "mono_defective")),
    "mono_ok only, defective unknown": (("mono_ok",), ("mono_defective", "poly_ok", "poly_defective")),
    "poly_ok only, defective unknown": (("poly_ok",), ("poly_defective", "mono_ok", "mono_defective")),
}


@dataclass
class Cache:
    """Backbone vectors of every frame of one data set, with what each frame is."""

    fs: FeatureSet
    kind: np.ndarray  # clean, synthetic, corrupt, garbage, foreign
    cls: np.ndarray  # class of the (source) image; "" for garbage and foreign
    name: np.ndarray  # source image id: the split is decided on it
    block: np.ndarray  # split block of the source image

    def save(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.fs.save(root / "vectors.npz")
        meta = {k: getattr(self, k).tolist() for k in ("kind", "cls", "name", "block")}
        (root / "frames.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, root: Path) -> Cache:
        meta = json.loads((root / "frames.json").read_text())
        return cls(
            FeatureSet.load(root / "vectors.npz"), *(np.array(meta[k]) for k in ("kind", "cls", "name", "block"))
        )


def _block(path: Path) -> int:
    """Images numbered close together share a block (and so a split); unnumbered ones hash alone."""
    digits = re.findall(r"\d+", path.stem)
    if digits:
        return int(digits[-1]) // BLOCK
    return int(hashlib.sha256(path.stem.encode()).hexdigest()[:8], 16)


def build_cache(
    backend: backends.Backend, root: Path, foreign: Path | None, log: Callable[[str], None], patch: bool = False
) -> Cache:
    card, pp = backend.card, backend.card.preprocessing
    keys = gate_inputs(card, None) + (list(PATCH_INPUTS) if patch else [])
    sources = {s for k in keys for s in input_sources(k)}
    folders = image_folder(root)
    paths = [p for c in sorted(folders) for p in sorted(folders[c])]
    classes = [c for c in sorted(folders) for _ in folders[c]]
    parts: list[tuple[FeatureSet, str, list[str], list[Path]]] = []

    def run(kind: str, ps: Sequence[Path], cs: Sequence[str], alter=None) -> None:
        ex = extract(backend, pp, ps, [-1] * len(ps), sources, alter=alter)
        kept = {str(p) for p in ex.paths}
        cs = [c for p, c in zip(ps, cs, strict=True) if str(p) in kept]
        parts.append((to_features(ex, card.task_input, keys), kind, cs, ex.paths))

    log(f"{root.name}: backbone vectors of {len(paths)} images, their synthetic defects and corruptions")
    run("clean", paths, classes)
    rng = np.random.default_rng(0)
    run("synthetic", paths, classes, alter=lambda img: synthesize(img, rng))
    for name, fn in {**CORRUPTIONS, **GARBAGE}.items():
        n = PER_GARBAGE if name in GARBAGE else PER_CORRUPTION
        pick = sorted(rng.permutation(len(paths))[:n].tolist())
        garbage = name in GARBAGE  # garbage is of no class: it must never be accepted
        cs = ["" if garbage else classes[i] for i in pick]
        run("garbage" if garbage else "corrupt", [paths[i] for i in pick], cs, alter=lambda img, fn=fn: fn(img, rng))
    if foreign is not None:
        fp = [p for ps in image_folder(foreign).values() for p in sorted(ps)]
        run("foreign", fp, [""] * len(fp))
    fs = FeatureSet.concat([p[0] for p in parts])
    kind = np.array([k for p in parts for k in [p[1]] * len(p[0])])
    cls = np.array([c for p in parts for c in p[2]])
    names = np.array([str(x) for p in parts for x in p[3]])
    block = np.array([_block(Path(x)) for p in parts for x in p[3]])
    return Cache(fs, kind, cls, names, block)


def _split_of(block: np.ndarray, seed: int) -> np.ndarray:
    """0 train, 1 calibration, 2 test, by a seeded hash of the block."""
    u = np.array([int(hashlib.sha256(f"{seed}:{b}".encode()).hexdigest()[:8], 16) / 2**32 for b in block])
    return np.searchsorted(np.cumsum(FRACTIONS)[:-1], u, side="right")


@dataclass
class KnownSets:
    """A seeded split of a cached data set's known classes, labelled by `classes` (others: -1)."""

    fs: FeatureSet
    train: FeatureSet
    calib: FeatureSet
    pseudo: FeatureSet  # synthetic defects made from the calibration images
    split: np.ndarray  # per cached frame: 0 train, 1 calibration, 2 test


def known_sets(cache: Cache, known: Sequence[str], classes: Sequence[str], seed: int) -> KnownSets:
    split = _split_of(cache.block, seed)
    label = np.array([list(classes).index(c) if c in classes else -1 for c in cache.cls])
    fs = FeatureSet(label, cache.fs.features, cache.fs.vectors, cache.fs.stats)
    ok = (cache.kind == "clean") & np.isin(cache.cls, known)
    synth = np.flatnonzero((cache.kind == "synthetic") & np.isin(cache.cls, known) & (split == 1))[:SYNTHETIC_MAX]
    return KnownSets(fs, fs.take(np.flatnonzero(ok & (split == 0))), fs.take(np.flatnonzero(ok & (split == 1))),
                     fs.take(synth), split)  # fmt: skip


def run_split(
    cache: Cache,
    known: Sequence[str],
    unknown: Sequence[str],
    card_hash: str,
    card_name: str,
    pp,
    target_accuracy: float,
    seed: int,
    log: Callable[[str], None],
    configs: dict[str, Config] | None = None,
) -> dict[str, Any]:
    k = known_sets(cache, known, known, seed)
    fs, train, calib, pseudo, split, label = k.fs, k.train, k.calib, k.pseudo, k.split, k.fs.labels
    is_known, is_unknown, clean = np.isin(cache.cls, known), np.isin(cache.cls, unknown), cache.kind == "clean"
    # the test mix, and what each frame of it is
    test_kind = np.full(len(cache.kind), "", dtype=object)
    test_kind[clean & is_known & (split == 2)] = "clean"
    test_kind[(cache.kind == "corrupt") & is_known & (split == 2)] = "corrupt"
    test_kind[(cache.kind == "clean") & is_unknown] = "unknown"
    test_kind[(cache.kind == "corrupt") & is_unknown] = "unknown"
    test_kind[cache.kind == "garbage"] = "garbage"
    test_kind[cache.kind == "foreign"] = "foreign"
    idx = np.flatnonzero(test_kind != "")
    test, tk, truth = fs.take(idx), test_kind[idx].astype(str), label[idx]
    out: dict[str, Any] = {}
    for config, (heads, fusion, budget, head_budget) in (configs or CONFIGS).items():
        if config in PATCH_CONFIGS and len(known) > 1:
            out[config] = {"skipped": "one-class splits only"}
            continue
        try:
            settings = FitSettings(target_accuracy, heads=None if heads is None else tuple(heads), fusion=fusion,
                                   review_budget=DEFAULT_BUDGET if budget is None else budget,
                                   head_budget=head_budget)  # fmt: skip
            bundle = fit_from_features(
                train, calib, list(known), settings, backbone_hash=card_hash, backbone_name=card_name,
                preprocessing=pp, version="bench", log=lambda m: None, pseudo=pseudo,
            )  # fmt: skip
        except BouncerError as exc:  # fit refuses (too little calibration data): that is a result too
            out[config] = {"refused": str(exc)}
            continue
        r = replay(bundle, test)
        pred = np.array([-1 if p is None else list(known).index(p) for p in r.predicted])
        wrong = np.isin(tk, BAD) | (pred != truth)
        acc = r.accepted
        n_acc = int(acc.sum())
        is_clean = tk == "clean"
        clean_wrong = int((acc & is_clean & wrong).sum())
        clean_acc = int((acc & is_clean).sum())
        bound = bundle.acceptance.error_bound
        out[config] = {
            "heads": list(bundle.fusion.names),
            "fusion": bundle.fusion.method,
            "accepted": n_acc,
            "accepted_error": float((acc & wrong).sum() / n_acc) if n_acc else 0.0,
            "clean_coverage": float(clean_acc / max(is_clean.sum(), 1)),
            "unknown_accepted": int((acc & (tk == "unknown")).sum()),
            "unknown": int((tk == "unknown").sum()),
            "unknown_flagged_ood": float((r.ood[tk == "unknown"] > bundle.ood_threshold).mean()),
            # catch at the operating point: unknown frames not auto-accepted; good frames the OOD gate flags
            "unknown_caught": float(1 - (acc & (tk == "unknown")).sum() / max((tk == "unknown").sum(), 1)),
            "good_flagged_ood": float((r.ood[is_clean] > bundle.ood_threshold).mean()),
            "estimated_catch": bundle.operating.get("catch"),
            "unknown_auroc": auroc(r.ood[tk == "unknown"], r.ood[is_clean]),
            "garbage_accepted": int((acc & (tk == "garbage")).sum()),
            "foreign_accepted": int((acc & (tk == "foreign")).sum()),
            "clean_accepted_error": clean_wrong / clean_acc if clean_acc else 0.0,
            "error_bound": bound,
            "exceeds_bound": bool(clean_acc and bound is not None and clean_wrong / clean_acc > bound),
            "exceeds_target": bool(n_acc and (acc & wrong).sum() / n_acc > 1 - target_accuracy),
        }
    fitted = {c: v for c, v in out.items() if "refused" not in v and "skipped" not in v}
    log(
        f"  known {'+'.join(known)} | unknown {'+'.join(unknown)}: "
        + "; ".join(
            f"{c.split(' ')[0]} err {v['accepted_error']:.4f} cov {v['clean_coverage']:.3f} "
            f"auroc {v['unknown_auroc']:.3f}"
            for c, v in fitted.items()
        )
    )
    return out


def scenarios(name: str, classes: Sequence[str], max_splits: int, seed: int) -> list[tuple[tuple[str, ...], ...]]:
    """(known, unknown) splits of one data set."""
    if name == "elpv":
        return [v for v in ELPV_SCENARIOS.values() if set(v[0]) | set(v[1]) <= set(classes)]
    if name == "magnetic-tile":
        pairs = [
            tuple(sorted(set(TILE_DEFECTS) - {a, b})) for i, a in enumerate(TILE_DEFECTS) for b in TILE_DEFECTS[i + 1 :]
        ]
        rows = [(("free", *k), tuple(sorted(set(TILE_DEFECTS) - set(k)))) for k in pairs]
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in sorted(rng.permutation(len(rows))[:max_splits].tolist())]
        return [*rows, (("free",), TILE_DEFECTS)]
    if name == "simulator, one class":  # a line of washers only; every other part is unknown
        return [(("washer",), tuple(c for c in classes if c != "washer"))]
    # the simulator: each part held out in turn
    return [(tuple(c for c in classes if c != u), (u,)) for u in classes]


def bench_rotation(
    model: Path,
    datasets: dict[str, Path],
    work: Path | None,
    log: Callable[[str], None],
    target_accuracy: float = 0.99,
    max_splits: int = 10,
    seed: int = 0,
    patch: bool = False,
) -> dict[str, Any]:
    backend = backends.load(model, 2)
    base = work or Path(tempfile.mkdtemp(prefix="bouncer-bench-rotation-"))
    configs = {**CONFIGS, **(PATCH_CONFIGS if patch else {})}
    results: dict[str, Any] = {"target_accuracy": target_accuracy, "configs": list(configs), "datasets": {}}
    card = backend.card
    sim_one = simulator_images(base) / "one-class"
    for name, root in {"simulator": None, "simulator, one class": sim_one, **datasets}.items():
        cache = cached(backend, name, root, base, log, patch)
        classes = sorted(set(cache.cls[cache.kind == "clean"].tolist()))
        rows = []
        for known, unknown in scenarios(name, classes, max_splits, seed):
            r = run_split(
                cache, known, unknown, card.model_hash, card.name, card.preprocessing, target_accuracy, seed, log,
                configs,
            )  # fmt: skip
            rows.append({"known": list(known), "unknown": list(unknown), "results": r})
        results["datasets"][name] = rows
    results["summary"] = summarise(results)
    return results


def simulator_images(base: Path) -> Path:
    """The simulated line as an image folder (its four parts and the bolt), its giraffes, and another line."""
    sim = base / "simulator-images"
    if not (sim / "known").exists():
        simulator.write_dataset(sim / "known", (*simulator.KNOWN_CLASSES, *simulator.UNKNOWN_PARTS), 120, seed=201)
        simulator.write_dataset(sim / "foreign", simulator.FOREIGN, per_class=60, seed=202)
        simulator.write_dataset(sim / "other-line", simulator.KNOWN_CLASSES, per_class=15, seed=203)
    if not (sim / "one-class").exists():
        # a one-class line needs calibration frames enough for a 99% guarantee on half of them: 520 washers
        simulator.write_dataset(sim / "one-class", ("washer",), per_class=520, seed=204)
        others = tuple(c for c in (*simulator.KNOWN_CLASSES, *simulator.UNKNOWN_PARTS) if c != "washer")
        simulator.write_dataset(sim / "one-class", others, per_class=30, seed=205)
    return sim


def cached(
    backend: backends.Backend, name: str, root: Path | None, base: Path, log: Callable[[str], None], patch: bool = False
) -> Cache:
    """The data set's backbone vectors, built once per backbone into `base/cache` (root None: the simulator); with
    `patch`, also the patch grids (a cache of its own: several GB in memory for the real sets)."""
    sim = simulator_images(base)
    cache_dir = base / "cache" / f"{name}-{backend.card.model_hash[:12]}{'-patch' if patch else ''}"
    if (cache_dir / "frames.json").exists():
        cache = Cache.load(cache_dir)
    else:
        foreign = sim / "foreign" if root is None or root.parent == sim else _foreign_for_real(sim)
        cache = build_cache(backend, root or sim / "known", foreign, log, patch)
        cache.save(cache_dir)
    log(f"{name}: {len(cache.kind)} frames cached")
    return cache


def _foreign_for_real(sim: Path) -> Path:
    """For a real line, foreign frames are the simulator's giraffe and parts of another line, in one folder."""
    out = sim / "foreign-for-real"
    if not out.exists():
        for src in (sim / "foreign", sim / "other-line"):
            for cls, ps in image_folder(src).items():
                (out / cls).mkdir(parents=True, exist_ok=True)
                for p in ps:
                    (out / cls / p.name).symlink_to(p)
    return out


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per configuration and data set (and over all): mean and worst case of each figure."""
    out: dict[str, Any] = {}
    for config in results["configs"]:
        per: dict[str, Any] = {}
        everything: list[dict[str, Any]] = []
        by_kind: dict[str, list[dict[str, Any]]] = {"one-class": [], "multi-class": []}
        for name, rows in results["datasets"].items():
            rs = [row["results"][config] for row in rows if "skipped" not in row["results"][config]]
            everything += rs
            for row in rows:
                if "skipped" not in row["results"][config]:
                    kind = "one-class" if len(row["known"]) == 1 else "multi-class"
                    by_kind[kind].append(row["results"][config])
            per[name] = _agg(rs)
        per["all"] = _agg(everything)
        per |= {f"all {k}": _agg(v) for k, v in by_kind.items()}
        out[config] = per
    return out


def _agg(all_rs: list[dict[str, Any]]) -> dict[str, Any]:
    rs = [r for r in all_rs if "refused" not in r]
    if not rs:
        return {"splits": 0, "refused": len(all_rs)}
    err = [r["accepted_error"] for r in rs]
    cov = [r["clean_coverage"] for r in rs]
    auc = [r["unknown_auroc"] for r in rs]
    unk = [r["unknown_accepted"] / max(r["unknown"], 1) for r in rs]
    return {
        "splits": len(rs),
        "refused": len(all_rs) - len(rs),
        "accepted_error_mean": float(np.mean(err)),
        "accepted_error_worst": float(np.max(err)),
        "clean_coverage_mean": float(np.mean(cov)),
        "clean_coverage_worst": float(np.min(cov)),
        "unknown_accepted_mean": float(np.mean(unk)),
        "unknown_accepted_worst": float(np.max(unk)),
        "unknown_auroc_mean": float(np.mean(auc)),
        "unknown_auroc_worst": float(np.min(auc)),
        "unknown_caught_mean": float(np.mean([r["unknown_caught"] for r in rs])),
        "unknown_caught_worst": float(np.min([r["unknown_caught"] for r in rs])),
        "good_flagged_mean": float(np.mean([r["good_flagged_ood"] for r in rs])),
        "good_flagged_worst": float(np.max([r["good_flagged_ood"] for r in rs])),
        "garbage_accepted": int(sum(r["garbage_accepted"] for r in rs)),
        "exceeds_bound": int(sum(r["exceeds_bound"] for r in rs)),
    }


def print_rotation(results: dict[str, Any]) -> None:
    """Markdown, as the README shows it; the last line is one JSON object."""
    print(
        "| data set | configuration | splits | accepted error mean / worst | clean coverage mean / worst "
        "| unknown caught mean / worst | good flagged as OOD mean / worst | unknown AUROC mean / worst "
        "| garbage accepted | above stated bound |"
    )
    print("|" + " --- |" * 10)
    for config, per in results["summary"].items():
        for name, a in per.items():
            if not a["splits"]:
                print(f"| {name} | {config} | 0 ({a['refused']} refused) |" + " - |" * 7)
                continue
            refused = f" (+{a['refused']} refused)" if a["refused"] else ""
            print(
                f"| {name} | {config} | {a['splits']}{refused} "
                f"| {a['accepted_error_mean']:.4f} / {a['accepted_error_worst']:.4f} "
                f"| {a['clean_coverage_mean']:.3f} / {a['clean_coverage_worst']:.3f} "
                f"| {a['unknown_caught_mean']:.3f} / {a['unknown_caught_worst']:.3f} "
                f"| {a['good_flagged_mean']:.3f} / {a['good_flagged_worst']:.3f} "
                f"| {a['unknown_auroc_mean']:.3f} / {a['unknown_auroc_worst']:.3f} | {a['garbage_accepted']} "
                f"| {a['exceeds_bound']} of {a['splits']} |"
            )
    print(json.dumps({"rotation": results["summary"]}))
