"""How a network computes: mixed precision (autocast), channels-last memory, a compiled forward.

Only the network's forward runs in the lower precision: weights, optimizer moments, AGC's memory
bank, per-sample losses (computed from the prediction cast to fp32) and everything that travels
stay fp32, so the skip rule reads fp32 ratios and replies keep their dtype. ``auto`` picks what
measured fastest here (``scripts/bench_precision.py``, docs/results.md "Precision"): bf16 where
the device has native bf16 units and the network is large enough for the casts to pay, else fp32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LAYOUTS = ("auto", "true", "false")  # channels-last: auto, on, off
# auto's bf16 line: the parameter count above which bf16 autocast measured faster than fp32 on a
# CPU with native bf16 units (tiny, 0.65M: 1.19x slower; cifar, 35.7M: 0.57x; docs/results.md)
BF16_MIN_PARAMETERS = 4_000_000
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA compute capability 8+, a CPU with AMX or
    AVX512-BF16), i.e. where bf16 can be faster than fp32 rather than emulated."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())  # noqa: SLF001
    return False


def check_precision(precision: str, device: torch.device, key: str = "precision") -> None:
    """Refuse a precision the device cannot compute (a ValueError naming ``key``): fp16 needs a CUDA
    GPU (its gradient scaler is CUDA's), bf16 on CUDA needs a GPU with bf16 (Ampere or newer)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"{key}: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"{key}: fp16 needs a CUDA GPU (its gradient scaler and fast kernels are CUDA's), but the device is "
            f"{device}; use bf16 or fp32 (or auto)"
        )
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(False)
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(
            f"{key}: bf16 needs a GPU with bf16 units (compute capability 8.0 or newer), {device} has none; "
            "use fp16 or fp32 (or auto)"
        )


def resolve_precision(precision: str, device: torch.device, num_parameters: int, *, private: bool = False) -> str:
    """``auto`` -> ``bf16`` on a device with native bf16 for a network of at least
    ``BF16_MIN_PARAMETERS`` (and never under DP-SGD: Opacus' per-sample hooks are kept fp32),
    else ``fp32``; any other name is checked (``check_precision``) and returned."""
    check_precision(precision, device)
    if precision != "auto":
        return precision
    if private or num_parameters < BF16_MIN_PARAMETERS or not native_bf16(device):
        return "fp32"
    return "bf16"


def resolve_channels_last(layout: str, device: torch.device, precision: str) -> bool:
    """``auto`` -> channels-last under bf16/fp16 on CUDA (cuDNN's tensor-core convolutions are
    NHWC), never on a CPU (measured there: no gain for the plain step, 0.75x against 0.66x of fp32
    for the AGC + TAA step of the cifar UNet under bf16; docs/results.md)."""
    if layout not in LAYOUTS:
        raise ValueError(f"channels-last: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout == "true"
    return precision != "fp32" and device.type == "cuda"


@dataclass(frozen=True)
class Precision:
    """How a network computes on one device: ``name`` (fp32, bf16, fp16), channels-last, compiled.

    Parameters
    ----------
    name : str (default: "fp32")
        The autocast dtype of the forward; fp32: no autocast.
    channels_last : bool (default: False)
        The network's weights and inputs in NHWC memory order.
    compile : bool (default: False)
        ``torch.compile`` the network's forward (in place: its state dict keeps its keys).
    """

    name: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        import torch

        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward's context: autocast to ``dtype``, or nothing for fp32."""
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device):
        """fp16's gradient scaler (disabled, a pass-through, for every other precision)."""
        import torch

        return torch.amp.GradScaler(device.type, enabled=self.name == "fp16")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network made ready in place: NHWC weights when channels-last, its forward compiled."""
        import torch

        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            compile_cache()
            model.compile()
        return model

    def release(self, model: torch.nn.Module) -> torch.nn.Module:
        """Undo ``prepare`` (contiguous weights, the eager forward): what is saved and sent."""
        import torch

        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)
        if self.compile:
            model._compiled_call_impl = None  # noqa: SLF001 - nn.Module.compile's own switch
        return model

    def features(self, net: Callable, device: torch.device | str) -> Callable:
        """``net`` as a feature extractor in this precision: its forward under autocast, its output
        (a tensor, or a list or tuple of them) back in fp32, for statistics computed in fp32/fp64."""
        if self.dtype is None:
            return net

        def run(x):
            with self.autocast(torch_device(device)):
                out = net(x)
            return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()

        return run

    def adam_options(self, device: torch.device) -> dict:
        """torch's fused Adam where it pays and changes nothing published: on CUDA, and on a CPU
        under bf16/fp16 (measured 0.019 s against 0.055 s a step for the cifar UNet's 35.7M
        parameters); CPU fp32 keeps the default kernel, so earlier CPU runs repeat exactly."""
        fused = device.type == "cuda" or (device.type == "cpu" and self.name != "fp32")
        return {"fused": True} if fused else {}

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the network's memory order."""
        import torch

        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


FP32 = Precision()


def torch_device(device: torch.device | str) -> torch.device:
    import torch

    return torch.device(device)


def choose(
    precision: str, layout: str, compiled: bool, device: torch.device, model: torch.nn.Module, *, private: bool = False
) -> Precision:
    """The ``Precision`` that the settings ``precision``, ``channels-last`` and ``compile`` give
    ``model`` on ``device`` (``auto`` resolved by ``resolve_precision``/``resolve_channels_last``)."""
    params = sum(p.numel() for p in model.parameters())
    name = resolve_precision(precision, device, params, private=private)
    return Precision(name, resolve_channels_last(layout, device, name), compiled)


def compile_cache() -> Path:
    """The inductor cache in a node-local folder (``TORCHINDUCTOR_CACHE_DIR``, default
    ``~/.cache/iet-agc/inductor``) so that a deployment's fresh process per message reuses what
    an earlier message compiled."""
    path = Path(os.environ.setdefault(COMPILE_CACHE_ENV, str(Path("~/.cache/iet-agc/inductor").expanduser())))
    path.mkdir(parents=True, exist_ok=True)
    return path


CPU_EVAL_BATCH = 256  # eval-batch-size auto off CUDA: the former default (the same images as before)
MAX_AUTO_BATCH = 4096


def fill_batch_size(probe: Callable[[int], object], device: torch.device, *, share: float = 0.5) -> int:
    """``eval-batch-size = auto``: on CUDA the largest power of two whose forward (``probe(b)``
    runs one at batch b) fits in ``share`` of the free memory, measured from a batch of 8, in
    [8, MAX_AUTO_BATCH]; elsewhere ``CPU_EVAL_BATCH``."""
    import torch

    if device.type != "cuda":
        return CPU_EVAL_BATCH
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device)
    probe(8)
    torch.cuda.synchronize(device)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - held) // 8)
    free, _ = torch.cuda.mem_get_info(device)
    return fitting_batch(free, per_image, share)


def fitting_batch(free: int, per_image: int, share: float = 0.5) -> int:
    """The largest power of two of images of ``per_image`` bytes in ``share`` of ``free`` bytes,
    in [8, MAX_AUTO_BATCH]."""
    fits = int(share * free // max(1, per_image))
    return max(8, min(MAX_AUTO_BATCH, 1 << max(0, fits.bit_length() - 1)))
