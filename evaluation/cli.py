"""Evaluation subcommands of the ``iet-agc`` tool: ``mq`` (arrays or folders) and ``evaluate`` (a model).

Both print one JSON line on stdout. A bad input (a missing, corrupt or mis-shaped file, a folder
named like an image, an unknown or absent device, an output that cannot be written, a count or
threshold out of range, a bad argument) ends with one line ``iet-agc <cmd>: error: <option or
file>: <reason>`` on stderr and exit code 2, as argparse does for bad arguments; inputs are checked
before the long work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import sys
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: `iet-agc run` does not need it
    import torch

import numpy as np

from ddpm.device import DEVICE_PATTERN, DEVICES
from ddpm.files import error_text as _reason
from ddpm.progress import bars

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class InputError(ValueError):
    """A user input the command cannot work with; the message names it (option or file) and says why."""


# ---- paths --------------------------------------------------------------------------------
def _probe(option: str, spec: str, test: Callable[[Path], Any]) -> Any:
    """``test(Path(spec).expanduser())``; what the file system refuses (a name too long, an unknown
    ``~user``, a NUL byte) is an InputError naming ``option``."""
    try:
        return test(Path(spec).expanduser())
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(f"{option}: cannot use {spec!r} ({_reason(err)})") from None


def check_output(option: str, spec: str, *, folder: bool) -> Path:
    """The output ``spec`` (a folder, or a file in one) can be made and written; returns its path.

    Checked before any work: it is not a folder where a file goes (or a file where a folder goes),
    and the nearest existing folder above it is a folder and writable. Missing folders are made later.
    """

    def nearest(path: Path) -> Path:
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    path = _probe(option, spec, lambda p: p)
    if _probe(option, spec, Path.is_dir) != folder and _probe(option, spec, Path.exists):
        raise InputError(f"{option}: {spec} exists and is {'not ' if folder else ''}a folder")
    existing = _probe(option, spec, lambda p: nearest(p if folder else p.parent))
    if not existing.is_dir():
        raise InputError(f"{option}: cannot write {spec}: {existing} is not a folder")
    target = path if path.exists() else existing
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        raise InputError(f"{option}: cannot write {spec}: {target} is not writable")
    return path


# ---- reading image sets -------------------------------------------------------------------
def load_images(spec: str, name: str) -> torch.Tensor:
    """A ``.npy`` array (N,C,H,W or N,H,W,C or N,H,W; uint8 0..255 or float 0..1) or an image folder,
    as an (N, C, H, W) uint8 or float32 tensor. Raises InputError naming ``--name`` for bad input."""
    option = f"--{name}"
    path = _probe(option, spec, lambda p: p)
    if _probe(option, spec, Path.is_dir):
        return _read_folder(path, option)
    if not _probe(option, spec, Path.exists):
        raise InputError(f"{option}: {spec} does not exist")
    if path.suffix.lower() != ".npy":
        raise InputError(f"{option}: {spec} is neither a .npy file nor a folder of images")
    try:  # mapped first: a header that declares more data than the file holds allocates nothing
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = _reason(err)
        if "mmap length is greater than file size" in reason:
            reason = "its header declares more data than the file holds (truncated?)"
        raise InputError(f"{option}: cannot read {spec}: {reason}") from None
    if not isinstance(mapped, np.ndarray):  # an .npz archive named .npy
        mapped.close()
        raise InputError(f"{option}: {spec} is an .npz archive, not one .npy array")
    try:
        array = np.array(mapped)
    except MemoryError:
        raise InputError(f"{option}: {spec} ({mapped.nbytes / 2**30:.1f} GiB) does not fit in memory") from None
    finally:
        del mapped
    return _from_array(array, option)


def _from_array(array: np.ndarray, option: str) -> torch.Tensor:
    import torch

    if array.ndim == 3:  # (N, H, W) grey
        array = array[:, None]
    if array.ndim != 4:
        raise InputError(f"{option}: expected N,C,H,W or N,H,W,C images, got shape {array.shape}")
    if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # N,H,W,C -> N,C,H,W
    elif array.shape[1] not in (1, 3):
        raise InputError(f"{option}: cannot find a channel axis of size 1 or 3 in shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(f"{option}: empty set (shape {array.shape})")
    if 0 in array.shape[2:]:
        raise InputError(f"{option}: images of height or width 0 (shape {array.shape})")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{option}: expected uint8 (0..255) or float (0..1) values, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{option}: contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 1:
        raise InputError(f"{option}: float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(array)


def read_image(path: Path, option: str):
    """``ddpm.data.read_image`` for a command-line option: its error as an InputError naming both."""
    from ddpm.data import read_image as decode

    try:
        return decode(path)
    except ValueError as err:
        raise InputError(f"{option}: {err}") from None


def _read_folder(root: Path, option: str) -> torch.Tensor:
    import torch

    from ddpm.data import IMAGE_SUFFIXES, image_files

    try:
        files = image_files(root)
    except OSError as err:
        raise InputError(f"{option}: cannot list {root}: {_reason(err)}") from None
    if not files:
        raise InputError(f"{option}: empty set: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    images, first = [], None
    for path in files:  # reading files, not the metric
        img = read_image(path, option)
        if first is None:
            first = (path, img.size)
        elif img.size != first[1]:
            (w0, h0), (w, h) = first[1], img.size
            raise InputError(f"{option}: {path} is {w}x{h} but {first[0]} is {w0}x{h0}; use images of one resolution")
        images.append(img)
    grey = all(img.mode in GREY_MODES for img in images)
    arrays = []
    for path, img in zip(files, images, strict=True):
        try:
            arrays.append(np.asarray(img.convert("L" if grey else "RGB")))
        except (OSError, ValueError) as err:  # a colour space without a conversion
            raise InputError(f"{option}: {path}: cannot convert mode {img.mode} ({_reason(err)})") from None
    stacked = np.stack(arrays)
    return torch.from_numpy(stacked[:, None] if grey else stacked.transpose(0, 3, 1, 2).copy())


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``--thresholds``: the settings' rule for ``mq-thresholds``, as an InputError."""
    from ddpm.settings import parse_thresholds as settings_thresholds

    try:
        return settings_thresholds(text, "--thresholds")
    except ValueError as err:
        raise InputError(str(err)) from None


