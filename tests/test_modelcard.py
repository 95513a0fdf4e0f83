"""Any ONNX classifier is usable through a card beside it; models without what Bouncer needs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_classifier

from bouncer.runtime import backends
from bouncer.runtime.errors import ModelError
from bouncer.runtime.modelcard import ModelCard, read_card_file, write_card_file
from bouncer.runtime.preprocess import Preprocessing


def test_user_onnx_model_with_toml_card(tmp_path):
    model = tiny_classifier(tmp_path / "user.onnx")
    (tmp_path / "user.onnx.card.toml").write_text(
        'name = "user"\nfeatures = "feat"\nlogits = "scores"\n[preprocessing]\nheight = 32\nwidth = 32\ncolor = "bgr"\n'
    )
    b = backends.load(model)
    assert b.card.preprocessing.color == "bgr" and len(b.card.model_hash) == 64
    out = b.run(np.zeros((1, 3, 32, 32), np.float32))
    assert out["feat"].shape == (1, 4) and out["scores"].shape == (1, 2)
    batch = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    out3 = b.run(batch)  # the model has a static batch of one: the backend runs frame by frame
    assert out3["feat"].shape == (3, 4)
    np.testing.assert_allclose(out3["feat"][2:], b.run(batch[2:])["feat"], rtol=1e-5)


def test_model_without_card_is_refused(tmp_path):
    model = tiny_classifier(tmp_path / "nocard.onnx")
    with pytest.raises(ModelError, match="no model card"):
        backends.load(model)


def test_model_lacking_a_required_output(tmp_path):
    model = tiny_classifier(tmp_path / "short.onnx", outputs=("scores",))
    write_card_file(
        model, ModelCard(name="short", features="feat", logits="scores", preprocessing=Preprocessing(32, 32))
    )
    with pytest.raises(ModelError, match="lacks required output"):
        backends.load(model)


def test_wrong_batch_shape_is_a_value_error(tmp_path):
    model = tiny_classifier(tmp_path / "m.onnx")
    write_card_file(model, ModelCard(name="m", features="feat", logits="scores", preprocessing=Preprocessing(32, 32)))
    with pytest.raises(ValueError, match="expected a float32 batch"):
        backends.load(model).run(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize(
    "content,msg",
    [(b"", "empty model file"), (b"not a model at all", "not a loadable ONNX model")],
)
def test_broken_model_files(tmp_path, content, msg):
    p = tmp_path / "broken.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelError, match=msg):
        backends.load(p)


def test_truncated_model(tmp_path):
    good = tiny_classifier(tmp_path / "good.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"cut\.onnx"):
        backends.load(cut)


def test_unknown_suffix_and_missing(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown model type"):
        backends.load(p)
    with pytest.raises(ModelError, match="not found"):
        backends.load(tmp_path / "absent.onnx")


def test_card_errors_and_round_trip(tmp_path):
    card = ModelCard(name="x", taps=("a", "b"), maps=("m",), tensors={"features": "out_1"})
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict())), "t") == card
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    (tmp_path / "m.onnx.card.json").write_text('{"name": "x"}')
    with pytest.raises(ModelError, match="needs `features`"):
        read_card_file(model)
    (tmp_path / "m.onnx.card.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable model card"):
        read_card_file(model)
