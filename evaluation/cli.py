"""Evaluation subcommands of the ``iet-agc`` tool: ``mq`` (arrays or folders) and ``evaluate`` (a model).

Both print one JSON line on stdout. Bad inputs end with ``iet-agc <cmd>: error: ...`` on stderr
and exit code 2 (as argparse does for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: `iet-agc run` does not need it
    import torch

import numpy as np

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class InputError(ValueError):
    """A user input the command cannot work with; the message says which and why."""


# ---- reading image sets -------------------------------------------------------------------
def load_images(spec: str, name: str) -> torch.Tensor:
    """A ``.npy`` array (N,C,H,W or N,H,W,C or N,H,W; uint8 0..255 or float 0..1) or an image folder,
    as an (N, C, H, W) uint8 or float32 tensor. Raises InputError naming ``name`` for bad input."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_folder(path, name)
    if path.suffix != ".npy":
        raise InputError(f"--{name}: {spec} is neither a .npy file nor a folder of images")
    if not path.is_file():
        raise InputError(f"--{name}: file {spec} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"--{name}: cannot read {spec}: {err}") from err
    return _from_array(array, name)


def _from_array(array: np.ndarray, name: str) -> torch.Tensor:
    import torch

    if array.ndim == 3:  # (N, H, W) grey
        array = array[:, None]
    if array.ndim != 4:
        raise InputError(f"--{name}: expected N,C,H,W or N,H,W,C images, got shape {array.shape}")
    if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # N,H,W,C -> N,C,H,W
    elif array.shape[1] not in (1, 3):
        raise InputError(f"--{name}: cannot find a channel axis of size 1 or 3 in shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(f"--{name}: empty set (shape {array.shape})")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"--{name}: expected uint8 (0..255) or float (0..1) values, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"--{name}: contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 1:
        raise InputError(f"--{name}: float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(array)


def _read_folder(root: Path, name: str) -> torch.Tensor:
    import torch
    from PIL import Image

    from ddpm.data import IMAGE_SUFFIXES, image_files

    files = image_files(root)
    if not files:
        raise InputError(f"--{name}: empty set: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    images = []
    for path in files:  # reading files, not the metric
        with Image.open(path) as img:
            images.append(img.copy())
    grey = all(img.mode in GREY_MODES for img in images)
    arrays = [np.asarray(img.convert("L" if grey else "RGB")) for img in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise InputError(f"--{name}: images under {root} have different sizes {sorted(sizes)}; use one resolution")
    stacked = np.stack(arrays)
    return torch.from_numpy(stacked[:, None] if grey else stacked.transpose(0, 3, 1, 2).copy())


def parse_thresholds(text: str) -> tuple[float, ...]:
    """'0.4,0.5,0.6' -> (0.4, 0.5, 0.6); each must be in (0, 1]."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--thresholds: comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < t <= 1 for t in values):
        raise InputError(f"--thresholds: each must be in (0, 1], got {text!r}")
    return values


# ---- iet-agc mq ---------------------------------------------------------------------------
def mq_report(
    generated: torch.Tensor,
    train: torch.Tensor,
    holdout: torch.Tensor | None = None,
    n: int = 50,
    thresholds: tuple[float, ...] = (0.4, 0.5, 0.6),
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], Any]:
    """MQ counts (eq. 12-13) and, with a hold-out set, copy_1/copy_5; returns (summary, neighbours)."""
    from .mq import copy_scores, mq_counts, nearest_neighbours

    if n < 1:
        raise InputError(f"--n: must be >= 1, got {n}")
    for name, images in (("train", train), ("holdout", holdout)):
        if images is not None and tuple(images.shape[1:]) != tuple(generated.shape[1:]):
            raise InputError(
                f"--{name}: images of shape {tuple(images.shape[1:])} do not match the generated images' "
                f"{tuple(generated.shape[1:])} (C, H, W); compare at the training resolution"
            )
    if train.shape[0] < n:
        raise InputError(f"--train: {train.shape[0]} training images, fewer than --n {n}")
    neighbours = nearest_neighbours(generated, train, n, device=device)
    summary: dict[str, Any] = dict(mq_counts(neighbours.ratio, thresholds))
    summary.update(n_generated=int(generated.shape[0]), n_train=int(train.shape[0]), n=n)
    if holdout is not None:
        held = nearest_neighbours(holdout, train, n, device=device).ratio
        summary.update(copy_scores(neighbours.ratio, held))
        summary["n_holdout"] = int(holdout.shape[0])
    return summary, neighbours


def cmd_mq(args: argparse.Namespace) -> int:
    """``iet-agc mq``: one JSON line with mq_<delta>, n_generated (and copy_1/copy_5 with --holdout)."""
    from ddpm.device import resolve_device

    try:
        thresholds = parse_thresholds(args.thresholds)
        generated = load_images(args.generated, "generated")
        train = load_images(args.train, "train")
        holdout = load_images(args.holdout, "holdout") if args.holdout else None
        summary, neighbours = mq_report(generated, train, holdout, args.n, thresholds, resolve_device(args.device))
    except (InputError, ValueError) as err:
        return _fail("mq", err)
    if args.per_image:
        import pandas as pd

        pd.DataFrame(
            {"generated": np.arange(len(neighbours.ratio)), "ratio": neighbours.ratio, "nearest": neighbours.nearest}
        ).to_csv(args.per_image, index=False)
    print(json.dumps(summary), flush=True)
    return 0


# ---- iet-agc evaluate ---------------------------------------------------------------------
def _locate(source: Path) -> tuple[Path | None, Path]:
    """(run folder or None, pipeline folder) for a run folder or a DDPMPipeline folder."""
    if (source / "pipeline" / "model_index.json").is_file():
        return source, source / "pipeline"
    if (source / "model_index.json").is_file():
        return (source.parent if (source.parent / "settings.toml").is_file() else None), source
    raise InputError(f"{source}: neither a run folder (with pipeline/) nor a DDPMPipeline folder (model_index.json)")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _settings(run_dir: Path | None, overrides: list[str]):
    from ddpm.settings import Settings

    values: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "settings.toml").is_file():
        with open(run_dir / "settings.toml", "rb") as fh:
            values.update(tomllib.load(fh))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set: expected KEY=VALUE, got {item!r}")
        values[key.strip()] = _parse_value(value.strip())
    return Settings.from_run_config(values)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``iet-agc evaluate``: sample a saved model with DDIM, write the evaluation, print its metrics."""
    from diffusers import DDPMPipeline

    from ddpm.data import load_dataset
    from ddpm.device import resolve_device

    from .evaluator import MemorizationEvaluator

    try:
        source = Path(args.source).expanduser()
        run_dir, pipeline_dir = _locate(source)
        extra = list(args.set)
        if args.num_images is not None:
            extra.append(f"eval-num-images={args.num_images}")
        if args.device:
            extra.append(f"device={json.dumps(args.device)}")
        settings = _settings(run_dir, extra)
        data = load_dataset(**settings.dataset_kwargs())
        if len(data) < settings.mq_neighbours:
            raise InputError(f"mq-neighbours: {settings.mq_neighbours} exceeds the {len(data)} training images")
        unet = DDPMPipeline.from_pretrained(pipeline_dir).unet
        cfg = unet.config
        if (cfg.in_channels, cfg.sample_size) != (data.channels, data.image_size):
            raise InputError(
                f"the model makes {cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size} images, the data set "
                f"{data.channels}x{data.image_size}x{data.image_size}; set dataset/image-size with --set"
            )
    except (InputError, ValueError, OSError, tomllib.TOMLDecodeError) as err:
        return _fail("evaluate", err)
    device = resolve_device(settings.device)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else (run_dir or pipeline_dir.parent) / f"evaluate-{stamp}"
    evaluator = MemorizationEvaluator(settings, data, out, device)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON line (torch.hub prints there)
        images = evaluator.generate(unet)
        metrics = evaluator.evaluate_images(images, "final", f"{pipeline_dir} ({settings.eval_num_images} images)")
    summary = {
        **metrics,
        "n_generated": int(images.shape[0]),
        "fid_reason": evaluator.fid_reason,
        "report": str(evaluator.last_report),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)
    return 0


def _fail(command: str, err: Exception) -> int:
    print(f"iet-agc {command}: error: {err}", file=sys.stderr, flush=True)
    return 2


# ---- wiring -------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``mq`` and ``evaluate`` subcommands (each sets ``func`` -> exit code) to ``iet-agc``."""
    mq = sub.add_parser(
        "mq",
        help="MQ (eq. 12-13) of generated images against training images",
        description="Each of G, T, H is a .npy array (N,C,H,W or N,H,W,C; uint8 0..255 or float 0..1) "
        "or a folder of images. Prints one JSON line.",
    )
    mq.add_argument("--generated", required=True, metavar="G", help="generated images")
    mq.add_argument("--train", required=True, metavar="T", help="training images (ids = row order)")
    mq.add_argument("--holdout", default="", metavar="H", help="held-out real images: adds copy_1, copy_5")
    mq.add_argument("--n", type=int, default=50, help="neighbours in the ratio's denominator (default 50)")
    mq.add_argument("--thresholds", default="0.4,0.5,0.6", help="comma-separated deltas (default 0.4,0.5,0.6)")
    mq.add_argument("--device", default="auto", help="auto, cpu, cuda[:N], mps (default auto)")
    mq.add_argument("--per-image", default="", metavar="CSV", help="also write each image's ratio and nearest id")
    mq.set_defaults(func=cmd_mq)

    ev = sub.add_parser(
        "evaluate",
        help="sample a saved model and write MQ, copy_1/copy_5, FID, pictures and a report",
        description="RUN_DIR_OR_PIPELINE is a run folder (pipeline/ and settings.toml) or a DDPMPipeline "
        "folder. Writes eval_final.md, pictures and metrics.json; prints one JSON line.",
    )
    ev.add_argument("source", metavar="RUN_DIR_OR_PIPELINE")
    ev.add_argument("--num-images", type=int, default=None, help="generated images (default: eval-num-images)")
    ev.add_argument("--device", default="", help="auto, cpu, cuda[:N], mps (default: the run's setting)")
    ev.add_argument("--out", default="", help="output folder (default: <run>/evaluate-<time>)")
    ev.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. dataset=cifar10"
    )
    ev.set_defaults(func=cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m evaluation.cli``) with the same subcommands."""
    parser = argparse.ArgumentParser(prog="iet-agc", description="IET-AGC+ evaluation")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
