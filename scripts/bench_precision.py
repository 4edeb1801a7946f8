"""Benchmark: training steps and DDIM sampling at each precision, layout and compile, against fp32.

    python scripts/bench_precision.py [--models tiny,cifar,afhq64] [--steps 2] [--repeats 3]
        [--configs fp32,fp32-cl,bf16,bf16-cl] [--losses plain,agc,taa] [--compile]

A config is ``<precision>[-cl][-compile]`` (``cl``: channels-last); ``fp16`` runs on CUDA only.
Training is timed through the app's own ``train_shard`` (what a node runs for a message) on
random images, with a fresh model and state per call, for one epoch of k and of 2k steps: the
step is (T(2k) - T(k)) / k and the call's setup (optimizer, layout, compiling) T(k) - k * step.
Losses: ``plain`` (DDPM), ``agc`` (AGC only), ``taa`` (AGC + TAA, the default). All (config,
loss) pairs are interleaved in a rotating order every repeat, so drift hits them alike; medians.
Sampling: DDIM images per second (10 steps, one batch) per config, interleaved the same way.
Peak memory (``--memory``): each pair once more in a fresh process (CPU, Linux: the rise of the
resident set's peak, VmHWM, over what the process held before the call; CUDA:
``torch.cuda.max_memory_allocated``). One JSON line per model, config and loss.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable

import torch

from clients.config import TrainConfig
from clients.trainer import ShardState, train_shard
from ddpm.device import resolve_device
from ddpm.precision import Precision
from ddpm.schedule import ddim_sample
from ddpm.unet import build_unet

SHAPES = {"tiny": (8, 1, 32), "cifar": (32, 3, 8), "afhq64": (64, 3, 4)}  # image size, channels, CPU batch
LOSSES = {"plain": dict(agc=False, taa=False), "agc": dict(agc=True, taa=False), "taa": dict(agc=True, taa=True)}


def parse_config(name: str) -> Precision:
    """'bf16-cl-compile' -> Precision('bf16', channels_last=True, compile=True)."""
    parts = name.split("-")
    if parts[0] not in ("fp32", "bf16", "fp16") or not set(parts[1:]) <= {"cl", "compile"}:
        raise SystemExit(f"--configs: {name!r} is not <fp32|bf16|fp16>[-cl][-compile]")
    return Precision(parts[0], "cl" in parts, "compile" in parts)


def _config(precision: Precision, loss: str, batch: int) -> TrainConfig:
    return TrainConfig(
        local_epochs=1,
        batch_size=batch,
        precision=precision.name,
        channels_last="true" if precision.channels_last else "false",
        compile=precision.compile,
        **LOSSES[loss],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prepared(model_name: str, precision: Precision, loss: str, steps: int, device: torch.device) -> Callable:
    """One ``train_shard`` call made ready: a fresh model, random images, a state whose memory
    bank holds realistic levels (so AGC skips and TAA augments as after some training)."""
    size, channels, batch = SHAPES[model_name]
    torch.manual_seed(0)
    model = build_unet(model_name, size, channels).to(device)
    images = torch.randint(0, 256, (batch * steps, channels, size, size), dtype=torch.uint8)
    config = _config(precision, loss, batch)

    def train() -> None:
        state = ShardState(bank=_BANKS[model_name].clone())
        train_shard(model, images, config, state, device=device, seed=1)

    return train


_BANKS: dict[str, torch.Tensor] = {}


def warm_bank(model_name: str, device: torch.device) -> None:
    """A memory bank from one plain round on the same images (losses per timestep at this model's level)."""
    size, channels, batch = SHAPES[model_name]
    torch.manual_seed(0)
    model = build_unet(model_name, size, channels).to(device)
    images = torch.randint(0, 256, (batch * 4, channels, size, size), dtype=torch.uint8)
    state = ShardState()
    train_shard(model, images, _config(Precision(), "plain", batch), state, device=device, seed=0)
    bank = state.bank
    filled = bank > 0
    bank[~filled] = bank[filled].mean() if filled.any() else 1.0  # timesteps not drawn: the mean level
    _BANKS[model_name] = bank


def _timed(fn: Callable, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _sampler(model_name: str, precision: Precision, device: torch.device, images: int) -> Callable:
    size, channels, _ = SHAPES[model_name]
    torch.manual_seed(0)
    model = build_unet(model_name, size, channels).to(device)
    return lambda: ddim_sample(model, images, steps=10, batch_size=images, device=device, precision=precision)


def _compiled_frames() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) / 1024


def _peak(args: tuple[str, str, str, int, str, int]) -> float:
    """MB one ``train_shard`` call adds at its peak, in this (fresh) process."""
    model_name, config, loss, steps, device_name, threads = args
    torch.set_num_threads(threads)  # the parent's count
    device = resolve_device(device_name)
    warm_bank(model_name, device)
    train = _prepared(model_name, parse_config(config), loss, steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        held = _status_mb("VmRSS")
    train()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    return _status_mb("VmHWM") - held


def bench(model_name: str, configs: list[str], losses: list[str], args: argparse.Namespace, device) -> list[dict]:
    steps, repeats = args.steps, args.repeats
    warm_bank(model_name, device)
    pairs = [(c, loss) for c in configs for loss in losses]
    first, frames = {}, {}
    for p in pairs:  # the first call of each pair: kernel selection, and compiling (its frames counted)
        before = _compiled_frames()
        first[p] = _timed(_prepared(model_name, parse_config(p[0]), p[1], 1, device), device)
        frames[p] = _compiled_frames() - before
    short: dict[tuple, list[float]] = {p: [] for p in pairs}
    long: dict[tuple, list[float]] = {p: [] for p in pairs}
    sample: dict[str, list[float]] = {c: [] for c in configs}
    n_sample = args.sample_images or SHAPES[model_name][2]
    first_sample = {c: _timed(_sampler(model_name, parse_config(c), device, n_sample), device) for c in configs}
    later_frames = dict.fromkeys(pairs, 0)  # recompiles after the first call (new batch sizes)
    for r in range(repeats):
        for c, loss in pairs[r % len(pairs) :] + pairs[: r % len(pairs)]:
            precision = parse_config(c)
            before = _compiled_frames()
            short[c, loss].append(_timed(_prepared(model_name, precision, loss, steps, device), device))
            long[c, loss].append(_timed(_prepared(model_name, precision, loss, 2 * steps, device), device))
            later_frames[c, loss] += _compiled_frames() - before
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
            sample[c].append(_timed(_sampler(model_name, parse_config(c), device, n_sample), device))
    peaks = {}
    if args.memory:
        context = multiprocessing.get_context("spawn")
        with context.Pool(1, maxtasksperchild=1) as pool:
            jobs = [(model_name, c, loss, steps, str(device), torch.get_num_threads()) for c, loss in pairs]
            peaks = dict(zip(pairs, pool.map(_peak, jobs, chunksize=1), strict=True))
    step = {p: (statistics.median(long[p]) - statistics.median(short[p])) / steps for p in pairs}
    per_s = {c: n_sample / statistics.median(v) for c, v in sample.items()}
    base = configs[0]
    rows = []
    for c, loss in pairs:
        rows.append(
            {
                "model": model_name,
                "config": c,
                "loss": loss,
                "step_s": round(step[c, loss], 4),
                f"step_vs_{base}": round(step[c, loss] / step[base, loss], 3),
                "setup_s": round(statistics.median(short[c, loss]) - steps * step[c, loss], 3),
                "first_call_s": round(first[c, loss], 2),
                "compiled_graphs": frames[c, loss],
                "recompiled_graphs": later_frames[c, loss],
                "peak_mb": round(peaks[c, loss], 1) if peaks else None,
                "ddim_img_per_s": round(per_s[c], 2),
                "first_sample_s": round(first_sample[c], 2),
                f"ddim_vs_{base}": round(per_s[c] / per_s[base], 3),
                "batch": SHAPES[model_name][2],
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
    ap.add_argument("--configs", default="fp32,fp32-cl,bf16,bf16-cl", help="the first is the baseline")
    ap.add_argument("--losses", default="plain,agc,taa")
    ap.add_argument("--steps", type=int, default=2, help="k: each pair trains k and 2k steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample-images", type=int, default=0, help="DDIM batch (default: the training batch)")
    ap.add_argument("--memory", action="store_true", help="peak memory per pair, each in a fresh process")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--batch", default="", help="override batches, name=size,...")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for item in filter(None, args.batch.split(",")):
        name, size = item.split("=")
        SHAPES[name] = (*SHAPES[name][:2], int(size))
    device = resolve_device(args.device)
    for name in args.models.split(","):
        for row in bench(name, args.configs.split(","), args.losses.split(","), args, device):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
