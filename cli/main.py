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
from bouncer.runtime.gates.decision import VERDICTS, Verdict

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BouncerError(f"{self.prog}: {message}")


def _print_json_last(obj: object) -> None:
    print(json.dumps(obj, sort_keys=False))


def default_model(runtime: str = "onnxruntime", precision: str = "int8") -> Path:
    """The cached default backbone, built on first use (where the [build] extra is installed)."""
    from bouncer.runtime.errors import ModelError

    try:
        return home.cached_model(runtime, precision)
    except ModelError:
        from bouncer.quantize.pipeline import build_default_models

        print(f"bouncer: building the default models into {home.models_dir()} (once)", file=sys.stderr)
        build_default_models(tflite=runtime == "litert")
        return home.cached_model(runtime, precision)


# ---- commands ---------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from bouncer.devices import profiles
    from bouncer.runtime.sources.genicam import list_cameras
    from bouncer.runtime.sysinfo import collect

    info = collect()
    info["device_profile"] = profiles.detect().name
    info["cameras"] = list_cameras()
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
    for cam in info["cameras"]:
        seen = cam.get("error") or f"genicam://{cam['stack']}/{cam['id']} ({cam['model']}, {cam['protocol']})"
        print(f"  camera {cam['stack']:<8}: {seen}")
    if not any("id" in c for c in info["cameras"]):
        print("  cameras        : none seen (GenICam over GigE Vision / USB3 Vision: docs/cameras.md)")
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from bouncer.quantize.pipeline import build_default_models
    from bouncer.quantize.report import format_report

    report = build_default_models(calib_dir=args.calib, tflite=args.tflite, force=args.force,
                                  activations=args.activations)  # fmt: skip
    if report.get("cached"):
        print(f"models already built in {home.models_dir()} (use --force to rebuild)")
    else:
        print(format_report(report))
    for runtime, paths in report["models"].items():
        print(f"{runtime}: fp32 {paths['fp32']}\n{runtime}: int8 {paths['int8']}")
    return 0


def cmd_models_example(args: argparse.Namespace) -> int:
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.kind == "detector":
        from bouncer.quantize.detector import make_detector

        made = make_detector(args.train, args.out, epochs=args.epochs or 12, seed=args.seed, log=say)
    else:
        from bouncer.quantize.user_models import make_anomaly, make_classifier

        make = make_classifier if args.kind == "classifier" else make_anomaly
        made = make(args.train, args.out, seed=args.seed, log=say)
    if args.tflite:
        from bouncer.quantize.user_models import tflite_twin

        made["tflite"] = str(tflite_twin(args.out, args.train, log=say))
    print(json.dumps(made))
    return 0


def cmd_models_expose(args: argparse.Namespace) -> int:
    from bouncer.quantize.expose import candidates, expose

    if args.list:
        for name, dims in candidates(args.model):
            print(f"{name}  {'x'.join(map(str, dims))}")
        return 0
    if not args.tensor or not args.out:
        raise BouncerError("models expose: give --tensor NAME and --out OUT.onnx (or --list to see the tensors)")
    card = expose(args.model, args.tensor, args.out, name=args.as_name or ("neck" if args.map else "features"),
                  as_map=args.map)  # fmt: skip
    print(json.dumps({"model": str(args.out), "features": card.features, "maps": list(card.maps),
                      "tensor": args.tensor}))  # fmt: skip
    return 0


def cmd_models_tflite(args: argparse.Namespace) -> int:
    from bouncer.quantize.user_models import tflite_twin

    if not args.model.is_file():
        raise BouncerError(f"{args.model}: no such model")
    out = tflite_twin(args.model, args.images, log=lambda m: print(m, file=sys.stderr), out=args.out)
    print(json.dumps({"model": str(args.model), "tflite": str(out)}))
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


def cmd_sim_dataset(args: argparse.Namespace) -> int:
    from bouncer.sim import simulator

    parts = tuple(p for p in args.parts.split(",") if p) if args.parts else simulator.KNOWN_CLASSES
    unknown = [p for p in parts if p not in simulator.PARTS]
    if unknown:
        raise BouncerError(f"--parts: unknown part(s) {', '.join(unknown)}; known: {', '.join(simulator.PARTS)}")
    if args.per_class < 1:
        raise BouncerError("--per-class: must be at least 1")
    simulator.write_dataset(args.out, parts, args.per_class, args.seed)
    print(f"wrote {args.per_class} frames of each of {', '.join(parts)} to {args.out}")
    return 0


