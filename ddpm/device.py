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
