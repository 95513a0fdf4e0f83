"""Inference backends behind one interface: `load(path, threads)` and `Backend.run(batch)`."""

from bouncer.runtime.backends.base import Backend, load

__all__ = ["Backend", "load"]
