"""`bouncer` command line. User errors print one line and exit 2; nothing prints a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bouncer import __version__
from bouncer.runtime import home
from bouncer.runtime.errors import BouncerError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BouncerError(f"{self.prog}: {message}")


def _print_json_last(obj: object) -> None:
    print(json.dumps(obj, sort_keys=False))


def default_model(runtime: str = "onnxruntime", precision: str = "int8") -> Path:
    """The cached default backbone, built on first use."""
    names = {
        ("onnxruntime", "int8"): home.INT8_ONNX,
        ("onnxruntime", "fp32"): home.FP32_ONNX,
        ("litert", "int8"): home.INT8_TFLITE,
        ("litert", "fp32"): home.FP32_TFLITE,
    }
    path = home.models_dir() / names[(runtime, precision)]
    if not path.exists():
        from bouncer.quantize.pipeline import build_default_models

        print(f"bouncer: building the default models into {home.models_dir()} (once)", file=sys.stderr)
        build_default_models(tflite=runtime == "litert")
    return path


# ---- commands ---------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from bouncer.devices import profiles
    from bouncer.runtime.sysinfo import collect

    info = collect()
    info["device_profile"] = profiles.detect().name
    if args.json:
        _print_json_last(info)
        return 0
    feats = ", ".join(k for k, v in info["cpu_features"].items() if v) or "none detected"
    print(f"bouncer {__version__} on Python {info['python']} ({info['machine']}, {info['cpus']} CPUs)")
    print(f"  cpu features   : {feats}")
    print(f"  onnxruntime    : {info['onnxruntime']['version']} ({', '.join(info['onnxruntime']['providers'])})")
    print(f"  litert         : {info['litert'] or 'not installed (extra [litert])'}")
    print(f"  numpy / opencv : {info['numpy']} / {info['opencv']}")
    print(f"  paho-mqtt      : {info['paho-mqtt']}")
    print(f"  build extra    : torch {info['build_extra']['torch'] or '-'}, onnx {info['build_extra']['onnx'] or '-'}")
    tf = info["tflite_export_extra"]
    print(f"  tflite export  : onnx2tf {tf['onnx2tf'] or '-'}, tensorflow {tf['tensorflow'] or '-'}")
    print(f"  C++ hot path   : {info['hot_path']}")
    print(f"  device profile : {info['device_profile']}")
    print(f"  model cache    : {info['bouncer_home']}")
    print(f"  cached models  : {', '.join(info['cached_models']) or 'none (run: bouncer models build)'}")
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from bouncer.quantize.pipeline import build_default_models
    from bouncer.quantize.report import format_report

    report = build_default_models(calib_dir=args.calib, tflite=args.tflite, force=args.force)
    if report.get("cached"):
        print(f"models already built in {home.models_dir()} (use --force to rebuild)")
    else:
        print(format_report(report))
    for runtime, paths in report["models"].items():
        print(f"{runtime}: fp32 {paths['fp32']}\n{runtime}: int8 {paths['int8']}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    folder = home.models_dir()
    files = sorted(p for p in folder.glob("*") if p.suffix in (".onnx", ".tflite")) if folder.exists() else []
    if not files:
        print(f"no models in {folder} (run: bouncer models build)")
    for p in files:
        print(f"{p.stat().st_size / 1e6:8.2f} MB  {p}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from bouncer.quantize.pipeline import quantize_model
    from bouncer.quantize.report import format_report

    report = quantize_model(
        args.model,
        args.calib,
        out=args.out,
        tflite=args.tflite,
        activations=args.activations,
        threads=args.threads,
        limit=args.limit,
    )
    print(format_report(report))
    if "cross_runtime" in report:
        for prec, c in report["cross_runtime"].items():
            worst = min(v["median"] for v in c["cosine"].values())
            print(f"[onnxruntime vs litert] {prec}: lowest median cosine over outputs {worst:.4f}")
    print(f"report: {report['report_path']}")
    return 0


def cmd_bench_backbone(args: argparse.Namespace) -> int:
    from bouncer.runtime.benchmarks import bench_backbone

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


def cmd_sim_dataset(args: argparse.Namespace) -> int:
    from bouncer.runtime.sources import simulator

    parts = tuple(p for p in args.parts.split(",") if p) if args.parts else simulator.KNOWN_CLASSES
    unknown = [p for p in parts if p not in simulator.PARTS]
    if unknown:
        raise BouncerError(f"--parts: unknown part(s) {', '.join(unknown)}; known: {', '.join(simulator.PARTS)}")
    if args.per_class < 1:
        raise BouncerError("--per-class: must be at least 1")
    simulator.write_dataset(args.out, parts, args.per_class, args.seed)
    print(f"wrote {args.per_class} frames of each of {', '.join(parts)} to {args.out}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Backbone only: top ImageNet class and feature norm per image (gates arrive with `bouncer score`)."""
    import numpy as np
    from bouncer.runtime import backends
    from bouncer.runtime.errors import ImageError
    from bouncer.runtime.images import iter_image_paths, read_bgr
    from bouncer.runtime.preprocess import preprocess

    model = backends.load(args.model or default_model(), args.threads)
    out = open(args.jsonl, "w") if args.jsonl else None  # noqa: SIM115 - closed below
    n_ok = n_bad = 0
    try:
        for path in iter_image_paths(args.paths):
            rec: dict[str, object] = {"path": str(path)}
            try:
                t0 = time.perf_counter()
                y = model.run(preprocess(read_bgr(path), model.card.preprocessing))
                rec["ms"] = round((time.perf_counter() - t0) * 1e3, 2)
                rec["feature_norm"] = round(float(np.linalg.norm(y[model.card.features])), 3)
                if model.card.logits:
                    z = y[model.card.logits][0].astype(np.float64)
                    p = np.exp(z - z.max())
                    p /= p.sum()
                    rec["top1"], rec["top1_prob"] = int(p.argmax()), round(float(p.max()), 4)
                n_ok += 1
            except ImageError as exc:
                rec["error"] = str(exc)
                n_bad += 1
            line = json.dumps(rec)
            if out:
                out.write(line + "\n")
            else:
                print(line)
    finally:
        if out:
            out.close()
    print(f"{n_ok} images scored, {n_bad} unreadable ({model.runtime}, {model.card.name})", file=sys.stderr)
    return 0


