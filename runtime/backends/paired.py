"""A user's model with Bouncer's backbone beside it (the sidecar), run on the same frame as one backend.

A fine-tuned classifier's embedding separates the classes it knows and loses what tells the unfamiliar apart;
the generic mid-level taps of a pretrained backbone keep it (docs/models.md, "Guarding your own model"). The
pair's outputs are the model's, plus the sidecar's with the prefix `sidecar.`, so OOD heads may read either.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bouncer.runtime.backends.base import Backend
from bouncer.runtime.preprocess import Preprocessing, preprocess

PREFIX = "sidecar."


def _image(x: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """A model input back to a BGR uint8 image (the sidecar's input is made from it when the two models
    preprocess differently; fitting and running both go this way, so the sidecar sees the same pixels)."""
    img = x.transpose(1, 2, 0) * np.asarray(pp.std, np.float32) + np.asarray(pp.mean, np.float32)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[..., ::-1] if pp.color == "rgb" else img)


class PairedBackend(Backend):
    def __init__(self, model: Backend, sidecar: Backend) -> None:
        self.model, self.sidecar = model, sidecar
        self.runtime, self.path = model.runtime, model.path
        sc = sidecar.card
        side_taps = [t for t in (sc.features, *sc.taps) if t]
        self.card = replace(
            model.card,
            taps=(*model.card.taps, *(PREFIX + t for t in side_taps)),
            maps=(*model.card.maps, *(PREFIX + m for m in sc.maps)),
        )
        self._names = [*side_taps, *sc.maps]
        self._same_input = model.card.preprocessing == sc.preprocessing

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self.model.run(batch)
        if self._same_input:
            x = batch
        else:
            pp = self.model.card.preprocessing
            x = np.concatenate([preprocess(_image(b, pp), self.sidecar.card.preprocessing) for b in batch])
        side = self.sidecar.run(x)
        out.update({PREFIX + k: side[k] for k in self._names})
        return out