def usable_device(name: str, option: str = "--device") -> torch.device:
    """The torch device for ``name`` (auto, cpu, cuda[:N], mps, xpu[:N]), if this machine has it."""
    import torch

    from ddpm.device import resolve_device

    if not re.fullmatch(DEVICE_PATTERN, name):
        raise InputError(f"{option}: must be one of {DEVICES} (N in 0..999), got {name!r}")
    device = resolve_device(name)
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    if device.type in backend:
        module = backend[device.type]
        if module is None or not module.is_available():
            raise InputError(f"{option}: {name}: no {device.type} device on this machine; use cpu or auto")
        count = module.device_count() if device.type != "mps" else 1
        if (device.index or 0) >= count:
            raise InputError(f"{option}: {name}: this machine has {count} {device.type} device(s), numbered from 0")
    return device


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
    neighbours = nearest_neighbours(generated, train, n, device=device, desc="nearest neighbours of --generated")
    summary: dict[str, Any] = dict(mq_counts(neighbours.ratio, thresholds))
    summary.update(n_generated=int(generated.shape[0]), n_train=int(train.shape[0]), n=n)
    if holdout is not None:
        held = nearest_neighbours(holdout, train, n, device=device, desc="nearest neighbours of --holdout").ratio
        summary.update(copy_scores(neighbours.ratio, held))
        summary["n_holdout"] = int(holdout.shape[0])
    return summary, neighbours


def cmd_mq(args: argparse.Namespace) -> int:
    """``iet-agc mq``: one JSON line with mq_<delta>, n_generated (and copy_1/copy_5 with --holdout)."""
    try:  # the cheap checks first, then the reading
        thresholds = parse_thresholds(args.thresholds)
        if args.n < 1:
            raise InputError(f"--n: must be >= 1, got {args.n}")
        device = usable_device(args.device, "--device")
        per_image = check_output("--per-image", args.per_image, folder=False) if args.per_image else None
        generated = load_images(args.generated, "generated")
        train = load_images(args.train, "train")
        holdout = load_images(args.holdout, "holdout") if args.holdout else None
        summary, neighbours = mq_report(generated, train, holdout, args.n, thresholds, device)
    except InputError as err:
        return _fail("mq", err)
    if per_image is not None:
        import pandas as pd

        table = {
            "generated": np.arange(len(neighbours.ratio)),
            "ratio": neighbours.ratio,
            "nearest": neighbours.nearest,
        }
        try:
            per_image.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(table).to_csv(per_image, index=False)
        except OSError as err:
            return _fail("mq", InputError(f"--per-image: cannot write {args.per_image}: {_reason(err)}"))
    print(json.dumps(summary), flush=True)
    return 0