def cmd_sim_detection(args: argparse.Namespace) -> int:
    from bouncer.sim import detection, simulator

    unknown = tuple(p for p in (args.unknown or "").split(",") if p)
    bad = [p for p in unknown if p not in simulator.PARTS]
    if bad:
        raise BouncerError(f"--unknown: unknown part(s) {', '.join(bad)}; known: {', '.join(simulator.PARTS)}")
    if not 0 <= args.unknown_rate <= 1:
        raise BouncerError(f"--unknown-rate: a share 0..1, got {args.unknown_rate}")
    detection.write_detection_dataset(args.out, args.frames, args.seed, unknown=unknown, unknown_rate=args.unknown_rate)
    print(f"wrote {args.frames} frames with boxes of {', '.join(simulator.KNOWN_CLASSES)} to {args.out}")
    return 0


def cmd_sim_line(args: argparse.Namespace) -> int:
    import json

    import cv2

    from bouncer.sim import incidents

    frames = args.frames or incidents.frames_needed(args.warmup)
    if frames < 1 or args.warmup < 1:
        raise BouncerError("--frames and --warmup must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "truth.jsonl", "w") as truth:
        for f in incidents.line(args.seed, frames, args.warmup):
            name = f"frame_{f.index:06d}.png"
            if not cv2.imwrite(str(args.out / name), f.frame):
                raise BouncerError(f"{args.out / name}: could not write")
            truth.write(json.dumps({"frame": name, "index": f.index, "incident": f.truth}) + "\n")
    plan = incidents.schedule(args.warmup, frames)
    print(f"wrote {frames} frames and truth.jsonl to {args.out}")
    for inc in plan:
        print(f"  {inc.kind:<15} frames {inc.start}-{inc.start + inc.length - 1}: caught by {inc.catch}")
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
                card = model.card
                if card.features:
                    rec["feature_norm"] = round(float(np.linalg.norm(y[card.features])), 3)
                if card.task == "classifier":
                    s = y[card.task_input][0]
                    rec["top1"], rec["top1_score"] = card.classes[int(s.argmax())], round(float(s.max()), 4)
                elif card.task == "anomaly":
                    rec["pred_score"] = round(float(np.ravel(y[card.task_input])[0]), 4)
                elif model.card.logits:
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


def _load_guard(gate: Path, model: Path | None, threads: int, sidecar: Path | None = None):
    from bouncer.runtime.gates.loading import open_guard

    return open_guard(gate, model, sidecar, threads=threads, default=default_model)


def _fit_backend(model: Path | None, sidecar: str | None, threads: int):
    """The model to fit a gate on: a user's classifier or anomaly model gets Bouncer's backbone beside it (its
    mid-level taps tell the unfamiliar apart where a fine-tuned embedding no longer does), unless --sidecar none."""
    from bouncer.runtime.gates.loading import open_backend

    side = Path(sidecar) if sidecar not in (None, "none") else None
    paired = False if sidecar == "none" else None
    backend = open_backend(model, side, paired=paired, threads=threads, default=default_model)
    if backend.card.task == "features" and sidecar not in (None, "none"):
        raise BouncerError("--sidecar goes with a user's classifier or anomaly model (card task), not a backbone")
    return backend


def cmd_fit(args: argparse.Namespace) -> int:
    from bouncer.fitting.fit import fit_gate

    backend = _fit_backend(args.model, args.sidecar, args.threads)
    heads = tuple(h for h in args.heads.split(",") if h) if args.heads else None
    if args.fusion and not heads:
        raise BouncerError("--fusion goes with --heads (without them, fit chooses the fusion with the heads)")
    bundle = fit_gate(
        backend,
        args.train,
        args.calib,
        target_accuracy=args.target_accuracy,
        delta=args.delta,
        review_budget=args.review_budget,
        target_catch=args.target_catch,
        defects_dir=args.defects,
        head_budget=args.head_budget,
        tiles=args.tiles,
        resize=args.resize,
        version=args.gate_version,
        heads=heads,
        fusion=args.fusion,
        seed=args.seed,
        false_alarm=args.false_alarm,
    )
    path = bundle.save(args.out)
    a, fit = bundle.acceptance, bundle.fit
    print(f"gate {bundle.version} -> {path} ({path.stat().st_size / 1e6:.2f} MB), classes: {', '.join(bundle.classes)}")
    if fit.detector:
        d = fit.detector
        print(
            f"detector: {d.calibration_boxes} true boxes in {fit.calibration_images} calibration frames; box "
            f"scores calibrated per class on {d.platt_frames} (own fit: "
            f"{', '.join(d.platt_own_classes) or 'none'}, else pooled), ECE {d.ece_before_calibration:.4f} -> "
            f"{d.ece_after_calibration:.4f}; frames "
            f"right (every box, no miss) {d.calibration_accuracy:.4f} of {d.threshold_frames}"
        )
    elif fit.anomaly:
        an = fit.anomaly
        print(f"anomaly score: {an.basis}; observed on calibration: false alarms {an.observed_false_alarm}, misses "
              f"among accepted {an.observed_miss_rate}")  # fmt: skip
    elif fit.classifier:
        c = fit.classifier
        print(
            f"train accuracy {c.train_accuracy:.4f}, calibration accuracy {c.calibration_accuracy:.4f}, "
            f"temperature {c.temperature:.3f}, ECE {c.ece_before_scaling:.4f} -> {c.ece_after_scaling:.4f}"
        )
    print(
        f"OOD heads {', '.join(bundle.fusion.names)} (fusion {bundle.fusion.method}; "
        f"{'named with --heads' if heads else 'frame-level' if fit.detector else 'chosen on held-out classes'}; "
        f"reading "
        f"{' and '.join(bundle.selection.get('reads', ['model']))}), "
        f"threshold {bundle.ood_threshold:.3f}"
    )
    _print_costly_heads(bundle, backend)
    if bundle.operating:
        from bouncer.fitting.operating import curve_plot, describe

        png = curve_plot(bundle.operating, path.with_name(path.name + ".curve.png"))
        print(describe(bundle.operating) + (f"; curve: {png}" if png else ""))
    bound = "not certified" if a.error_bound is None else f"{a.error_bound:.4f}"
    if a.threshold is None:
        print(f"acceptance: none (no threshold reaches accuracy {a.target_accuracy} at delta {a.delta})")
    else:
        print(
            f"acceptance: {'any confidence' if a.threshold == 0 else f'confidence >= {a.threshold:.6f}'}; "
            f"accuracy >= {a.target_accuracy} with probability >= "
            f"{1 - a.delta:.2f}: error bound {bound} from {a.n_errors} errors in {a.n_accepted} accepted "
            f"of {a.n_calibration} calibration frames (coverage {fit.calibration_coverage or 0.0:.1%})"
        )
    return 0


def _print_costly_heads(bundle, backend) -> None:
    """A patch head costs far more per frame than the pooled heads: say how much, measured here on one frame."""
    import numpy as np

    from bouncer.fitting.select import HEAD_BUDGET
    from bouncer.runtime.gates.patch import PatchKnnHead

    heads = [h for h in bundle.ood_heads if isinstance(h, PatchKnnHead)]
    pp = bundle.preprocessing
    if bundle.tiling is not None:
        one, tiles = (np.zeros((n, 3, pp.height, pp.width), np.float32) for n in (1, bundle.tiling.count))
        backend.run(tiles)
        t0 = time.perf_counter()
        backend.run(one)
        t1 = time.perf_counter()
        backend.run(tiles)
        t2 = time.perf_counter()
        n, full, alone = bundle.tiling.count, (t2 - t0) * 1e3, (t1 - t0) * 1e3
        print(f"cost: tiles {bundle.tiling} ({n} tiles): {1 + n} backbone calls per frame, {full:.1f} ms here "
              f"against {alone:.1f} ms for the whole frame alone (--tiles off: none)")  # fmt: skip
    if not heads:
        return
    outputs = backend.run(np.zeros((1, 3, pp.height, pp.width), np.float32))
    t0 = time.perf_counter()
    backend.run(np.zeros((1, 3, pp.height, pp.width), np.float32))
    call = time.perf_counter() - t0
    for h in heads:
        cells = int(np.prod(h.vectors(outputs).shape[2:]))
        t0 = time.perf_counter()
        for _ in range(5):
            h.score(outputs)
        t = (time.perf_counter() - t0) / 5
        print(f"cost: {h.kind}:{h.source} streams {h.cost(cells):,} elements per frame ({cells} patches x "
              f"{h.bank.shape[0]} bank x {h.bank.shape[1]}; the default heads stay under {HEAD_BUDGET:,}): "
              f"{t * 1e3:.2f} ms here, {t / call:.0%} of one backbone call")  # fmt: skip


def cmd_score(args: argparse.Namespace) -> int:
    from bouncer.runtime.errors import ImageError
    from bouncer.runtime.gates.decision import unreadable
    from bouncer.runtime.images import iter_image_paths, read_bgr

    guard = _load_guard(args.gate, args.model, args.threads, args.sidecar)
    counts: dict[str, int] = {}
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    if args.explain:
        args.explain.mkdir(parents=True, exist_ok=True)
    with open(args.jsonl, "w") as out:
        for n, given in enumerate(args.paths):
            for path in iter_image_paths([given]):
                overlay_path = None
                try:
                    frame = read_bgr(path)
                    decision, outputs, _ = guard.score_frame(frame)
                    if args.explain and outputs is not None and decision.decision != Verdict.ACCEPT:
                        overlay_path = _write_overlay(guard, frame, outputs, args.explain, path, n)
                except ImageError as exc:
                    decision = unreadable(str(exc))
                rec = {"path": str(path), **decision.to_dict()}
                if args.explain:
                    rec["explain"] = overlay_path
                out.write(json.dumps(rec) + "\n")
                counts[decision.decision] = counts.get(decision.decision, 0) + 1
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in VERDICTS)
    print(f"{sum(counts.values())} images: {summary} -> {args.jsonl}")
    return 0