# ---- parser -----------------------------------------------------------------------------------


def _existing_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise BouncerError(f"{value}: not a folder")
    return p


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise BouncerError(f"{value!r}: not an integer") from None
    if n < 1:
        raise BouncerError(f"{value}: must be at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bouncer", description="On-device guard runtime for AI inspection cameras.")
    p.add_argument("--version", action="version", version=f"bouncer {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, parent=sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    d = add("doctor", cmd_doctor, "show runtimes, CPU features, hot path and model cache")
    d.add_argument("--json", action="store_true", help="print one JSON object")

    models = sub.add_parser("models", help="build and list the cached backbone models")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=Parser)
    b = add("build", cmd_models_build, "export EfficientNet-Lite0 to ONNX and quantize it (int8)", msub)
    b.add_argument("--calib", type=_existing_dir, help="calibration images of the camera's domain (default: simulator)")
    b.add_argument("--tflite", action="store_true", help="also make fp32 and int8 TFLite models (onnx2tf)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    add("list", cmd_models_list, "list cached models", msub)

    q = add("quantize", cmd_quantize, "make a static int8 ONNX model (QDQ, per-channel) and report its cost")
    q.add_argument("model", type=Path, help="fp32 .onnx model with a model card")
    q.add_argument("--calib", type=_existing_dir, required=True, help="folder of calibration images")
    q.add_argument("--out", type=Path, help="int8 model path (default: beside MODEL)")
    q.add_argument("--tflite", action="store_true", help="also make fp32/int8 TFLite models through onnx2tf")
    q.add_argument("--activations", choices=["u8", "s8"], default="u8", help="activation type (u8: VNNI fast path)")
    q.add_argument("--threads", type=_positive_int, default=1)
    q.add_argument("--limit", type=_positive_int, default=300, help="at most this many calibration images")

    bench = sub.add_parser("bench", help="benchmarks that print figures (last line: JSON)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    bb = add("backbone", cmd_bench_backbone, "fp32 vs int8 latency on ONNX Runtime and LiteRT", bsub)
    bb.add_argument("--rounds", type=_positive_int, default=5)
    bb.add_argument("--per-round", type=_positive_int, default=20)
    bb.add_argument("--no-litert", action="store_true", help="ONNX Runtime only")

    sim = sub.add_parser("sim", help="the production-line simulator")
    ssub = sim.add_subparsers(dest="sim_command", required=True, parser_class=Parser)
    sd = add("dataset", cmd_sim_dataset, "write an ImageFolder data set of simulated parts", ssub)
    sd.add_argument("--out", type=Path, required=True)
    sd.add_argument("--per-class", type=int, default=50)
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--parts", help="comma-separated part names (default: the known classes)")

    inf = add("infer", cmd_infer, "run the backbone on images: top ImageNet class and feature norm per image")
    inf.add_argument("paths", nargs="+", help="image files or folders (recursive)")
    inf.add_argument("--model", type=Path, help="model (default: cached int8 backbone)")
    inf.add_argument("--jsonl", type=Path, help="write JSON lines here instead of stdout")
    inf.add_argument("--threads", type=_positive_int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except BouncerError as exc:
        print(f"bouncer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bouncer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
