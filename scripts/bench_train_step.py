"""Benchmark: one AGC step and one AGC+TAA step against a plain DDPM step, in the same run.

    python scripts/bench_train_step.py [--device cpu|cuda] [--steps 20] [--models tiny,cifar]

Each mode runs the same model, batch, optimizer (Adam), gradient clipping and data; modes are
interleaved step by step, in a rotating order, so machine drift hits them alike; the median step
time is reported.
The memory bank is first warmed with real losses so skip and augmentation fractions are
realistic; targets (issue 3): AGC <= 1.05x plain, TAA <= (1 + augmented fraction) x plain + 5%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clients.agc import RatioSkip, update_memory_bank
from clients.taa import RandAugmentPolicy
from clients.trainer import agc_taa_loss, plain_loss
from ddpm.device import resolve_device
from ddpm.schedule import NUM_TRAIN_TIMESTEPS, train_scheduler
from ddpm.unet import build_unet
from fl_app.settings import Settings

MODES = ("plain", "agc", "taa")
SHAPES = {"tiny": (8, 1, 64), "cifar": (32, 3, 32)}  # image size, channels, batch (CPU-sized for cifar)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, steps: int, device: torch.device, batch: int | None, warmup: int = 5) -> dict:
    size, channels, default_batch = SHAPES[name]
    batch = batch or default_batch
    torch.manual_seed(0)
    model = build_unet(name, size, channels).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    sched = train_scheduler()
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    settings = Settings(skip_threshold=0.5, aug_range=1.7, randaugment_magnitude=3)
    rule, policy = RatioSkip(settings.skip_threshold), RandAugmentPolicy(settings.randaugment_magnitude)
    data = torch.rand(batch * 8, channels, size, size, device=device) * 2 - 1
    bank = torch.zeros(NUM_TRAIN_TIMESTEPS, device=device)
    counts = torch.zeros(data.shape[0], dtype=torch.long, device=device)

    def batch_draw(i):
        pos = torch.arange(i % 8 * batch, (i % 8 + 1) * batch, device=device)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), device=device)
        return pos, data[pos], t, torch.randn_like(data[pos])

    def finish(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    # warm the bank: every timestep gets an estimate of its loss level (as after some training)
    with torch.no_grad():
        for t0 in range(0, NUM_TRAIN_TIMESTEPS, batch):
            t = torch.arange(t0, min(t0 + batch, NUM_TRAIN_TIMESTEPS), device=device)
            x = data[: t.numel()]
            noise = torch.randn_like(x)
            losses = (model(sched.add_noise(x, noise, t), t).sample - noise).pow(2).flatten(1).mean(1)
            bank = update_memory_bank(bank, t, losses, 0.8)

    times = {"plain": [], "agc": [], "taa": []}
    aug_frac, skip_frac = [], []
    for i in range(steps + warmup):  # warm-up iterations (kernel set-up per batch shape) are dropped
        pos, x0, t, noise = batch_draw(i)
        for mode in MODES[i % 3 :] + MODES[: i % 3]:  # rotate the order: no mode always runs first
            _sync(device)
            start = time.perf_counter()
            if mode == "plain":
                finish(plain_loss(model, sched, x0, t, noise))
            else:
                out = agc_taa_loss(model, sched, x0, t, noise, bank, rule, policy if mode == "taa" else None, settings)
                finish(out.loss)
                bank = update_memory_bank(bank, t, out.losses, 0.8)
                counts.index_add_(0, pos, out.skip.long())
                if mode == "taa":
                    aug_frac.append(out.aug.float().mean())
                    skip_frac.append(out.skip.float().mean())
            _sync(device)
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    med = {m: statistics.median(v) for m, v in times.items()}
    f = float(torch.stack(aug_frac).mean())
    return {
        "model": name,
        "device": str(device),
        "batch": batch,
        "image": f"{channels}x{size}x{size}",
        "steps": steps,
        "plain_s": round(med["plain"], 4),
        "agc_s": round(med["agc"], 4),
        "taa_s": round(med["taa"], 4),
        "agc_ratio": round(med["agc"] / med["plain"], 3),
        "taa_ratio": round(med["taa"] / med["plain"], 3),
        "aug_fraction": round(f, 3),
        "skip_fraction": round(float(torch.stack(skip_frac).mean()), 3),
        "taa_target": round(1 + f + 0.05, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default="tiny,cifar")
    ap.add_argument("--batch", type=int, default=None, help="override the per-model batch size")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    for name in args.models.split(","):
        row = bench(name, args.steps, device, args.batch, args.warmup)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
