"""How noisy is digit_fd? Its 95 % interval and floor against the sample count.

    python scripts/digit_fd_noise.py [RUN_DIR ...] [--counts 250,500,1000] [--train-size 200] [--seeds 0]

For held-out real digits (the floor's images, which neither the classifier nor a DDPM saw) and
for each run folder's final model (DDIM samples, seeded as its evaluation), prints digit_fd at
each count with its 95 % interval (evaluation.bootstrap) and width, and the floor at that count. A Markdown
table on stdout; this is what docs/results.md quotes.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pandas as pd
import torch
from diffusers import UNet2DModel

from ddpm.data import load_dataset
from ddpm.schedule import ddim_sample
from evaluation.digit_fd import load_digit_fd
from evaluation.fid import cache_dir


def scorer(train_size: int, seed: int):
    data = load_dataset("digits", image_size=8, train_size=train_size, seed=seed)
    return load_digit_fd(data.images, data.labels, data.holdout, data.holdout_labels, cache_dir(), seed)


def rows_for(label: str, images: torch.Tensor, score_fn, counts: list[int]) -> list[dict]:
    rows = []
    for n in counts:
        if n > len(images):
            continue
        s = score_fn.score(images[:n])
        rows.append(
            {"images": label, "n": n, "digit_fd": s.value, "lo": s.lo, "hi": s.hi, "width": s.hi - s.lo}
            | {"floor": s.floor, "floor_n": s.floor_n}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="run folders (with pipeline/ and settings.toml)")
    ap.add_argument("--counts", default="250,500,1000")
    ap.add_argument("--train-size", type=int, default=200, help="for the real-digit rows")
    ap.add_argument("--seeds", default="0", help="data seeds for the real-digit rows")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        fd = scorer(args.train_size, seed)
        rows += rows_for(f"real held-out (train-size {args.train_size}, seed {seed})", fd.floor_images, fd, counts)
    for run in map(Path, args.runs):
        settings = tomllib.loads((run / "settings.toml").read_text())
        fd = scorer(settings["train-size"], settings["seed"])
        unet = UNet2DModel.from_pretrained(run / "pipeline" / "unet", use_safetensors=True).eval()
        images = ddim_sample(unet, max(counts), steps=settings["sample-steps"], seed=settings["seed"])
        rows += rows_for(run.parent.parent.name + f" seed {settings['seed']}", images, fd, counts)
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
