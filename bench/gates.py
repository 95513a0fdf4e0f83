"""`bouncer bench gates`: the quality table. Fit and evaluate gates on the simulator and, where it is
present, the magnetic-tile data set, each in one run, against the two baselines."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bouncer.fitting.datasets import split_dataset
from bouncer.fitting.evaluate import evaluate
from bouncer.fitting.fit import fit_gate
from bouncer.runtime import backends
from bouncer.runtime.gates.guard import Guard
from bouncer.sim import simulator

TILE_DEFECTS = ("blowhole", "break", "crack", "fray", "uneven")


def _run(backend: backends.Backend, root: Path, foreign: list[Path], name: str, log) -> dict[str, Any]:
    bundle = fit_gate(backend, root / "train", root / "calib", version=name, log=log)
    report = evaluate(
        Guard(bundle, backend), root / "test", [root / "unknown"], foreign, corrupt=True, out_dir=root / "eval"
    )
    report["acceptance"] = bundle.acceptance.__dict__
    report["eval_dir"] = str(root / "eval")
    return report


def simulated_splits(sim: Path) -> Path:
    """The simulated line's benchmark folders (train, calib, test, unknown, foreign), written once per work dir."""
    if not (sim / "train").exists():
        simulator.write_dataset(sim / "train", per_class=40, seed=101)
        simulator.write_dataset(sim / "calib", per_class=80, seed=102)
        simulator.write_dataset(sim / "test", per_class=50, seed=103)
        simulator.write_dataset(sim / "unknown", simulator.UNKNOWN_PARTS, per_class=60, seed=104)
        simulator.write_dataset(sim / "foreign", simulator.FOREIGN, per_class=60, seed=105)
    return sim


def bench_gates(model: Path, magnetic_tile: Path | None, work: Path | None, log) -> dict[str, Any]:
    backend = backends.load(model, 2)
    base = work or Path(tempfile.mkdtemp(prefix="bouncer-bench-gates-"))
    results: dict[str, Any] = {}
    sim = base / "simulator"
    simulated_splits(sim)
    results["simulator"] = _run(backend, sim, [sim / "foreign"], "simulator", log)
    if magnetic_tile is not None:
        scenarios = {
            "magnetic_tile": (("free", "blowhole", "break", "uneven"), ("crack", "fray")),
            "magnetic_tile_one_class": (("free",), TILE_DEFECTS),
        }
        for name, (known, unknown) in scenarios.items():
            root = base / name
            if not (root / "train").exists():
                split_dataset(magnetic_tile, root, known, unknown, seed=0)
            # foreign objects for a tile line: frames of another line (the simulator's parts and giraffe)
            results[name] = _run(backend, root, [sim / "test", sim / "foreign"], name, log)
    return results


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for scenario, r in results.items():
        op = r["methods"]["guard"]["operating_point"]
        row = {
            "scenario": scenario,
            "guard_accepted_error": op["accepted_error"],
            "guard_clean_coverage": op["clean_coverage"],
            "garbage_accepted": op["garbage_accepted"],
            "unknown_auroc": round(r["ood_auroc"]["unknown"], 4),
            "unknown_auroc_last_layer_mahalanobis": round(r["ood_auroc_last_layer_mahalanobis"]["unknown"], 4),
            "foreign_auroc": round(r["ood_auroc"]["foreign"], 4),
            "ece": r["ece"],
        }
        for m in ("guard", "softmax_0.9", "last_layer_mahalanobis"):
            at = r["methods"][m]["accepted_error_at_clean_coverage"]
            for c in ("0.500", "0.700", "0.900"):
                row[f"{m}_error_at_{c}"] = at.get(c)
        rows.append(row)
    return rows


def print_table(results: dict[str, Any]) -> None:
    """Markdown, as the README shows it; the last line is one JSON object."""
    print(
        "| scenario | accepted error | clean coverage | garbage accepted | AUROC unknown (guard / maha-last) "
        "| AUROC foreign | ECE | error at 50% / 70% / 90% coverage: guard | softmax>=0.9 | maha-last |"
    )
    print("|" + " --- |" * 10)
    for r in summary_rows(results):
        at = {
            m: " / ".join(f"{r[f'{m}_error_at_{c}']:.3f}" for c in ("0.500", "0.700", "0.900"))
            for m in ("guard", "softmax_0.9", "last_layer_mahalanobis")
        }
        print(
            f"| {r['scenario']} | {r['guard_accepted_error']:.4f} | {r['guard_clean_coverage']:.3f} "
            f"| {r['garbage_accepted']} | {r['unknown_auroc']:.3f} / {r['unknown_auroc_last_layer_mahalanobis']:.3f} "
            f"| {r['foreign_auroc']:.3f} | {r['ece']:.4f} | {at['guard']} | {at['softmax_0.9']} "
            f"| {at['last_layer_mahalanobis']} |"
        )
    print(json.dumps({"gates": summary_rows(results)}))
