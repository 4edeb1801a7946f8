"""Benchmark: what each Table I mode costs per training step, and its peak memory, against a plain step.

    python scripts/bench_baselines.py [--models tiny,cifar] [--steps 4] [--repeats 3] [--threads 2]

Modes, each the run-config a user sets (over the default preset): ``plain`` (DDPM: agc, taa off,
msr none), ``iet-agc+`` (AGC + TAA, the default), ``adding-noise`` (input-noise-variance 0.1),
``ambient`` (p 0.4, delta 0.1: the 2C network, masks, x0 loss), ``dp-sgd`` (Opacus, noise
multiplier 1, C 1, functorch per-sample gradients, Poisson batches). Each is timed through the
app's own ``train_shard`` (what a node runs for a message) on random images, one epoch of k and
of 2k steps: the step is (T(2k) - T(k)) / k, so the per-message setup (optimizer, Opacus'
``make_private``, masks) is reported apart as T(k) - k * step. Modes are interleaved in a rotating
order every repeat so machine drift hits them alike; medians over repeats. Peak memory: each mode
once more in a fresh process (CPU, Linux: the rise of its peak resident set, VmHWM reset after
building the model, over what it then held; CUDA: ``torch.cuda.max_memory_allocated``). One JSON
line per model and mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from clients.trainer import ShardState, train_shard
from ddpm.ambient import ambient_masks
from ddpm.device import resolve_device
from fl_app.config import settings_from_run_config, train_config
from fl_app.model import initial_model, model_family
from fl_app.settings import Settings

SHAPES = {"tiny": (8, 1), "cifar": (32, 3), "afhq64": (64, 3)}  # image size, channels
PLAIN = {"agc": False, "taa": False, "msr": "none"}
MODES: dict[str, dict[str, Any]] = {
    "plain": PLAIN,
    "iet-agc+": {},
    "adding-noise": {**PLAIN, "input-noise-variance": 0.1},
    "ambient": {**PLAIN, "ambient": True, "ambient-p": 0.4, "ambient-delta": 0.1},
    "dp-sgd": {**PLAIN, "dp-sgd": True, "dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0},
}


def _settings(mode: str) -> Settings:
    return settings_from_run_config(Settings().to_run_config(), MODES[mode])


def _prepared(model_name: str, mode: str, batch: int, steps: int, device: torch.device) -> Callable[[], None]:
    """One ``train_shard`` call of ``mode`` made ready: a fresh model as the app builds it
    (``initial_model``: Ambient's 2C inputs too), random images, their masks, a fresh state; one
    epoch of ``steps`` batches. Returns the call."""
    settings = _settings(mode)
    size, channels = SHAPES[model_name]
    torch.manual_seed(0)
    shaped = dataclasses.replace(settings, model=model_name, image_size=size)  # the shape, past the digits' checks
    model = initial_model(shaped, channels).to(device)
    n = batch * steps
    images = torch.rand(n, channels, size, size) * 2 - 1
    masks = None
    if settings.ambient:
        masks = ambient_masks(range(n), (size, size), settings.ambient_p, settings.ambient_delta, 0)
    config = dataclasses.replace(train_config(settings), local_epochs=1, batch_size=batch)
    family = model_family(settings)

    def train() -> None:
        train_shard(model, images, config, ShardState(), device=device, seed=1, labels=masks, family=family)

    return train


def _train(model_name: str, mode: str, batch: int, steps: int, device: torch.device) -> float:
    """Seconds for one ``train_shard`` call of one epoch of ``steps`` batches (a fresh model and state)."""
    train = _prepared(model_name, mode, batch, steps, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) / 1024


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak(args: tuple[str, str, int, int, str]) -> float:
    """MB the mode's training adds at its peak, measured in this (fresh) process."""
    import opacus  # noqa: F401  (every mode's process holds Opacus: its import is not the DP mode's memory)

    model_name, mode, batch, steps, device_name = args
    torch.set_num_threads(1)
    device = resolve_device(device_name)
    train = _prepared(model_name, mode, batch, steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        _reset_peak()
        held = _status_mb("VmRSS")
    train()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    return _status_mb("VmHWM") - held


def bench(model_name: str, batch: int, steps: int, repeats: int, device: torch.device) -> list[dict]:
    modes = list(MODES)
    for mode in modes:  # warm-up: first calls pay for lazy imports and kernel selection
        _train(model_name, mode, batch, 1, device)
    short: dict[str, list[float]] = {m: [] for m in modes}
    long: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            short[mode].append(_train(model_name, mode, batch, steps, device))
            long[mode].append(_train(model_name, mode, batch, 2 * steps, device))
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        peaks = pool.map(_peak, [(model_name, m, batch, steps, str(device)) for m in modes], chunksize=1)
    step = {m: (statistics.median(long[m]) - statistics.median(short[m])) / steps for m in modes}
    rows = []
    for mode, peak in zip(modes, peaks, strict=True):
        rows.append(
            {
                "model": model_name,
                "mode": mode,
                "step_s": round(step[mode], 4),
                "step_vs_plain": round(step[mode] / step["plain"], 2),
                "setup_s": round(statistics.median(short[mode]) - steps * step[mode], 3),
                "peak_mb": round(peak, 1),
                "peak_vs_plain": round(peak / peaks[0], 2) if peaks[0] > 0 else None,
                "batch": batch,
                "steps": f"{steps} and {2 * steps}",
                "repeats": repeats,
                "device": str(device),
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,cifar")
    ap.add_argument("--batch", default="tiny=32,cifar=8,afhq64=4", help="batch per model, name=size,...")
    ap.add_argument("--steps", type=int, default=4, help="k: each mode trains k and 2k steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the timed runs")
    args = ap.parse_args()
    batches = {k: int(v) for k, v in (item.split("=") for item in args.batch.split(","))}
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for name in args.models.split(","):
        for row in bench(name, batches[name], args.steps, args.repeats, device):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
