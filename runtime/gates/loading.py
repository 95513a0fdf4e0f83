"""The one way to open a gate with its models: the bundle, the backbone (or the user's model) and, for a gate
around the user's model, Bouncer's backbone beside it. The device, the CLI, the station and the demo call this;
each passes where its default backbone comes from (a device only reads the cache; the CLI may build it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bouncer.runtime import backends, home
from bouncer.runtime.backends.base import Backend
from bouncer.runtime.backends.paired import PairedBackend
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.guard import Guard

DefaultModel = Callable[[str], Path]  # runtime ("onnxruntime" or "litert") -> the cached default backbone


def open_backend(
    model: Path | None,
    sidecar: Path | None = None,
    *,
    paired: bool | None,
    threads: int = 2,
    providers: list[str] | None = None,
    runtime: str = "onnxruntime",
    default: DefaultModel = home.cached_model,
) -> Backend:
    """`paired=None` pairs when the model is a user's (its card's task is not `features`), as a fit does; a gate
    says by its bundle whether it was fitted with a sidecar."""
    backend = backends.load(model or default(runtime), threads, providers)
    if paired is None:
        paired = backend.card.task != "features"
    if not paired:
        return backend
    return PairedBackend(backend, backends.load(sidecar or default(runtime), threads, providers))


def open_guard(
    bundle: GateBundle | Path,
    model: Path | None = None,
    sidecar: Path | None = None,
    *,
    threads: int = 2,
    providers: list[str] | None = None,
    runtime: str = "onnxruntime",
    default: DefaultModel = home.cached_model,
) -> Guard:
    """A bundle given as a path is loaded (and refused if broken) before any model is loaded or built."""
    if not isinstance(bundle, GateBundle):
        bundle = GateBundle.load(bundle)
    backend = open_backend(model, sidecar, paired=bundle.sidecar is not None, threads=threads, providers=providers,
                           runtime=runtime, default=default)  # fmt: skip
    return Guard(bundle, backend)
