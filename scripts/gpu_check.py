"""The GPU check: what the paper's CIFAR-10 setting costs on this machine's accelerator, as one JSON.

    bash scripts/gpu_check.sh [--smoke] [--out FILE]      (at most 8 minutes on one GPU)

Sections: ``environment`` (torch, device, bf16 support, memory); ``preset_round`` (one round of
``configs/cifar10.toml`` on a 5,000-image subset, every shard's ``train_shard`` in turn at
``precision = auto``: CIFAR-10 when torchvision finds it under ``--data-root``, else random
images of its shape, said in ``data``); ``steps`` (``scripts/bench_precision.py``'s rows: train
step and DDIM images/s per precision, with and without compile, against fp32); ``mq_knn`` (the
exact kNN at 65,536 generated x 50,000 training x 3,072 values); ``fid_features`` (pytorch-fid's
Inception, random weights: throughput only, per precision); peak memory per section on CUDA.
``--smoke`` runs the same code at tiny sizes on any device (CI runs it on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import tomllib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_precision beside this file

import bench_precision  # noqa: E402

from clients.trainer import ShardState, shard_seed, train_shard  # noqa: E402
from ddpm.device import resolve_device  # noqa: E402
from ddpm.precision import Precision, choose, native_bf16  # noqa: E402
from ddpm.unet import build_unet  # noqa: E402
from evaluation.fid import random_inception  # noqa: E402
from evaluation.frechet import model_features, rgb01  # noqa: E402
from evaluation.mq import nearest_neighbours  # noqa: E402
from fl_app.config import train_config  # noqa: E402
from fl_app.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(subset=5000, knn=(65_536, 50_000), fid_images=2048, model="cifar", size=32, batch=128, steps=5)
SMOKE = dict(subset=64, knn=(256, 200), fid_images=8, model="tiny", size=8, batch=16, steps=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    info["native_bf16"] = native_bf16(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": props.total_memory / 1e9,
        }
    else:
        info |= {"name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return info


def _preset_images(settings: Settings, n: int, data_root: str) -> tuple[torch.Tensor, str]:
    try:
        from ddpm.data import load_dataset

        data = load_dataset(**{**settings.dataset_kwargs(), "root": data_root, "download": False, "train_size": n})
        return data.images[:n], f"cifar10 ({data_root})"
    except Exception as err:  # noqa: BLE001 - offline machines: say why and use random images of the shape
        images = torch.randint(0, 256, (n, 3, settings.image_size, settings.image_size), dtype=torch.uint8)
        return images, f"random images of CIFAR-10's shape (CIFAR-10 unavailable: {str(err)[:160]})"


def preset_round(device: torch.device, cfg: dict, args: argparse.Namespace) -> dict:
    """One round of the cifar10 preset on ``cfg['subset']`` images: each shard's local epochs in turn."""
    with open(ROOT / "configs" / "cifar10.toml", "rb") as f:
        preset = tomllib.load(f)
    settings = Settings.from_run_config({**preset, "device": str(device)})
    if args.smoke:
        settings = dataclasses.replace(settings, model=cfg["model"], image_size=cfg["size"], batch_size=cfg["batch"])
    config = train_config(settings)
    if args.round_epochs:
        config = dataclasses.replace(config, local_epochs=args.round_epochs)
    images, source = _preset_images(settings, cfg["subset"], args.data_root)
    shards = torch.arange(images.shape[0]).chunk(settings.num_shards)
    model = build_unet(settings.model, settings.image_size, 3, init=settings.model_init).to(device)
    chosen = choose(config.precision, config.channels_last, config.compile, device, model)
    _peak_start(device)
    _sync(device)
    start = time.perf_counter()
    steps = 0
    for k, rows in enumerate(shards):
        torch.manual_seed(k)
        shard_model = build_unet(settings.model, settings.image_size, 3, init=settings.model_init)
        shard_model.load_state_dict(model.state_dict())
        result = train_shard(shard_model, images[rows], config, ShardState(), device=device, seed=shard_seed(0, 1, k))
        steps += result.steps
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "data": source,
        "images": int(images.shape[0]),
        "shards": settings.num_shards,
        "local_epochs": config.local_epochs,
        "batch": config.batch_size,
        "precision": chosen.name,
        "channels_last": chosen.channels_last,
        "steps": steps,
        "seconds": round(seconds, 2),
        "sample_steps_per_s": round(steps * config.batch_size / seconds, 1),
        "peak_mb": _peak_mb(device),
    }


def step_rows(device: torch.device, cfg: dict, args: argparse.Namespace) -> list[dict]:
    configs = ["fp32", "bf16-cl"] + (["fp16-cl"] if device.type == "cuda" else [])
    if not args.smoke:
        configs += ["fp32-compile", "bf16-cl-compile"]
    bench_precision.SHAPES[cfg["model"]] = (*bench_precision.SHAPES[cfg["model"]][:2], cfg["batch"])
    ns = argparse.Namespace(steps=cfg["steps"], repeats=1 if args.smoke else 3, sample_images=0, memory=False)
    return bench_precision.bench(cfg["model"], configs, ["plain", "taa"], ns, device)


def mq_knn(device: torch.device, cfg: dict) -> dict:
    num_gen, num_train = cfg["knn"]
    size = 32 if not cfg["model"] == "tiny" else 8
    gen = torch.randint(0, 256, (num_gen, 3, size, size), dtype=torch.uint8)
    train = torch.randint(0, 256, (num_train, 3, size, size), dtype=torch.uint8)
    _peak_start(device)
    _sync(device)
    start = time.perf_counter()
    nearest_neighbours(gen, train, 50 if num_train >= 50 else num_train, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "generated": num_gen,
        "training": num_train,
        "values": 3 * size * size,
        "seconds": round(seconds, 2),
        "pairs_per_s": round(num_gen * num_train / seconds),
        "peak_mb": _peak_mb(device),
    }


def fid_features(device: torch.device, cfg: dict) -> list[dict]:
    net = random_inception(device)
    images = torch.rand(cfg["fid_images"], 3, 32, 32)
    rows = []
    for name in ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else []):
        extractor = Precision(name).features(net, device)
        batch = 256 if device.type == "cuda" else 4
        with torch.no_grad():
            model_features(extractor, rgb01(images[:batch]).to(device))  # warm-up
            _peak_start(device)
            _sync(device)
            start = time.perf_counter()
            for s in range(0, images.shape[0], batch):
                model_features(extractor, rgb01(images[s : s + batch]).to(device))
            _sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            {"precision": name, "images_per_s": round(images.shape[0] / seconds, 1), "peak_mb": _peak_mb(device)}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default="", help="where CIFAR-10 may be (not downloaded)")
    ap.add_argument("--round-epochs", type=int, default=0, help="the preset round's local epochs (0: the preset's)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cfg = SMOKE if args.smoke else FULL
    if args.smoke and not args.round_epochs:
        args.round_epochs = 1
    report: dict = {"smoke": args.smoke, "environment": environment(device)}
    sections = (
        ("preset_round", preset_round, (device, cfg, args)),
        ("steps", step_rows, (device, cfg, args)),
        ("mq_knn", mq_knn, (device, cfg)),
        ("fid_features", fid_features, (device, cfg)),
    )
    started = time.perf_counter()
    for name, fn, fn_args in sections:  # each section's result written as it comes: a timeout keeps the rest
        t0 = time.perf_counter()
        report[name] = fn(*fn_args)
        report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