# ---- iet-agc evaluate ---------------------------------------------------------------------
def _locate(spec: str) -> tuple[Path | None, Path]:
    """(run folder or None, pipeline folder) for a run folder or a DDPMPipeline folder."""
    option = "RUN_DIR_OR_PIPELINE"
    source = _probe(option, spec, lambda p: p)
    if _probe(option, spec, lambda p: (p / "pipeline" / "model_index.json").is_file()):
        return source, source / "pipeline"
    if _probe(option, spec, lambda p: (p / "model_index.json").is_file()):
        return (source.parent if (source.parent / "settings.toml").is_file() else None), source
    if not source.exists():
        raise InputError(f"{spec}: does not exist")
    kind = "a folder" if source.is_dir() else "a file"
    raise InputError(
        f"{spec}: {kind}, neither a run folder (with pipeline/) nor a DDPMPipeline folder (model_index.json)"
    )


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _settings(run_dir: Path | None, args: argparse.Namespace):
    """The run's settings.toml (if any) < ``--set`` < ``--num-images``/``--device``; a refusal names
    where the value came from (the option, or the settings file)."""
    from ddpm.settings import Settings

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    toml = run_dir / "settings.toml" if run_dir is not None else None
    if toml is not None and toml.is_file():
        try:
            with open(toml, "rb") as fh:
                values.update(tomllib.load(fh))
        except (OSError, ValueError) as err:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            raise InputError(f"{toml}: not a readable TOML file ({_reason(err)})") from None
        origin.update(dict.fromkeys(values, str(toml)))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set: expected KEY=VALUE, got {item!r}")
        values[key.strip()] = _parse_value(value.strip())
        origin[key.strip()] = f"--set {key.strip()}"
    if args.num_images is not None:
        values["eval-num-images"], origin["eval-num-images"] = args.num_images, "--num-images"
    if args.device:
        values["device"], origin["device"] = args.device, "--device"

    def refused(err: ValueError) -> InputError:
        key = str(err).partition(":")[0]
        where = origin.get(key, "")
        return InputError(f"{where}: {err}" if where and not where.startswith("--set") else f"{err}")

    try:
        settings = Settings.from_run_config(values)
    except ValueError as err:
        raise refused(err) from None
    return settings, origin, refused


