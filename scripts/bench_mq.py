"""Benchmark of the evaluator's heavy passes: the exact nearest-neighbour pass of MQ (eq. 12-13)
against a plain torch matrix product of the same shapes, and the FID feature pass.

    python scripts/bench_mq.py                      # 8,192 x 50,000 x 3,072 (CIFAR-like), auto device
    python scripts/bench_mq.py --gen 1024 --train 8192 --fid-images 20   # a quick look

Each pass runs in its own child process, so each reports its own peak memory (RSS on the CPU,
``max_memory_allocated`` on CUDA). The data are random (uniform in [0, 1], float32): the work of
both passes does not depend on the values. The FID timing uses pytorch-fid's Inception network
with RANDOM weights (the real weights cannot be downloaded offline); its cost is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args: argparse.Namespace) -> dict:
    from ddpm.device import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    out: dict = {"mode": args.mode, "device": str(device), "threads": torch.get_num_threads()}
    if args.mode in ("nn", "mm"):
        g = torch.rand(args.gen, args.dim, generator=gen)
        t = torch.rand(args.train, args.dim, generator=gen)
        torch.mm(g[:256], t[:256].T)  # warm-up (BLAS threads)
        if device.type == "cuda":
            g, t = g.to(device), t.to(device)
            torch.cuda.reset_peak_memory_stats(device)
        out["inputs_mib"] = (g.numel() + t.numel()) * 4 / 2**20
        out["rss_before_mib"] = _rss_mib()
        _sync(device)
        start = time.perf_counter()
        if args.mode == "nn":
            from evaluation.mq import nearest_neighbours

            nb = nearest_neighbours(g, t, args.n, gen_chunk=args.gen_chunk, train_chunk=args.train_chunk, device=device)
            out["check"] = float(nb.ratio.mean())
        else:
            prod = torch.mm(g, t.T)
            out["check"] = float(prod[0, 0])
        _sync(device)
        out["seconds"] = time.perf_counter() - start
        out["gflops"] = 2 * args.gen * args.train * args.dim / out["seconds"] / 1e9
    else:  # fid: Inception pool3 features of CIFAR-sized images, batch by batch
        from evaluation.fid import inception_features, random_inception

        if device.type == "cpu":
            torch.set_flush_denormal(True)  # random weights make denormal activations; real ones do not
        net = random_inception(device)
        images = torch.rand(args.fid_images, 3, 32, 32, generator=gen)
        inception_features(images[: args.fid_batch], net, args.fid_batch, device)  # warm-up
        _sync(device)
        start = time.perf_counter()
        feats = inception_features(images, net, args.fid_batch, device)
        _sync(device)
        out["seconds"] = time.perf_counter() - start
        out["images"] = int(feats.shape[0])
        out["seconds_per_1000"] = out["seconds"] / feats.shape[0] * 1000
    out["peak_mib"] = _peak_mib(device)
    if device.type == "cpu" and "rss_before_mib" in out:
        out["extra_mib"] = out["peak_mib"] - out["rss_before_mib"]  # beyond the process with its inputs
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen", type=int, default=8192, help="generated images (default 8192)")
    p.add_argument("--train", type=int, default=50000, help="training images (default 50000)")
    p.add_argument("--dim", type=int, default=3072, help="values per image (default 3072 = 3x32x32)")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--gen-chunk", type=int, default=1024)
    p.add_argument("--train-chunk", type=int, default=8192)
    p.add_argument("--fid-images", type=int, default=50, help="images for the FID timing (0: skip)")
    p.add_argument("--fid-batch", type=int, default=25)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for every pass (0: torch's default)")
    p.add_argument("--mode", choices=("nn", "mm", "fid"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)), flush=True)
        return
    results = {}
    modes = ["nn", "mm"] + (["fid"] if args.fid_images else [])
    for mode in modes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{mode} failed:\n{proc.stderr}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    nn, mm = results["nn"], results["mm"]
    shape = f"{args.gen:,} x {args.train:,} x {args.dim:,}"
    print(f"device {nn['device']}, {nn['threads']} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"| pass ({shape}) | seconds | GFLOP/s | peak memory (MiB) | of which beyond inputs | inputs (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in ((f"exact kNN, n = {args.n} (nearest_neighbours)", nn), ("plain torch.mm", mm)):
        extra = f"{r['extra_mib']:.0f}" if "extra_mib" in r else "-"
        print(f"| {name} | {r['seconds']:.1f} | {r['gflops']:.1f} | {r['peak_mib']:.0f} | {extra} ", end="")
        print(f"| {r['inputs_mib']:.0f} |")
    print(f"kNN rate / matmul rate: {nn['gflops'] / mm['gflops']:.0%}")
    if "fid" in results:
        f = results["fid"]
        print(
            f"FID feature pass (random-init Inception, {f['images']} images of 3x32x32 -> 299, batch "
            f"{args.fid_batch}): {f['seconds']:.1f} s, {f['seconds_per_1000']:.0f} s per 1,000 images, "
            f"peak {f['peak_mib']:.0f} MiB"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
