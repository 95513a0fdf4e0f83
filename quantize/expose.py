"""Expose an intermediate tensor of a user's ONNX graph as an output, so the guard's OOD heads can read the
model's own features without the plant re-exporting it (`bouncer models expose`).

A 4-D activation (N x C x H x W) is exposed pooled (GlobalAveragePool, then flattened to N x C), because the
heads read one vector per frame, or with `--map` as the map itself (listed under the card's `maps`); a 2-D one
(N x D) as it is. The weights are untouched: the new file computes
the same outputs as before plus one, and the card beside it names the new output as `features`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bouncer.runtime.errors import ModelError
from bouncer.runtime.modelcard import ModelCard, read_card_file, write_card_file


def _load(path: Path) -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelError("exposing a tensor needs the [build] extra (onnx): pip install 'bouncer[build]'") from None
    try:
        model = onnx.load(str(path))
        return onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError ...
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _dims(value_info: Any) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def tensor_shapes(model: Any) -> dict[str, list[int | str]]:
    """Every node output with a known rank, in graph order (what a user can choose from)."""
    known = {v.name: _dims(v) for v in [*model.graph.value_info, *model.graph.output]}
    return {o: known[o] for node in model.graph.node for o in node.output if o in known}


def candidates(path: Path, limit: int = 30) -> list[tuple[str, list[int | str]]]:
    """The last `limit` 2-D and 4-D activations: where a classifier's embedding usually sits."""
    shapes = tensor_shapes(_load(path))
    return [(name, dims) for name, dims in shapes.items() if len(dims) in (2, 4)][-limit:]


def expose(path: Path, tensor: str, out: Path, name: str = "features", as_map: bool = False) -> ModelCard:
    """Write `out` = the model at `path` with `tensor` as the extra output `name`, and its card beside it.
    `as_map`: a 4-D tensor stays a map (the card lists it under `maps`), for heads that score each cell
    (`patch:NAME`) or each channel's maximum (`knn:NAME@max`): a detector's neck, where a small object shows."""
    import onnx
    from onnx import helper

    card = read_card_file(path)
    if card is None:
        raise ModelError(f"{path}: no model card beside it ({path.name}.card.toml or .card.json); write one first "
                         "(docs/models.md), then expose a tensor")  # fmt: skip
    model = _load(path)
    outputs = [o.name for o in model.graph.output]
    if name in outputs or name in tensor_shapes(model):
        raise ModelError(f"{path}: the graph already has a tensor named {name!r}; choose another with --as")
    shapes = tensor_shapes(model)
    if tensor not in shapes:
        near = ", ".join(n for n, _ in candidates(path, 8))
        raise ModelError(f"{path}: no tensor {tensor!r} with a known shape in the graph (run `bouncer models "
                         f"expose {path} --list`; the last ones: {near})")  # fmt: skip
    dims = shapes[tensor]
    if as_map and len(dims) != 4:
        raise ModelError(f"{path}: tensor {tensor!r} has shape {dims}; --map exposes an N x C x H x W map")
    if as_map:
        model.graph.node.append(helper.make_node("Identity", [tensor], [name], name=f"{name}__identity"))
        out_dims: list[int | str] = dims
    elif len(dims) == 4:
        pooled = f"{name}__pooled"
        model.graph.node.extend([
            helper.make_node("GlobalAveragePool", [tensor], [pooled], name=f"{name}__pool"),
            helper.make_node("Flatten", [pooled], [name], name=f"{name}__flatten", axis=1),
        ])  # fmt: skip
        out_dims = [dims[0], dims[1]]
    elif len(dims) == 2:
        model.graph.node.append(helper.make_node("Identity", [tensor], [name], name=f"{name}__identity"))
        out_dims = dims
    else:
        raise ModelError(f"{path}: tensor {tensor!r} has shape {dims}; the heads read an N x D vector or an "
                         "N x C x H x W map (pooled)")  # fmt: skip
    elem = next(v for v in [*model.graph.value_info, *model.graph.output] if v.name == tensor)
    shape = [d if d != "?" else None for d in out_dims]
    model.graph.output.append(helper.make_tensor_value_info(name, elem.type.tensor_type.elem_type, shape))
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    # the new file is another model: its card binds to its own bytes, the user's declared hash no longer holds
    tensors = {k: v for k, v in card.tensors.items() if k != name}
    new_card = (
        replace(card, maps=(*card.maps, name), model_hash="", tensors=tensors)
        if as_map
        else replace(card, features=name, model_hash="", tensors=tensors)
    )
    write_card_file(out, new_card)
    return new_card