def _load_data(settings) -> tuple[Any, list[warnings.WarningMessage]]:
    """The data set and the warnings loading it raised, or an InputError naming the setting and,
    for a bad image, the file."""
    from PIL import Image

    from ddpm.data import image_files, load_dataset

    try:
        with warnings.catch_warnings(record=True) as caught:  # the caller shows them once all checks passed
            warnings.simplefilter("always")
            data = load_dataset(**settings.dataset_kwargs())
        return data, caught
    except ValueError as err:  # load_dataset's own checks name the setting
        raise InputError(str(err)) from None
    except (OSError, RuntimeError, Image.DecompressionBombError) as err:  # unreadable files, no download
        if settings.dataset == "imagefolder":  # find the file: ddpm.data's reader does not name it
            for option, root in (("data-root", settings.data_root), ("holdout-root", settings.holdout_root)):
                with contextlib.suppress(OSError):
                    for path in image_files(Path(root)) if root else []:
                        read_image(path, option)  # raises InputError naming the file
        key = "data-root" if settings.dataset == "imagefolder" else "dataset"
        raise InputError(f"{key}: cannot load data set {settings.dataset!r}: {_reason(err)}") from None


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``, or an InputError naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{path}: not a readable JSON file ({_reason(err)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_unet(pipeline_dir: Path):
    """The pipeline's UNet2DModel (safetensors only: no pickle), or an InputError naming the file."""
    from diffusers import UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    _json_object(pipeline_dir / "model_index.json")
    unet_dir = pipeline_dir / "unet"
    if not (unet_dir / "config.json").is_file():
        raise InputError(f"{pipeline_dir}: no unet/config.json; not a DDPMPipeline folder")
    kind = _json_object(unet_dir / "config.json").get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise InputError(f"{unet_dir / 'config.json'}: a {kind}, not a UNet2DModel")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its messages would break the one-line error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:  # missing, corrupt or mis-shaped
        pickled = " (.bin weights are pickles and are not read: save the model in safetensors)"
        hint = pickled if (unet_dir / "diffusion_pytorch_model.bin").exists() else ""
        raise InputError(f"{unet_dir}: cannot load the UNet ({_reason(err)[:300]}){hint}") from None
    finally:
        diffusers_logging.set_verbosity(level)
    cfg = unet.config
    if cfg.in_channels != cfg.out_channels or not isinstance(cfg.sample_size, int):
        raise InputError(
            f"{unet_dir}: not a pixel-space denoiser (in_channels {cfg.in_channels}, out_channels "
            f"{cfg.out_channels}, sample_size {cfg.sample_size})"
        )
    return unet


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``iet-agc evaluate``: sample a saved model with DDIM, write the evaluation, print its metrics."""
    from .evaluator import MemorizationEvaluator, evaluate_saved

    try:  # every input is checked before sampling starts
        run_dir, pipeline_dir = _locate(args.source)
        settings, origin, refused = _settings(run_dir, args)
        where = origin.get("device", "the default")
        device = usable_device(settings.device, where if where.startswith("--") else f"device (from {where})")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_spec = args.out or str((run_dir or pipeline_dir.parent) / f"evaluate-{stamp}")
        out = check_output("--out", out_spec, folder=True)
        try:  # this machine's files: data-root, holdout-root, fid-weights, fid-cache-dir
            here = {"out_dir": str(out), "resume": ""} | ({} if settings.fid else {"fid_weights": ""})
            settings.replace(**here).check_environment()
        except ValueError as err:
            raise refused(err) from None
        data, notes = _load_data(settings)
        if len(data) < settings.mq_neighbours:
            raise InputError(f"mq-neighbours: {settings.mq_neighbours} exceeds the {len(data)} training images")
        unet = _load_unet(pipeline_dir)
        cfg = unet.config
        if (cfg.in_channels, cfg.sample_size) != (data.channels, data.image_size):
            raise InputError(
                f"{pipeline_dir}: the model makes {cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size} images, the "
                f"data set {data.channels}x{data.image_size}x{data.image_size}; set dataset/image-size with --set"
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"--out: cannot make {out_spec}: {_reason(err)}") from None
    except InputError as err:
        return _fail("evaluate", err)
    for note in notes:
        warnings.showwarning(note.message, note.category, note.filename, note.lineno)
    evaluator = MemorizationEvaluator(settings, data, out, device)
    summary = evaluate_saved(evaluator, unet, f"{pipeline_dir} ({settings.eval_num_images} images)")
    print(json.dumps(summary), flush=True)  # stdout: this JSON line only
    return 0


def _fail(command: str, err: Exception) -> int:
    print(f"iet-agc {command}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    return 2


# ---- wiring -------------------------------------------------------------------------------
def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a bad argument as one line ``<prog>: error: <option>: <reason>`` (exit 2),
    without the usage block, and refuse unknown arguments itself (as a subcommand, argparse would
    leave them to the top-level parser, which prints its own usage)."""
    prog = parser.prog

    def error(message: str):
        parser.exit(2, f"{prog}: error: {' '.join(message.removeprefix('argument ').split())}\n")

    def parse_known_args(args=None, namespace=None):
        namespace, extras = type(parser).parse_known_args(parser, args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)} (see {prog} --help)")
        return namespace, extras

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser


def _with_bars(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` showing tqdm bars for its long passes (sampling, features, nearest neighbours)."""

    def run(args: argparse.Namespace) -> int:
        with bars():
            return command(args)

    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``mq`` and ``evaluate`` subcommands (each sets ``func`` -> exit code) to ``iet-agc``."""
    mq = sub.add_parser(
        "mq",
        help="MQ (eq. 12-13) of generated images against training images",
        description="Each of G, T, H is a .npy array (N,C,H,W or N,H,W,C; uint8 0..255 or float 0..1) "
        "or a folder of images (.png, .jpg, .jpeg, .bmp, .webp; one resolution). Prints one JSON line. "
        "A bad input exits 2 with one line naming it.",
    )
    mq.add_argument("--generated", required=True, metavar="G", help="generated images")
    mq.add_argument("--train", required=True, metavar="T", help="training images (ids = row order)")
    mq.add_argument("--holdout", default="", metavar="H", help="held-out real images: adds copy_1, copy_5")
    mq.add_argument("--n", type=int, default=50, help="neighbours in the ratio's denominator, >= 1 (default 50)")
    mq.add_argument(
        "--thresholds", default="0.4,0.5,0.6", help="comma-separated deltas in (0, 1] (default 0.4,0.5,0.6)"
    )
    mq.add_argument("--device", default="auto", help=f"{DEVICES} (default auto)")
    mq.add_argument("--per-image", default="", metavar="CSV", help="also write each image's ratio and nearest id")
    mq.set_defaults(func=_with_bars(cmd_mq))
    one_line_errors(mq)

    ev = sub.add_parser(
        "evaluate",
        help="sample a saved model and write MQ, copy_1/copy_5, FID, pictures and a report",
        description="RUN_DIR_OR_PIPELINE is a run folder (pipeline/ and settings.toml) or a DDPMPipeline "
        "folder (weights in safetensors). Writes eval_final.md, pictures and metrics.json; prints one JSON line. "
        "A bad input exits 2 with one line naming it.",
    )
    ev.add_argument("source", metavar="RUN_DIR_OR_PIPELINE")
    ev.add_argument("--num-images", type=int, default=None, help="generated images (default: eval-num-images)")
    ev.add_argument("--device", default="", help=f"{DEVICES} (default: the run's setting)")
    ev.add_argument("--out", default="", help="output folder (default: <run>/evaluate-<time>)")
    ev.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. dataset=cifar10"
    )
    ev.set_defaults(func=_with_bars(cmd_evaluate))
    one_line_errors(ev)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m evaluation.cli``) with the same subcommands."""
    parser = argparse.ArgumentParser(prog="iet-agc", description="IET-AGC+ evaluation")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
