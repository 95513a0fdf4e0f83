"""Head specs and input keys: the one parse of `kind:SOURCE[@reduce]` and `SOURCE[+SOURCE][@reduce]`.

A head spec names a head (`maha:pool_s32b`, `knn:map_s16@max`, `knn:pool_s32@tiles`, `patchknn:map_s8+map_s16`,
`orphan:detections`); its input key names the per-frame vector it reads (`pool_s32b`, `map_s16@max`,
`pool_s32@tiles`, `map_s8+map_s16@patch`). Heads of different kinds on one input share it (feature sets, the
wire). Strings travel in bundles, on the wire and on the command line; code holds these types.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from bouncer.runtime.errors import BouncerError

KINDS = ("maha", "patch", "knn", "patchknn", "orphan")
REDUCES = ("max", "tiles", "patch")


@dataclass(frozen=True)
class InputKey:
    sources: tuple[str, ...]  # the model outputs it is made from (a patch grid may join several maps)
    reduce: str | None = None  # None: the output as it is; max: a map's channel maxima; tiles; patch

    @staticmethod
    def parse(key: str) -> InputKey:
        return _parse_key(key)

    @property
    def source(self) -> str:
        return "+".join(self.sources)

    def __str__(self) -> str:
        return f"{self.source}@{self.reduce}" if self.reduce else self.source


@dataclass(frozen=True)
class HeadSpec:
    kind: str
    input: InputKey

    @staticmethod
    def parse(spec: str) -> HeadSpec:
        return _parse_spec(spec)

    @property
    def source(self) -> str:
        return self.input.source

    @property
    def reduce(self) -> str | None:
        return self.input.reduce

    def __str__(self) -> str:
        reduce = self.reduce if self.reduce and self.kind != "patchknn" else None
        return f"{self.kind}:{self.source}" + (f"@{reduce}" if reduce else "")


@lru_cache(maxsize=1024)
def _parse_key(key: str) -> InputKey:
    source, _, reduce = key.partition("@")
    if not source or (reduce and reduce not in REDUCES) or not all(source.split("+")):
        raise BouncerError(f"OOD input {key!r}: expected OUTPUT, MAP@max, OUTPUT@tiles or MAP[+MAP]@patch")
    return InputKey(tuple(source.split("+")), reduce or None)


@lru_cache(maxsize=1024)
def _parse_spec(spec: str) -> HeadSpec:
    kind, _, rest = spec.partition(":")
    source, _, reduce = rest.partition("@")
    joined = "+" in source and (kind != "patchknn" or not all(source.split("+")))
    if kind not in KINDS or not source or reduce not in ("", "max", "tiles") or (reduce and kind != "knn") or joined:
        raise BouncerError(f"OOD head {spec!r}: expected maha:OUTPUT, patch:MAP, knn:OUTPUT, knn:MAP@max, "
                           "knn:OUTPUT@tiles, patchknn:MAP[+MAP] or orphan:DETECTIONS (a detector gate's raw "
                           "output)")  # fmt: skip
    return HeadSpec(kind, InputKey(tuple(source.split("+")), "patch" if kind == "patchknn" else reduce or None))
