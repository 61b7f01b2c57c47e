"""Where a result was measured: package versions and a readable device name."""

from __future__ import annotations

import contextlib
import platform
from typing import Any

import torch

__all__ = ["device_name", "versions"]


def versions() -> dict[str, str | None]:
    """Versions of qmetrics (the installed distribution; None when run from a bare checkout),
    torch, Python and, when installed, triton and transformers."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own: str | None = version("qmetrics")
    except PackageNotFoundError:
        own = None
    out: dict[str, str | None] = {
        "qmetrics": own,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in ("triton", "transformers"):  # read from the metadata: importing them is slow
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device) -> dict[str, Any]:
    """``{"type", "name", ...}`` of a device: for CUDA its name, total memory (GiB) and
    compute capability; for the CPU its model and the threads torch uses."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}",
        }
    return {"type": dev.type, "name": _cpu_model(), "threads": torch.get_num_threads()}
