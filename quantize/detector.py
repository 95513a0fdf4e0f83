"""A YOLO detector of the kind plants bring, trained here: `bouncer models example detector`.

Ultralytics builds YOLOv8n from the yaml file it ships (no weights are downloaded) and trains it on a detection
folder (`images/`, `labels/` with YOLO rows, `classes.json`: what `bouncer sim detection` writes). The model is
exported raw, without NMS: output `output0` of shape 1 x (4 + C) x N (box centre and size in input pixels, then
one sigmoid score per class), the layout the guard decodes itself. Ultralytics is AGPL-3.0: it is a build-time
tool here (the `[detector-train]` extra), never imported by the runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bouncer.quantize.export import fold_constants
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.modelcard import ModelCard, write_card_file
from bouncer.runtime.preprocess import Preprocessing

ARCH = "yolov8n.yaml"
OUTPUT = "output0"  # the name ultralytics' own ONNX export gives the raw predictions


def detector_preprocessing(size: int) -> Preprocessing:
    """What ultralytics feeds its models: RGB / 255, letterboxed to a square, grey 114 borders."""
    return Preprocessing(height=size, width=size, color="rgb", mean=(0.0,) * 3, std=(255.0,) * 3, resize="letterbox",
                         pad=114.0)  # fmt: skip


def detection_classes(folder: Path) -> list[str]:
    for need in ("images", "labels", "classes.json"):
        if not (folder / need).exists():
            raise BouncerError(f"{folder}: a detection folder needs images/, labels/ (YOLO rows) and classes.json "
                               f"(`bouncer sim detection` writes one); {need} is missing")  # fmt: skip
    try:
        classes = json.loads((folder / "classes.json").read_text())
    except ValueError as exc:
        raise BouncerError(f"{folder / 'classes.json'}: not JSON ({exc})") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BouncerError(f"{folder / 'classes.json'}: expected a list of class names")
    return classes


def make_detector(
    train: Path, out: Path, epochs: int = 12, size: int = 320, seed: int = 0, log=print
) -> dict[str, Any]:
    """Train YOLOv8n on `train` and export it raw to `out` with its card."""
    classes = detection_classes(train)
    work = Path(tempfile.mkdtemp(prefix="bouncer-yolo-"))
    # ultralytics keeps settings in a config folder and checks the network: keep both inside the work folder
    os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "config"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    try:
        import torch
        from ultralytics import YOLO
        from ultralytics.nn.modules import Detect
    except ImportError as exc:
        raise BouncerError(
            "training the example detector needs ultralytics (AGPL-3.0, build time only): pip install "
            f"'bouncer[detector-train]' && pip install --no-deps ultralytics ({exc})"
        ) from None
    try:
        return _train_and_export(YOLO, Detect, torch, train, out, classes, work, epochs, size, seed, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_and_export(YOLO, Detect, torch, train: Path, out: Path, classes: list[str], work: Path, epochs: int,
                      size: int, seed: int, log) -> dict[str, Any]:  # fmt: skip
    data = work / "data.yaml"
    names = "\n".join(f"  {i}: {json.dumps(c)}" for i, c in enumerate(classes))
    data.write_text(f"path: {train.resolve()}\ntrain: images\nval: images\nnames:\n{names}\n")
    log(f"detector: training {ARCH} on {train} ({', '.join(classes)}), {epochs} epochs at {size} px")
    model = YOLO(ARCH)
    # ultralytics prints its progress on stdout: keep stdout for the command's one JSON line
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        model.train(data=str(data), epochs=epochs, imgsz=size, batch=16, workers=0, device="cpu", amp=False,
                    plots=False, val=False, project=str(work / "runs"), name="train", exist_ok=True, seed=seed,
                    deterministic=True, verbose=False)  # fmt: skip
    net = model.model.float().eval()
    for m in net.modules():
        if isinstance(m, Detect):
            m.export, m.format, m.dynamic = True, "onnx", False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(tmp), input_names=["images"],
                          output_names=[OUTPUT], opset_version=17, dynamo=False)  # fmt: skip
    fold_constants(tmp)
    tmp.replace(out)
    card = ModelCard(name=f"example-detector-{train.name}", task="detector", detections=OUTPUT, layout="ultralytics",
                     classes=tuple(classes), features=None, logits=None,
                     preprocessing=detector_preprocessing(size))  # fmt: skip
    write_card_file(out, card)
    log(f"detector -> {out}")
    return {"model": str(out), "classes": classes, "epochs": epochs, "size": size}
