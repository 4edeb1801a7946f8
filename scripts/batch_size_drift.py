"""How much do a run's evaluation images and metrics move with eval-batch-size and the thread count?

    python scripts/batch_size_drift.py RUN_DIR [--batch-sizes 256,100,500] [--threads 2,1] [--num-images N]
        [--untrained]

Samples the run's final model (``pipeline/``) as its evaluation does (same seed, steps and image
count, from its ``settings.toml``) once per (batch size, threads), in this process, and evaluates
each sample set with the run's evaluator. Prints a Markdown table: per mode, the largest and the
mean absolute difference of the images (in [0, 1]) from the first mode, and the metrics (MQ, copy
scores, digit_fd). README "Determinism" and docs/results.md quote it. Image i's noise and label
depend only on (seed, i), so every difference is float rounding through other kernels.
``--untrained`` samples a freshly initialised UNet of the same config instead (seed 0): its
rounding differences grow through the DDIM steps instead of dying out.
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib
from pathlib import Path

import pandas as pd
import torch
from diffusers import UNet2DModel

from ddpm.data import load_dataset
from evaluation.evaluator import MemorizationEvaluator
from fl_app.config import eval_config
from fl_app.settings import Settings

METRICS = ("mq_0.4", "mq_0.5", "mq_0.6", "copy_1", "copy_5", "digit_fd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder (pipeline/ and settings.toml)")
    ap.add_argument("--batch-sizes", default="256,100,500", help="eval-batch-size values; the first is the reference")
    ap.add_argument("--threads", default="2,1", help="torch thread counts")
    ap.add_argument("--num-images", type=int, default=None, help="default: the run's eval-num-images")
    ap.add_argument("--untrained", action="store_true", help="a fresh UNet of the same config instead")
    args = ap.parse_args()
    values = tomllib.loads((args.run / "settings.toml").read_text())
    if args.num_images is not None:
        values["eval-num-images"] = args.num_images
    unet = UNet2DModel.from_pretrained(args.run / "pipeline" / "unet")
    if args.untrained:
        torch.manual_seed(0)
        unet = UNet2DModel.from_config(unet.config)
    settings = Settings.from_run_config({**values, "resume": "", "out-dir": str(args.run.parent)})
    data = load_dataset(**settings.dataset_kwargs())
    modes = [(b, t) for t in map(int, args.threads.split(",")) for b in map(int, args.batch_sizes.split(","))]
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size, threads in modes:
            torch.set_num_threads(threads)
            mode = settings.replace(eval_batch_size=batch_size)
            ev = MemorizationEvaluator(eval_config(mode), data, Path(tmp), torch.device("cpu"))
            images, labels = ev.generate(unet)
            metrics = ev.evaluate_images(images, f"b{batch_size}t{threads}", labels=labels).metrics
            first = images if first is None else first
            diff = (images - first).abs()
            rows.append(
                {"eval-batch-size": batch_size, "threads": threads, "max |d image|": diff.max().item()}
                | {"mean |d image|": diff.mean().item(), "images differing": int((diff.flatten(1).amax(1) > 0).sum())}
                | {k: metrics[k] for k in METRICS}
            )
    model = "an untrained UNet of its config" if args.untrained else "its final model"
    print(f"{args.run}, {model} ({settings.eval_num_images} images, {settings.sample_steps} DDIM steps)\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".7g"))


if __name__ == "__main__":
    main()
