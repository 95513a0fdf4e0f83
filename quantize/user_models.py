"""Models of the kinds plants bring, made here from a line's own folders (no model hub is reachable): what
`bouncer models example` writes, what the tests and `bouncer bench user-model` guard.

- classifier: a new two-layer head trained on the known classes over a frozen ImageNet EfficientNet-Lite0,
  exported whole with outputs `probs` (softmax) and `embedding` (the head's hidden layer), as a fine-tuned
  classifier would be; its card (`task = "classifier"`) is written beside it, as a user would.
- anomaly: PatchCore-style: a memory bank of patch features (two mid-level maps, stride 8 and 16, each patch
  averaged with its neighbours) of defect-free frames; a patch's score is its distance to the nearest good patch.
  Outputs the raw image score `pred_score` (never thresholded) and the `anomaly_map`, the names anomalib exports.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.quantize.export import LITE_PREPROCESSING, _load_lite0, fold_constants
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.images import image_folder, list_images, read_bgr
from bouncer.runtime.modelcard import ModelCard, write_card_file
from bouncer.runtime.preprocess import preprocess

HIDDEN = 128
MAP_SIZE = 28  # stride 8 on 224
BANK = 4000  # good patches kept (a random subset; PatchCore proper picks a greedy coreset)
TOP_PATCHES = 8  # the image score: mean distance of its 8 most unfamiliar patches


def _inputs(paths: list[Path]) -> np.ndarray:
    return np.concatenate([preprocess(read_bgr(p), LITE_PREPROCESSING) for p in paths])


def _batches(torch, fn: Callable, x: np.ndarray, size: int = 16) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([fn(torch.from_numpy(x[i : i + size])).numpy() for i in range(0, len(x), size)])


def _export(torch, module, out: Path, names: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    dummy = torch.zeros(1, 3, LITE_PREPROCESSING.height, LITE_PREPROCESSING.width)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), str(tmp), input_names=["input"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *names]}, opset_version=17,
                          dynamo=False)  # fmt: skip
    fold_constants(tmp)
    tmp.replace(out)


def make_classifier(train: Path, out: Path, epochs: int = 300, seed: int = 0, log=print) -> dict[str, Any]:
    """Train the head on the known classes of `train` (one folder per class) and export the whole classifier."""
    _, tapped = _load_lite0()  # says what to install when the [build] extra is missing
    import torch

    torch.manual_seed(seed)
    folders = image_folder(train)
    classes = sorted(folders)
    if len(classes) < 2:
        raise BouncerError(f"{train}: a classifier needs at least two class folders")
    paths = [p for c in classes for p in folders[c]]
    labels = np.array([i for i, c in enumerate(classes) for _ in folders[c]], np.int64)
    log(f"classifier: features of {len(paths)} training images ({', '.join(classes)})")
    feats = _batches(torch, lambda x: tapped(x)[1], _inputs(paths))
    nn = torch.nn
    head = nn.Sequential(nn.Linear(feats.shape[1], HIDDEN), nn.ReLU(), nn.Dropout(0.2), nn.Linear(HIDDEN, len(classes)))
    counts = np.bincount(labels, minlength=len(classes))
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(len(labels) / (len(classes) * counts), dtype=torch.float32))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(head(x), y)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        train_acc = float((head(x).argmax(1) == y).float().mean())

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tapped, self.head = tapped, head

        def forward(self, inp):
            f = self.tapped(inp)[1]
            emb = self.head[1](self.head[0](f))
            return torch.softmax(self.head[3](emb), dim=1), emb

    _export(torch, Classifier().eval(), out, ["probs", "embedding"])
    card = ModelCard(name=f"example-classifier-{train.name}", task="classifier", features="embedding", logits=None,
                     scores="probs", score_kind="softmax", classes=tuple(classes),
                     preprocessing=LITE_PREPROCESSING)  # fmt: skip
    write_card_file(out, card)  # no model_hash: bound to the file's bytes when loaded
    log(f"classifier -> {out} (train accuracy {train_acc:.3f}, loss {float(loss.detach()):.3f})")
    return {"model": str(out), "classes": classes, "train_accuracy": round(train_acc, 4)}


def make_anomaly(train: Path, out: Path, seed: int = 0, log=print) -> dict[str, Any]:
    """Build the memory bank from the good frames of `train` (one folder, or every image under it) and export."""
    _, tapped = _load_lite0()
    import torch

    net = tapped.net
    paths = [p for ps in image_folder(train).values() for p in ps]
    if len(paths) < 10:
        raise BouncerError(f"{train}: an anomaly model needs at least 10 good images, found {len(paths)}")
    F = torch.nn.functional

    def patch_features(inp):
        y = net._swish(net._bn0(net._conv_stem(inp)))
        keep = {}
        for i, block in enumerate(net._blocks[:11]):
            y = block(y)
            if i in (4, 10):
                keep[i] = y
        up = F.interpolate(keep[10], size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False)
        return F.avg_pool2d(torch.cat([keep[4], up], dim=1), 3, 1, 1)  # each patch with its neighbourhood

    log(f"anomaly: patch features of {len(paths)} good images")
    f = _batches(torch, patch_features, _inputs(paths))  # N x C x 28 x 28
    patches = f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1])
    rng = np.random.default_rng(seed)
    bank = patches[rng.choice(len(patches), min(BANK, len(patches)), replace=False)].astype(np.float32)
    size = (LITE_PREPROCESSING.height, LITE_PREPROCESSING.width)

    class PatchCore(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net  # registered, so the exporter stores its weights as initializers
            self.register_buffer("bank", torch.from_numpy(bank))
            self.register_buffer("bank_sq", torch.from_numpy((bank.astype(np.float64) ** 2).sum(1).astype(np.float32)))

        def forward(self, inp):
            p = patch_features(inp)
            n, _, h, w = p.shape
            q = p.flatten(2).transpose(1, 2)  # N x HW x C
            d2 = (q * q).sum(-1, keepdim=True) + self.bank_sq - 2 * q @ self.bank.T
            dist = torch.sqrt(torch.clamp(d2.min(-1).values, min=0.0))  # N x HW: distance to the nearest good patch
            amap = F.interpolate(dist.reshape(n, 1, h, w), size=size, mode="bilinear", align_corners=False)
            return dist.topk(TOP_PATCHES, dim=1).values.mean(1), amap

    _export(torch, PatchCore().eval(), out, ["pred_score", "anomaly_map"])
    card = ModelCard(name=f"example-anomaly-{train.name}", task="anomaly", features=None, logits=None,
                     pred_score="pred_score", anomaly_map="anomaly_map", preprocessing=LITE_PREPROCESSING)  # fmt: skip
    write_card_file(out, card)  # no model_hash: bound to the file's bytes when loaded
    log(f"anomaly model -> {out} ({len(paths)} good images, a bank of {len(bank)} of {len(patches)} patches)")
    return {"model": str(out), "good_images": len(paths), "bank": len(bank)}


def tflite_twin(model: Path, images: Path, log=print, out: Path | None = None) -> Path:
    """The same model as fp32 TFLite (onnx2tf, the [tflite-export] extra), its card beside it, outputs matched to
    the ONNX model's by shape and value: the LiteRT runtime guards it as it guards the ONNX one. An int8 twin
    beside it too, except for a detector: one int8 scale for box corners (hundreds of pixels) and class scores
    (0..1) rounds every score to zero."""
    from bouncer.quantize.tflite import convert_tflite
    from bouncer.runtime import backends

    onnx_model = backends.load(model, 2)
    paths = list_images(images)[:40]  # any layout: class folders, a detection folder's images/
    calib = [preprocess(read_bgr(p), onnx_model.card.preprocessing) for p in paths]
    sample = calib[0]  # one frame: the converted model has a static batch of one
    reference = onnx_model.run(sample)
    out = out or model.with_suffix(".tflite")
    int8 = None if onnx_model.card.task == "detector" else out.with_suffix(".int8.tflite")
    log(f"converting {model.name} to TFLite (onnx2tf)")
    convert_tflite(model, onnx_model.card, calib, reference, sample, out, int8)
    return out
