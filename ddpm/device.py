"""Pick the torch device from the ``device`` setting; nothing else in the code names a device."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"auto|cpu|mps|(cuda|xpu)(:(0|[1-9][0-9]{0,2}))?"  # what the device settings accept
DEVICES = "auto, cpu, cuda, cuda:N, mps, xpu, xpu:N"  # the same, in words (N in 0..999)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA if present, else Apple MPS, else CPU; anything else is taken as given."""
    import torch  # here, so that the CLIs' option checks need not import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def usable_device(name: str, key: str = "device") -> torch.device:
    """The torch device for ``name`` if this machine has it, else a ValueError naming ``key``: a
    device that does not exist stops the run (or the node's message) before training, not in it."""
    import re

    import torch

    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"{key}: must be one of {DEVICES} (N in 0..999), got {name!r}")
    device = resolve_device(name)
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    if device.type in backend:
        module = backend[device.type]
        if module is None or not module.is_available():
            raise ValueError(f"{key}: {name}: no {device.type} device on this machine; use cpu or auto")
        count = module.device_count() if device.type != "mps" else 1
        if (device.index or 0) >= count:
            raise ValueError(f"{key}: {name}: this machine has {count} {device.type} device(s), numbered from 0")
    return device
