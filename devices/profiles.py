"""Load device profiles shipped as TOML data; `detect()` picks one for the machine it runs on."""

from __future__ import annotations

import platform
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bouncer.runtime.errors import BouncerError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    runtime: str
    threads: int
    providers: tuple[str, ...]
    max_fps: float


def _parse(text: str, where: str) -> DeviceProfile:
    try:
        d = tomllib.loads(text)
        return DeviceProfile(
            name=str(d["name"]),
            runtime=str(d["runtime"]),
            threads=int(d["threads"]),
            providers=tuple(d.get("providers", ())),
            max_fps=float(d["max_fps"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise BouncerError(f"{where}: bad device profile ({exc})") from None


def available() -> dict[str, DeviceProfile]:
    folder = resources.files("bouncer.devices") / "data"
    out = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            p = _parse(entry.read_text(), entry.name)
            out[p.name] = p
    return out


def get(name: str) -> DeviceProfile:
    profiles = available()
    if name not in profiles:
        raise BouncerError(f"unknown device profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]


def detect() -> DeviceProfile:
    """Best guess from the device tree model string and the architecture."""
    model = ""
    for p in (Path("/proc/device-tree/model"), Path("/sys/firmware/devicetree/base/model")):
        if p.exists():
            model = p.read_bytes().decode(errors="ignore").lower()
            break
    if "raspberry pi 5" in model:
        return get("rpi5")
    if "raspberry pi 4" in model:
        return get("rpi4")
    if "orin" in model:
        return get("jetson-orin-nano")
    if platform.machine().lower() in ("x86_64", "amd64"):
        return get("x86-ipc")
    return get("generic")