def _write_overlay(guard, frame, outputs, folder: Path, path: Path, n: int) -> str | None:
    """The frame with the heatmap of where it is unusual, for offline review."""
    import cv2

    from bouncer.runtime.gates import explain

    heat = explain.heatmap(guard.bundle, outputs, anomaly_map=guard.backend.card.anomaly_map)
    if heat is None:
        return None
    out = folder / f"{n:02d}-{Path(path).stem}.explain.png"
    if not cv2.imwrite(str(out), explain.overlay(frame, heat)):
        raise BouncerError(f"{out}: could not write the overlay")
    return str(out)


def cmd_eval(args: argparse.Namespace) -> int:
    from bouncer.fitting.evaluate import evaluate

    guard = _load_guard(args.gate, args.model, args.threads, args.sidecar)
    if guard.backend.card.task == "detector":
        from bouncer.fitting.detector import evaluate_detector

        assert guard.backend.card.detections is not None
        others = {"unknown": args.unknown, "foreign": args.foreign}
        r = evaluate_detector(guard.bundle, guard.backend, args.known, others, guard.backend.card.detections)
        for name in ("guard", "every_box_over_half"):
            e = r[name]
            print(f"{name:<20} accepted error {e['accepted_error']:.4f}  coverage {e['coverage']:.4f}  "
                  f"({e['accepted']} of {r['known_frames']} frames)")  # fmt: skip
        for name, e in r["should_not_pass"].items():
            print(f"{name}: {e['accepted']} of {e['frames']} frames accepted")
        _print_json_last(r)
        return 0
    report = evaluate(
        guard, args.known, args.unknown, args.foreign, corrupt=args.corrupt, out_dir=args.out, seed=args.seed
    )
    print("frames: " + ", ".join(f"{k} {v}" for k, v in report["frames"].items()))
    for name, e in report["methods"].items():
        op = e["operating_point"]
        at = ", ".join(
            f"{c}: {v if v is None else round(v, 4)}" for c, v in e["accepted_error_at_clean_coverage"].items()
        )
        print(
            f"{name:<24} accepted error {op['accepted_error']:.4f}  clean coverage {op['clean_coverage']:.4f}  "
            f"garbage accepted {op['garbage_accepted']}  | error at coverage {at}"
        )
    au = report["ood_auroc"]
    print(
        f"OOD AUROC unknown {au['unknown']}, foreign {au['foreign']}; ECE {report['ece']}; "
        f"clean accuracy {report['clean_accuracy']}"
    )
    if "ood_auroc_last_layer_mahalanobis" in report:
        mb = report["ood_auroc_last_layer_mahalanobis"]
        print(f"last-layer Mahalanobis alone: AUROC unknown {mb['unknown']}, foreign {mb['foreign']}")
    print(f"report: {args.out / 'report.json'}, plots: risk_coverage.png, reliability.png")
    _print_json_last(
        {k: report[k] for k in ("gate", "frames", "ood_auroc", "ece", "clean_accuracy")}
        | {"methods": {k: v["operating_point"] for k, v in report["methods"].items()}}
    )
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """Write the systemd unit for a camera's config (docs/service.md); print the steps that put it to work."""
    from bouncer.devices.systemd import unit_file
    from bouncer.runtime.config import load_config

    cfg = load_config(args.config, {})
    if not cfg.device.id:
        raise BouncerError(f"{args.config}: device.id is empty; a service needs a fixed device id")
    state = Path("/var/lib") / args.name
    if not Path(cfg.device.data_dir).resolve().is_relative_to(state):
        raise BouncerError(f"{args.config}: device.data_dir {cfg.device.data_dir!r} lies outside {state}, the only "
                           "place the service may write; set data_dir under it")  # fmt: skip
    text = unit_file(args.config, cfg.device.id, args.user, args.name, args.watchdog)
    unit = f"bouncer-{cfg.device.id}.service"
    if args.print:
        print(text, end="")
        return 0
    args.unit_dir.mkdir(parents=True, exist_ok=True)
    (args.unit_dir / unit).write_text(text)
    print(f"wrote {args.unit_dir / unit}; then, as root:\n"
          f"  useradd --system --home {state} --shell /usr/sbin/nologin {args.user}   # once\n"
          f"  systemctl daemon-reload && systemctl enable --now {unit}\n"
          f"  journalctl -u {unit} -f")  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from bouncer.devices.loop import Device
    from bouncer.runtime.config import load_config

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format='{"ts": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "msg": "%(message)s"}',
    )
    overrides = {
        "source.uri": args.source,
        "gate.bundle": args.gate,
        "gate.model": args.model,
        "gate.sidecar": args.sidecar,
        "mqtt.broker": args.broker,
        "device.id": args.device_id,
        "device.data_dir": args.data_dir,
        "device.profile": args.profile,
        "metrics.port": args.metrics_port,
        "mqtt.protocol": args.protocol,
    }
    cfg = load_config(args.config, {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})
    summary = Device(cfg).run(once=args.once, drain_timeout=args.drain_timeout)
    d = summary.decisions
    print(
        f"{summary.frames} frames: {d['accept']} accept, {d['review']} review, {d['reject']} reject; "
        f"{summary.skipped_done} already done; {summary.events} events; {summary.undelivered} undelivered"
    )
    if args.once and summary.undelivered and cfg.mqtt.broker:
        print(
            f"bouncer: {summary.undelivered} messages not delivered within {args.drain_timeout:g} s; they stay in "
            f"the outbox for the next start",
            file=sys.stderr,
        )
    _print_json_last(summary.to_dict())
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from bouncer.fitting.datasets import split_dataset

    def names(v: str | None) -> list[str]:
        return [c for c in (v or "").split(",") if c]

    try:
        a, b, c = (float(x) for x in args.fractions.split(","))
        fractions = (a, b, c)
    except ValueError:
        raise BouncerError(f"--fractions: expected three numbers like 0.4,0.35,0.25, got {args.fractions!r}") from None
    counts = split_dataset(
        args.root, args.out, names(args.known), names(args.unknown), fractions, args.seed, copy=args.copy
    )
    for split, per_class in counts.items():
        if per_class:
            print(f"{split:<8} " + ", ".join(f"{c} {n}" for c, n in per_class.items()))
    return 0


