"""`bouncer bench ...`: each bench's arguments beside its handler; the benches themselves live in bench/."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bouncer.cli.main import Parser, _existing_dir, _positive_int, _print_json_last, default_model
from bouncer.runtime.errors import BouncerError


def cmd_bench_backbone(args: argparse.Namespace) -> int:
    from bouncer.bench.backbone import bench_backbone

    models = {
        "onnxruntime": {"fp32": default_model("onnxruntime", "fp32"), "int8": default_model("onnxruntime", "int8")},
    }
    from bouncer.runtime.backends.litert import interpreter_class

    if interpreter_class() is not None and not args.no_litert:
        models["litert"] = {"fp32": default_model("litert", "fp32"), "int8": default_model("litert", "int8")}
    res = bench_backbone(models, rounds=args.rounds, per_round=args.per_round)
    print("median latency per 224x224 frame (ms), interleaved rounds:")
    for key, ms in res["latency_ms"].items():
        print(f"  {key:<24} {ms:8.3f}")
    s = res["summary"]
    print(f"int8 speed-up (ONNX Runtime, 1 thread): {s['int8_speedup']:.2f}x; int8 model {s['int8_mb']} MB")
    for rt, cos in res["cosine_median"].items():
        print(f"median cosine int8 vs fp32 [{rt}]: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items()))
    _print_json_last(s)
    return 0


def _shared_dataset(given: Path | None, name: str, flag: str) -> Path | None:
    """A data set given on the command line, or the one in ../shared beside the checkout, or None (said so)."""
    if given is not None:
        return given
    guess = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / name
    if guess.is_dir():
        return guess
    print(f"{name} data set not found (pass {flag} DIR); left out", file=sys.stderr)
    return None


def cmd_bench_gates(args: argparse.Namespace) -> int:
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    tile = _shared_dataset(args.magnetic_tile, "magnetic-tile", "--magnetic-tile")
    if args.rotation:
        from bouncer.bench.rotation import bench_rotation, print_rotation
        from bouncer.fitting.fit import check_targets

        check_targets(args.target_accuracy, 0.1)

        elpv = _shared_dataset(args.elpv, "elpv", "--elpv")
        sets = {k: v for k, v in (("magnetic-tile", tile), ("elpv", elpv)) if v is not None}
        results = bench_rotation(
            args.model or default_model(), sets, args.work, say, args.target_accuracy, args.max_splits, args.seed,
            args.patch,
        )  # fmt: skip
        if args.work:
            (args.work / "rotation.json").write_text(json.dumps(results, indent=1))
        print_rotation(results)
        return 0
    from bouncer.bench.gates import bench_gates, print_table

    results = bench_gates(args.model or default_model(), tile, args.work, say)
    print_table(results)
    return 0


def cmd_bench_tiles(args: argparse.Namespace) -> int:
    from bouncer.bench.tiles import bench_tiles, print_tiles

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    elpv = _shared_dataset(args.elpv, "elpv", "--elpv")
    tile = _shared_dataset(args.magnetic_tile, "magnetic-tile", "--magnetic-tile")
    print_tiles(bench_tiles(args.model or default_model(), elpv, tile, args.work, say))
    return 0


def cmd_bench_user(args: argparse.Namespace) -> int:
    from bouncer.bench.user import bench_user, print_user

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    real = not args.simulator_only
    tile = _shared_dataset(args.magnetic_tile, "magnetic-tile", "--magnetic-tile") if real else None
    elpv = _shared_dataset(args.elpv, "elpv", "--elpv") if real else None
    print_user(bench_user(args.model or default_model(), tile, elpv, args.work, args.seeds, say, args.part))
    return 0


def cmd_bench_detector(args: argparse.Namespace) -> int:
    from bouncer.bench.detector import bench_detector, print_detector

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    work = args.work or Path(tempfile.mkdtemp(prefix="bouncer-bench-detector-"))
    print_detector(bench_detector(args.model or default_model(), work, args.seeds, args.epochs, say))
    return 0


def cmd_bench_labels(args: argparse.Namespace) -> int:
    from bouncer.bench.labels import bench_labels, print_labels
    from bouncer.fitting.fit import check_targets

    check_targets(args.target_accuracy, 0.1)

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    found = {
        "magnetic-tile": _shared_dataset(args.magnetic_tile, "magnetic-tile", "--magnetic-tile"),
        "elpv": _shared_dataset(args.elpv, "elpv", "--elpv"),
    }
    sets = {k: v for k, v in found.items() if v is not None}
    results = bench_labels(args.model or default_model(), sets, args.work, say, args.target_accuracy, args.seed)
    print_labels(results)
    return 0


def cmd_bench_hotpath(args: argparse.Namespace) -> int:
    import tempfile

    from bouncer.runtime import kernels

    if kernels.ACTIVE != "c++":
        raise BouncerError(f"the C++ hot path is not active ({kernels.ACTIVE}); reinstall with a C++ compiler")
    from bouncer.bench.hotpath import bench_hotpath

    with tempfile.TemporaryDirectory() as tmp:
        model = None if args.kernels_only else args.model or default_model()
        res = bench_hotpath(model, Path(tmp), args.rounds, args.per_round, guard=not args.kernels_only)
    print(f"{'kernel':<58} {'numpy us':>10} {'C++ us':>10} {'speed-up':>9}")
    for name, k in res["kernels"].items():
        print(f"{name:<58} {k['numpy_us']:>10.2f} {k['cpp_us']:>10.2f} {k['speedup']:>8.1f}x")
    if args.kernels_only:
        _print_json_last({"kernels": res["kernels"]})
        return 0
    print(
        f"guarded frame {res['guarded_frame_us']:.0f} us: backbone call {res['backbone_us']:.0f} us (alone: "
        f"{res['backbone_alone_us']:.0f} us) + guard {res['guard_us']:.0f} us = overhead {res['guard_overhead']:.1%} "
        f"(numpy kernels: {res['guard_numpy_us']:.0f} us, {res['guard_overhead_numpy']:.1%}) [{res['frame']}]"
    )
    _print_json_last(
        {
            "kernels": res["kernels"],
            "guard_overhead": res["guard_overhead"],
            "guard_overhead_numpy": res["guard_overhead_numpy"],
            "backbone_us": res["backbone_us"],
        }
    )
    return 0


def cmd_bench_device(args: argparse.Namespace) -> int:
    from bouncer.bench.device import bench_device

    res = bench_device(args.model or default_model())
    print(
        f"bare loop (resize + normalise + backbone): {res['bare_fps']:.1f} fps; guarded loop: "
        f"{res['guarded_fps']:.1f} fps ({res['guarded_over_bare']:.1%} of bare) [640x480, int8, 2 threads]; "
        f"the same loop without its prefetch thread: {res['sequential_fps']:.1f} fps "
        f"({res['sequential_over_bare']:.1%} of bare)"
    )
    print(
        f"outbox drain after an outage: {res['outbox_drain_msgs_per_s']:.0f} msgs/s of 50 KB "
        f"({res['outbox_drain_mb_per_s']} MB/s) to a local Mosquitto; peak RSS {res['peak_rss_mb']} MB"
    )
    _print_json_last(res)
    return 0


def cmd_bench_camera(args: argparse.Namespace) -> int:
    from bouncer.bench.cameras import bench_camera, print_camera

    with tempfile.TemporaryDirectory(prefix="bouncer-bench-camera-") as tmp:
        res = bench_camera(args.model or default_model(), Path(tmp), args.frames, args.pixel_format, args.frame_rate)
    print_camera(res)
    _print_json_last(res)
    return 0


def cmd_bench_station(args: argparse.Namespace) -> int:
    from bouncer.bench.station import bench_station, print_cpu, print_station

    try:
        workers = tuple(_positive_int(w) for w in args.workers.split(","))
    except BouncerError as exc:
        raise BouncerError(f"--workers {args.workers}: worker counts such as 1,2,4 ({exc})") from None
    res = bench_station(args.messages, args.publishers, args.devices, args.size_kb, workers, not args.no_faults,
                        say=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    print_station(res)
    print_cpu(res)
    _print_json_last(res)
    bad = res["faults"] and (res["faults"]["lost"] or res["faults"]["objects"] < res["faults"]["stored"])
    return 1 if bad else 0


def cmd_bench_line(args: argparse.Namespace) -> int:
    from bouncer.bench.line import bench_line

    res = bench_line(args.model or default_model(), args.frames)
    a = res["decision_alone"]
    print(f"{'frame in to ...':<44} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'decision (no line output, same frames)':<44} {a['p50_ms']:>8.2f} {a['p99_ms']:>8.2f}")
    for name, out in (("verdict written to the PLC (Modbus TCP)", res["modbus"]),
                      ("verdict in the OPC UA address space", res["opcua"])):  # fmt: skip
        if out.get("latency_ms_p50") is None:
            raise BouncerError(f"bench line: no verdict reached {name} ({out})")
        print(f"{name:<44} {out['latency_ms_p50']:>8.2f} {out['latency_ms_p99']:>8.2f}  "
              f"({out['written']} written, {out['late']} late, {out['failed']} failed)")  # fmt: skip
    _print_json_last(res)
    return 0


def add_bench(sub, add) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print figures (last line: JSON)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    bb = add("backbone", cmd_bench_backbone, "fp32 vs int8 latency on ONNX Runtime and LiteRT", bsub)
    bb.add_argument("--rounds", type=_positive_int, default=5)
    bb.add_argument("--per-round", type=_positive_int, default=20)
    bb.add_argument("--no-litert", action="store_true", help="ONNX Runtime only")

    bu = add("user-model", cmd_bench_user, "the guard around your own classifier and anomaly model vs the built-in "
             "head: errors, coverage, unknowns, false alarms over seeded splits, cost", bsub)  # fmt: skip
    bu.add_argument("--magnetic-tile", type=_existing_dir, help="the magnetic-tile data set (default: ../shared)")
    bu.add_argument("--elpv", type=_existing_dir, help="the elpv solar-cell data set (default: ../shared)")
    bu.add_argument("--model", type=Path, help="the sidecar backbone (default: cached int8 EfficientNet-Lite0)")
    bu.add_argument("--work", type=Path, help="keep splits, models and features here (default: a temp folder)")
    bu.add_argument("--seeds", type=_positive_int, default=20, help="anomaly: seeded calibration/test re-splits")
    bu.add_argument("--simulator-only", action="store_true", help="leave the real data sets out (a quick run)")
    bu.add_argument("--part", choices=["all", "classifier", "anomaly", "cost"], default="all")
    bg = add("gates", cmd_bench_gates, "fit and evaluate gates on the simulator and the magnetic-tile data", bsub)
    bg.add_argument("--magnetic-tile", type=_existing_dir, help="the magnetic-tile data set (ImageFolder)")
    bg.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
    bg.add_argument("--work", type=Path, help="keep splits, bundles and reports here (default: a temp folder)")
    bg.add_argument(
        "--rotation", action="store_true", help="every known/unknown split of every data set, fixed head mixes vs auto"
    )
    bg.add_argument("--elpv", type=_existing_dir, help="the elpv solar-cell data set (ImageFolder), for --rotation")
    bg.add_argument("--target-accuracy", type=float, default=0.99, help="--rotation: the gates' target accuracy")
    bg.add_argument(
        "--max-splits", type=_positive_int, default=10, help="--rotation: known/unknown splits per data set"
    )
    bg.add_argument("--seed", type=int, default=0, help="--rotation: seed of the splits")
    bg.add_argument(
        "--patch", action="store_true", help="--rotation: also the patch heads on one-class splits (several GB)"
    )

    bt = add("tiles", cmd_bench_tiles, "whole-frame against tile heads on large frames with small defects (the "
             "simulator, elpv module strips, magnetic-tile mosaics): catch, flags, AUROC, time", bsub)  # fmt: skip
    bt.add_argument("--elpv", type=_existing_dir, help="the elpv solar-cell data set (default: ../shared)")
    bt.add_argument("--magnetic-tile", type=_existing_dir, help="the magnetic-tile data set (default: ../shared)")
    bt.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
    bt.add_argument("--work", type=Path, help="keep the frames here (default: a temp folder)")

    bl = add("labels", cmd_bench_labels, "labels a new defect type needs: accepted share after each retrain", bsub)
    bl.add_argument("--magnetic-tile", type=_existing_dir, help="the magnetic-tile data set (ImageFolder)")
    bl.add_argument("--elpv", type=_existing_dir, help="the elpv solar-cell data set (ImageFolder)")
    bl.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
    bl.add_argument("--work", type=Path, help="backbone vector cache (shared with bench gates --rotation)")
    bl.add_argument("--target-accuracy", type=float, default=0.99, help="the gates' target accuracy")
    bl.add_argument("--seed", type=int, default=0)

    bdt = add("detector", cmd_bench_detector, "a YOLO detector guarded on the simulator's detection mode: accepted "
              "error over seeded splits, unknown objects, the every-box-over-0.5 practice, cost", bsub)  # fmt: skip
    bdt.add_argument("--model", type=Path, help="the sidecar backbone (default: cached int8 EfficientNet-Lite0)")
    bdt.add_argument("--work", type=Path, help="keep frames and the trained detector here (default: a temp folder)")
    bdt.add_argument("--seeds", type=_positive_int, default=20, help="calibration/test re-splits")
    bdt.add_argument("--epochs", type=_positive_int, default=12, help="detector training epochs")
    bh = add("hotpath", cmd_bench_hotpath, "every kernel numpy vs C++, and the guard overhead per frame", bsub)
    bh.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
    bh.add_argument("--rounds", type=_positive_int, default=5)
    bh.add_argument("--per-round", type=_positive_int, default=40)
    bh.add_argument("--kernels-only", action="store_true", help="skip the guard overhead (it fits a gate first)")

    bl = add("line", cmd_bench_line, "frame in to verdict written (Modbus PLC, OPC UA), p50/p99, vs decision", bsub)
    bl.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
    bl.add_argument("--frames", type=_positive_int, default=400)

    bs = add("station", cmd_bench_station, "station ingest on PostgreSQL + S3 with 1/2/4 workers, and under faults",
             bsub)  # fmt: skip
    bs.add_argument("--messages", type=_positive_int, default=10000, help="frames per run")
    bs.add_argument("--workers", default="1,2,4", help="ingest worker counts, comma-separated")
    bs.add_argument("--publishers", type=_positive_int, default=2, help="publisher processes")
    bs.add_argument("--devices", type=_positive_int, default=20, help="simulated cameras")
    bs.add_argument("--size-kb", type=_positive_int, default=50, help="message size")
    bs.add_argument("--no-faults", action="store_true", help="skip the run with faults injected")

    bc = add("camera", cmd_bench_camera, "trigger-to-verdict latency and fps through a fake GigE Vision camera",
             bsub)  # fmt: skip
    bc.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
    bc.add_argument("--frames", type=_positive_int, default=200, help="triggered parts to time")
    bc.add_argument("--pixel-format", default="BayerRG8", help="the camera's pixel format (Mono8, BayerRG8, ...)")
    bc.add_argument("--frame-rate", type=float, default=100.0, help="the free-running row's frame rate (Hz)")

    bd = add("device", cmd_bench_device, "guarded vs bare fps, outbox drain rate, peak memory", bsub)
    bd.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
