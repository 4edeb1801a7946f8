"""Benchmark: bytes per reply and per round, and seconds per training step, for each adapter mode.

    python scripts/bench_adapters.py [--models tiny,cifar] [--steps 3] [--batch 8] [--shards 10] [--threads 1]

Modes: ``none`` (full fine-tuning), ``lora`` at ranks 4, 8, 16 (attention projections, A and B
travel), ``lora`` rank 8 with ``lora-freeze-a`` (only B travels), ``difffit``. A reply's bytes
are those of the weights ArrayRecord a node sends back (Flower's serialised Arrays: what the
SuperLink carries; the skip counts and metrics add a few KB); a round moves one such record to
each of K shards and one back from each. The step is the app's training step (AGC loss,
backward, gradient clip over the trainable tensors, Adam), modes interleaved step by step in a
rotating order so machine drift hits them alike; the median is reported. The base weights are a
seeded random UNet: neither bytes nor step time depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from clients.agc import RatioSkip
from clients.trainer import agc_taa_loss
from ddpm.adapters import AdapterSpec, attach_adapter, trainable_state
from ddpm.device import resolve_device
from ddpm.schedule import NUM_TRAIN_TIMESTEPS, train_scheduler
from ddpm.unet import build_unet
from fl_app.settings import Settings
from strategies.replies import record_bytes

SHAPES = {"tiny": (8, 1), "cifar": (32, 3), "afhq64": (64, 3)}  # image size, channels
MODES = {
    "none": AdapterSpec("none"),
    "lora-4": AdapterSpec("lora", rank=4, alpha=4.0),
    "lora-8": AdapterSpec("lora", rank=8, alpha=8.0),
    "lora-16": AdapterSpec("lora", rank=16, alpha=16.0),
    "lora-8-freeze-a": AdapterSpec("lora", rank=8, alpha=8.0, freeze_a=True),
    "difffit": AdapterSpec("difffit"),
}


def reply_bytes(model: torch.nn.Module) -> int:
    """Serialised bytes of the weights record a node sends back (and the server sends out)."""
    return record_bytes(trainable_state(model))


def bench(name: str, steps: int, batch: int, shards: int, device: torch.device, warmup: int = 1) -> list[dict]:
    size, channels = SHAPES[name]
    torch.manual_seed(0)
    base = build_unet(name, size, channels)
    models = {mode: attach_adapter(copy.deepcopy(base), spec).to(device).train() for mode, spec in MODES.items()}
    params = {m: [p for p in model.parameters() if p.requires_grad] for m, model in models.items()}
    optimizers = {m: torch.optim.Adam(params[m], lr=2e-4) for m in models}
    sched = train_scheduler()
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    settings = Settings()
    rule = RatioSkip(settings.skip_threshold)
    bank = torch.full((NUM_TRAIN_TIMESTEPS,), 0.1, device=device)
    order = list(models)
    times: dict[str, list[float]] = {m: [] for m in models}
    for i in range(warmup + steps):
        x0 = torch.rand(batch, channels, size, size, device=device) * 2 - 1
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), device=device)
        noise = torch.randn_like(x0)
        for mode in order[i % len(order) :] + order[: i % len(order)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = agc_taa_loss(models[mode], sched, x0, t, noise, bank, rule, None, settings)
            optimizers[mode].zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params[mode], settings.grad_clip)
            optimizers[mode].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    full = reply_bytes(models["none"])
    full_step = statistics.median(times["none"])
    rows = []
    for mode, model in models.items():
        nbytes = reply_bytes(model)
        step = statistics.median(times[mode])
        rows.append(
            {
                "model": name,
                "mode": mode,
                "trainable": sum(p.numel() for p in params[mode]),
                "reply_bytes": nbytes,
                "reply_vs_full": round(nbytes / full, 5),
                "round_bytes": 2 * shards * nbytes,
                "step_s": round(step, 4),
                "step_vs_full": round(step / full_step, 3),
                "batch": batch,
                "steps": steps,
                "device": str(device),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,cifar")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shards", type=int, default=10, help="K: a round sends K records out and gets K back")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (one: steady timings on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for name in args.models.split(","):
        for row in bench(name, args.steps, args.batch, args.shards, device, args.warmup):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