# ---- parser -----------------------------------------------------------------------------------


def _existing_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise BouncerError(f"{value}: not a folder")
    return p


def _existing_file(value: str) -> Path:
    p = Path(value)
    if not p.is_file():
        raise BouncerError(f"{value}: no such file")
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
    b.add_argument("--activations", choices=["auto", "u8", "s8"], default="auto",
                   help="int8 activation type (auto: u8 on CPUs with VNNI, s8 elsewhere; set it when the cameras' CPU "
                   "differs from this one)")  # fmt: skip
    add("list", cmd_models_list, "list cached models", msub)
    ex = add("example", cmd_models_example, "make a model of the kind plants bring, to guard: a classifier trained "
             "on the known classes, a PaDiM-style anomaly model on good frames ([build] extra), or a YOLOv8n detector "
             "([detector-train] extra)", msub)  # fmt: skip
    ex.add_argument("kind", choices=["classifier", "anomaly", "detector"])
    ex.add_argument("--train", type=_existing_dir, required=True, help="classifier: one folder per class; "
                    "anomaly: good frames; detector: a detection folder (bouncer sim detection)")  # fmt: skip
    ex.add_argument("--epochs", type=_positive_int, help="detector: training epochs (default 12)")
    ex.add_argument("--out", type=Path, required=True, help=".onnx file (its card is written beside it)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--tflite", action="store_true", help="also its TFLite twin (fp32 and int8, through onnx2tf)")

    tf = add("tflite", cmd_models_tflite, "your ONNX model (with its card) as fp32 TFLite for devices that run "
             "LiteRT, outputs matched back to their names (an int8 twin too, except for detectors; the "
             "[tflite-export] extra)", msub)  # fmt: skip
    tf.add_argument("model", type=Path, help="the ONNX model; its card (MODEL.card.json) beside it")
    tf.add_argument("--images", type=Path, required=True, help="a folder of the line's images (any layout): "
                    "calibration for the converter and the check of its outputs")  # fmt: skip
    tf.add_argument("--out", type=Path, help="where to write the .tflite (default: beside the model)")
    xp = add("expose", cmd_models_expose, "add an intermediate tensor of your ONNX model to its outputs, as the "
             "`features` the OOD heads read, without re-exporting ([build] extra)", msub)  # fmt: skip
    xp.add_argument("model", type=_existing_file, help="your .onnx model, with its card beside it")
    xp.add_argument("--tensor", help="the graph tensor to expose (N x D, or N x C x H x W: pooled)")
    xp.add_argument("--out", type=Path, help="the new .onnx file (its card is written beside it)")
    xp.add_argument("--as", dest="as_name", help="the new output's name (default: features, with --map: neck)")
    xp.add_argument("--map", action="store_true", help="keep an N x C x H x W tensor a map, for heads that "
                    "score each cell (patch:NAME) or each channel's maximum (knn:NAME@max), e.g. a "
                    "detector's neck")  # fmt: skip
    xp.add_argument("--list", action="store_true", help="list the 2-D and 4-D tensors near the graph's end")

    q = add("quantize", cmd_quantize, "make a static int8 ONNX model (QDQ, per-channel) and report its cost")
    q.add_argument("model", type=Path, help="fp32 .onnx model with a model card")
    q.add_argument("--calib", type=_existing_dir, required=True, help="folder of calibration images")
    q.add_argument("--out", type=Path, help="int8 model path (default: beside MODEL)")
    q.add_argument("--tflite", action="store_true", help="also make fp32/int8 TFLite models through onnx2tf")
    q.add_argument(
        "--activations",
        choices=["auto", "u8", "s8"],
        default="auto",
        help="activation type (auto: u8 on CPUs with VNNI, its fast and accurate path; s8 elsewhere)",
    )
    q.add_argument("--threads", type=_positive_int, default=1)
    q.add_argument("--limit", type=_positive_int, default=300, help="at most this many calibration images")

    from bouncer.cli.bench import add_bench

    add_bench(sub, add)

    sim = sub.add_parser("sim", help="the production-line simulator")
    ssub = sim.add_subparsers(dest="sim_command", required=True, parser_class=Parser)
    sd = add("dataset", cmd_sim_dataset, "write an ImageFolder data set of simulated parts", ssub)
    sd.add_argument("--out", type=Path, required=True)
    sd.add_argument("--per-class", type=int, default=50)
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--parts", help="comma-separated part names (default: the known classes)")
    sdt = add("detection", cmd_sim_detection, "write frames with several parts each and their boxes (images/, "
              "labels/ as YOLO rows, boxes.jsonl, classes.json)", ssub)  # fmt: skip
    sdt.add_argument("--out", type=Path, required=True)
    sdt.add_argument("--frames", type=_positive_int, default=200)
    sdt.add_argument("--seed", type=int, default=0)
    sdt.add_argument("--unknown", help="comma-separated parts the line never labelled (e.g. bolt,giraffe)")
    sdt.add_argument("--unknown-rate", type=float, default=0.0, help="share of frames with one unknown object")
    sl = add("line", cmd_sim_line, "write the line with its incident schedule as frames + truth.jsonl", ssub)
    sl.add_argument("--out", type=Path, required=True)
    sl.add_argument("--seed", type=int, default=0)
    sl.add_argument("--frames", type=int, help="default: what the schedule needs")
    sl.add_argument("--warmup", type=int, default=500, help="clean frames before the first incident - 100")

    inf = add("infer", cmd_infer, "run the backbone on images: top ImageNet class and feature norm per image")
    inf.add_argument("paths", nargs="+", help="image files or folders (recursive)")
    inf.add_argument("--model", type=Path, help="model (default: cached int8 backbone)")
    inf.add_argument("--jsonl", type=Path, help="write JSON lines here instead of stdout")
    inf.add_argument("--threads", type=_positive_int, default=1)

    r = add("run", cmd_run, "run the guard on a camera, video, folder or the simulator; flag frames over MQTT")
    r.add_argument("config", type=Path, nargs="?", help="TOML config (docs/config.md); flags override it")
    r.add_argument(
        "--source",
        help="folder, video file, camera index, rtsp:// or http:// URL, genicam://aravis/ID, "
        "genicam://pylon/SERIAL, or sim:SEED",
    )
    r.add_argument("--gate", type=Path, help="gate bundle")
    r.add_argument("--model", type=Path, help="backbone (default: cached int8 EfficientNet-Lite0)")
    r.add_argument("--sidecar", type=Path, help="the gate's sidecar backbone, if it has one (default: cached)")
    r.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    r.add_argument("--protocol", choices=["v5", "v311"], help="MQTT protocol version (default v5)")
    r.add_argument("--device-id", help="this device's id (topic segment)")
    r.add_argument("--data-dir", type=Path, help="outbox and progress live here")
    r.add_argument("--profile", help="device profile (default: detect)")
    r.add_argument("--metrics-port", type=int, help="Prometheus metrics on this port")
    r.add_argument("--once", action="store_true", help="process a finite source once, deliver, exit")
    r.add_argument("--drain-timeout", type=float, default=60.0, help="--once: seconds to wait for delivery")
    r.add_argument("--verbose", action="store_true", help="log events (JSON lines on stderr)")

    ins = add("install", cmd_install, "write the systemd unit that runs a camera's config as a supervised service "
              "(watchdog, restart, hardening; docs/service.md)")  # fmt: skip
    ins.add_argument("config", type=Path, help="the camera's TOML config (device.id set, device.data_dir under "
                     "/var/lib/NAME)")  # fmt: skip
    ins.add_argument("--user", default="bouncer", help="the system user it runs as (default: bouncer)")
    ins.add_argument("--name", default="bouncer", help="its state folder, /var/lib/NAME (default: bouncer)")
    ins.add_argument("--watchdog", type=int, default=30, help="seconds without a frame before systemd restarts it")
    ins.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"), help="where to write the unit")
    ins.add_argument("--print", action="store_true", help="print the unit instead of writing it")

    data = sub.add_parser("data", help="data set helpers")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    ds = add("split", cmd_data_split, "deterministic train/calib/test split with held-out (unknown) classes", dsub)
    ds.add_argument("root", type=_existing_dir, help="ImageFolder data set")
    ds.add_argument("--out", type=Path, required=True)
    ds.add_argument("--known", required=True, help="comma-separated classes to fit on")
    ds.add_argument("--unknown", help="comma-separated classes held out as never-seen defect types")
    ds.add_argument("--fractions", default="0.4,0.35,0.25", help="train,calib,test fractions")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--copy", action="store_true", help="copy files instead of linking them")

    from bouncer.fitting.operating import DEFAULT_BUDGET

    f = add("fit", cmd_fit, "fit a gate bundle from labelled training and calibration folders (ImageFolder layout)")
    f.add_argument("--train", type=_existing_dir, required=True, help="one sub-folder of images per class")
    f.add_argument("--calib", type=_existing_dir, required=True, help="held-out images of the same classes")
    f.add_argument("--out", type=Path, required=True, help="bundle file to write")
    f.add_argument("--model", type=Path, help="backbone, or your classifier/anomaly model with its card (default: "
                   "cached int8 EfficientNet-Lite0)")  # fmt: skip
    f.add_argument("--sidecar", help="with your own model: Bouncer's backbone beside it for OOD heads (default: "
                   "the cached int8 EfficientNet-Lite0; 'none': heads on your model's own features only)")  # fmt: skip
    f.add_argument("--false-alarm", type=float, default=0.01,
                   help="anomaly models: good frames flagged at most this often (conformal)")  # fmt: skip
    f.add_argument("--target-accuracy", type=float, default=0.99, help="accuracy guaranteed on accepted frames")
    f.add_argument("--delta", type=float, default=0.1, help="the guarantee holds with probability 1 - delta")
    f.add_argument("--review-budget", type=float, default=DEFAULT_BUDGET,
                   help="share of good frames the line can afford to send to review as unfamiliar, certified at "
                   f"--delta (default {DEFAULT_BUDGET}; docs/bundle.md, 'The operating point')")  # fmt: skip
    f.add_argument(
        "--target-catch",
        type=float,
        help="the lowest flag rate within the budget estimated to catch this share of never-seen defects",
    )
    f.add_argument(
        "--defects",
        type=Path,
        help="a folder of labelled-bad frames (sub-folders allowed): they choose heads and the catch estimate",
    )
    f.add_argument(
        "--heads",
        help="OOD heads, comma-separated maha:OUT, patch:MAP, knn:OUT, knn:MAP@max, knn:OUT@tiles (default: chosen "
        "from the "
        "line's own classes, each held out in turn)",
    )
    f.add_argument("--fusion", choices=["max", "sum", "mean"], help="with --heads: how head scores combine (max)")
    f.add_argument("--head-budget", type=_positive_int, default=2_000_000,
                   help="elements one frame's chosen heads may stream (default 2,000,000: the guard within 10%% of "
                   "the backbone call); above it the patch heads (patchknn) become candidates, e.g. 150000000, at "
                   "several ms a frame (fit prints what they cost)")  # fmt: skip
    f.add_argument("--tiles", default="off",
                   help="tile heads for small defects on large frames: off (default), auto (a grid for the line's "
                   "frame size, where they are at least twice the backbone input on both sides) or ROWSxCOLS; tile "
                   "heads are then candidates, and chosen ones cost one backbone call per tile (fit prints "
                   "it)")  # fmt: skip
    f.add_argument("--seed", type=int, default=0, help="seed of the synthetic defects used in head selection")
    f.add_argument("--resize", choices=["stretch", "letterbox"], help="override the model's resize mode")
    f.add_argument("--gate-version", help="version string (default: UTC timestamp)")
    f.add_argument("--threads", type=_positive_int, default=2)

    sc = add("score", cmd_score, "apply a gate: one JSON line per image with decision, label, confidence, reasons")
    sc.add_argument("--gate", type=Path, required=True)
    sc.add_argument("--model", type=Path, help="the gate's model (default: cached int8 EfficientNet-Lite0)")
    sc.add_argument("--sidecar", type=Path, help="the gate's sidecar backbone, if it has one (default: cached)")
    sc.add_argument("--jsonl", type=Path, required=True, help="output file, one JSON object per image")
    sc.add_argument("paths", nargs="+", help="image files or folders (recursive)")
    sc.add_argument("--explain", type=Path, help="write heatmap overlays of flagged frames into this folder")
    sc.add_argument("--threads", type=_positive_int, default=1)

    ev = add("eval", cmd_eval, "measure a gate on clean, unknown, foreign, corrupted and garbage frames")
    ev.add_argument("--gate", type=Path, required=True)
    ev.add_argument("--model", type=Path, help="the gate's model (default: cached int8 EfficientNet-Lite0)")
    ev.add_argument("--sidecar", type=Path, help="the gate's sidecar backbone, if it has one (default: cached)")
    ev.add_argument("--known", type=_existing_dir, required=True, help="labelled test frames of the gate's classes")
    ev.add_argument("--unknown", type=_existing_dir, action="append", default=[], help="defect types never fitted")
    ev.add_argument("--foreign", type=_existing_dir, action="append", default=[], help="foreign objects / photos")
    ev.add_argument("--corrupt", action="store_true", help="add corrupted and garbage frames made from --known")
    ev.add_argument("--out", type=Path, default=Path("bouncer-eval"), help="folder for report.json and plots")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=_positive_int, default=2)

    from bouncer.cli.station import add_station

    add_station(sub, add, _existing_dir)

    from bouncer.cli.demo import add_demo

    add_demo(sub, add)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from bouncer.cli.station import normalise_argv

        args = build_parser().parse_args(normalise_argv(sys.argv[1:] if argv is None else list(argv)))
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
