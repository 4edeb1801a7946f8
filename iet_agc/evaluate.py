"""``iet-agc mq`` (MQ of image arrays or folders) and ``iet-agc evaluate`` (sample a saved model and
evaluate it as a run's final evaluation).

Both print one JSON line on stdout. A bad input (a missing, corrupt or mis-shaped file, a folder
named like an image, an unknown or absent device, an output that cannot be written, a count or
threshold out of range, a bad argument) ends with the one exit-2 line of ``inputs.fail``; inputs
are checked before the long work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: `iet-agc run` does not need it
    import torch

import numpy as np

from ddpm.device import DEVICES
from ddpm.files import error_text as _reason
from ddpm.progress import bars
from fl_app.config import eval_config

from .inputs import (
    InputError,
    _probe,
    check_output,
    fail,
    load_images,
    one_line_errors,
    parse_pairs,
    parse_thresholds,
    read_image,
    usable_device,
)


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
    from evaluation.mq import copy_scores, mq_counts, nearest_neighbours

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
        return fail("mq", err)
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
            return fail("mq", InputError(f"--per-image: cannot write {args.per_image}: {_reason(err)}"))
    print(json.dumps(summary), flush=True)
    return 0


# ---- iet-agc evaluate ---------------------------------------------------------------------
def _locate(spec: str) -> tuple[Path | None, Path]:
    """(run folder or None, pipeline folder) for a run folder or a pipeline folder (DDPMPipeline,
    AmbientPipeline, StableDiffusionPipeline: a ``model_index.json``)."""
    option = "RUN_DIR_OR_PIPELINE"
    source = _probe(option, spec, lambda p: p)
    if _probe(option, spec, lambda p: (p / "pipeline" / "model_index.json").is_file()):
        return source, source / "pipeline"
    if _probe(option, spec, lambda p: (p / "model_index.json").is_file()):
        return (source.parent if (source.parent / "settings.toml").is_file() else None), source
    if not source.exists():
        raise InputError(f"{spec}: does not exist")
    kind = "a folder" if source.is_dir() else "a file"
    raise InputError(f"{spec}: {kind}, neither a run folder (with pipeline/) nor a pipeline folder (model_index.json)")


def evaluate_settings(run_dir: Path | None, args: argparse.Namespace):
    """The run's settings.toml (if any) < ``--set`` < ``--num-images``/``--device``; a refusal names
    where the value came from (the option, or the settings file)."""
    from fl_app.settings import Settings

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
    pairs = parse_pairs(args.set, "--set")
    values.update(pairs)
    origin.update({key: f"--set {key}" for key in pairs})
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


def _family(pipeline_dir: Path, settings):
    """The saved pipeline's model family: an ``AmbientPipeline`` samples through its masks (the
    run's ``ambient-p`` and ``ambient-delta``, or without them the survival the folder saved),
    any other pipeline as the pixel DDPM."""
    from ddpm.ambient import AmbientFamily
    from ddpm.family import PIXEL_DDPM
    from fl_app.model import model_family

    index = _json_object(pipeline_dir / "model_index.json")
    if index.get("_class_name") != "AmbientPipeline":
        return PIXEL_DDPM
    if settings.ambient:
        return model_family(settings)
    survival = index.get("survival")
    if not isinstance(survival, float | int) or not 0 < survival <= 1:
        raise InputError(f"{pipeline_dir / 'model_index.json'}: survival must be a number in (0, 1], got {survival!r}")
    return AmbientFamily(p=1 - survival, delta=0.0)  # sampling reads only (1 - p)(1 - delta)


def _load_unet(pipeline_dir: Path, inputs_per_output: int = 1):
    """The pipeline's UNet2DModel (safetensors only: no pickle), or an InputError naming the file;
    ``inputs_per_output`` 2 for Ambient's network (the image and its mask)."""
    from diffusers.utils import logging as diffusers_logging

    from ddpm.unet import unet_class

    _json_object(pipeline_dir / "model_index.json")
    unet_dir = pipeline_dir / "unet"
    if not (unet_dir / "config.json").is_file():
        raise InputError(f"{pipeline_dir}: no unet/config.json; not a DDPMPipeline folder")
    try:
        kind = unet_class(_json_object(unet_dir / "config.json"))
    except ValueError as err:
        raise InputError(f"{unet_dir / 'config.json'}: {err}") from None
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its messages would break the one-line error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = kind.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:  # missing, corrupt or mis-shaped
        pickled = " (.bin weights are pickles and are not read: save the model in safetensors)"
        hint = pickled if (unet_dir / "diffusion_pytorch_model.bin").exists() else ""
        raise InputError(f"{unet_dir}: cannot load the UNet ({_reason(err)[:300]}){hint}") from None
    finally:
        diffusers_logging.set_verbosity(level)
    cfg = unet.config
    if cfg.in_channels != inputs_per_output * cfg.out_channels or not isinstance(cfg.sample_size, int):
        raise InputError(
            f"{unet_dir}: not a pixel-space denoiser (in_channels {cfg.in_channels}, out_channels "
            f"{cfg.out_channels}, sample_size {cfg.sample_size})"
        )
    return unet


def _as_text_base(settings, pipeline_dir: Path, origin: dict[str, str], refused):
    """A ``StableDiffusionPipeline`` folder evaluates as the text-conditional family's base:
    ``init-from`` is the folder itself (its UNet, adapters merged by the export, and its frozen
    VAE, text encoder, tokenizer and scheduler), ``adapter`` none, and ``image-size`` the
    pipeline's own (its UNet's sample_size times the VAE's factor) unless given. Other
    pipelines: ``settings`` unchanged."""
    from ddpm.text_latent import is_text_pipeline, latent_factors, text_pipeline_configs

    if not is_text_pipeline(str(pipeline_dir)):
        return settings
    changes: dict[str, Any] = {"init_from": str(pipeline_dir), "adapter": "none"}
    if "image-size" not in origin:
        try:
            configs = text_pipeline_configs(str(pipeline_dir))
        except ValueError as err:
            raise InputError(str(err).replace("init-from:", f"{pipeline_dir}:", 1)) from None
        size = configs["unet"].get("sample_size")
        if isinstance(size, int):
            changes["image_size"] = size * latent_factors(configs)[0]
    try:
        return settings.replace(**changes)
    except ValueError as err:
        raise refused(err) from None


def _saved_model(pipeline_dir: Path, settings, data, device):
    """(family, model, scorers) of the saved pipeline: the text-conditional family with its UNet
    and its Sim Score and CLIP scorers, or a pixel family with its UNet2DModel (checked against the data set)."""
    if settings.text_conditional:
        from evaluation.text_metrics import text_scorers
        from fl_app.model import initial_model, model_family

        try:
            family, model = model_family(settings, data), initial_model(settings, data.channels)
        except ValueError as err:
            raise InputError(str(err).replace("init-from:", f"{pipeline_dir}:", 1)) from None
        return family, model, text_scorers(eval_config(settings), device)
    family = _family(pipeline_dir, settings)
    unet = _load_unet(pipeline_dir, 2 if family.name == "ambient" else 1)
    cfg = unet.config
    if (cfg.out_channels, cfg.sample_size) != (data.channels, data.image_size):
        raise InputError(
            f"{pipeline_dir}: the model makes {cfg.out_channels}x{cfg.sample_size}x{cfg.sample_size} images, the "
            f"data set {data.channels}x{data.image_size}x{data.image_size}; set dataset/image-size with --set"
        )
    return family, unet, []


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``iet-agc evaluate``: sample a saved model with DDIM, write the evaluation, print its metrics."""
    from evaluation.evaluator import MemorizationEvaluator, evaluate_saved

    try:  # every input is checked before sampling starts
        run_dir, pipeline_dir = _locate(args.source)
        settings, origin, refused = evaluate_settings(run_dir, args)
        settings = _as_text_base(settings, pipeline_dir, origin, refused)
        where = origin.get("device", "the default")
        device = usable_device(settings.device, where if where.startswith("--") else f"device (from {where})")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_spec = args.out or str((run_dir or pipeline_dir.parent) / f"evaluate-{stamp}")
        out = check_output("--out", out_spec, folder=True)
        try:  # this machine's files: data-root, holdout-root, captions, fid-weights, sscd-weights, the base
            here = {"out_dir": str(out), "resume": ""} | ({} if settings.fid else {"fid_weights": ""})
            settings.replace(**here).check_environment()
        except ValueError as err:
            raise refused(err) from None
        data, notes = _load_data(settings)
        if len(data) < settings.mq_neighbours:
            raise InputError(f"mq-neighbours: {settings.mq_neighbours} exceeds the {len(data)} training images")
        family, model, scorers = _saved_model(pipeline_dir, settings, data, device)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"--out: cannot make {out_spec}: {_reason(err)}") from None
    except InputError as err:
        return fail("evaluate", err)
    for note in notes:
        warnings.showwarning(note.message, note.category, note.filename, note.lineno)
    evaluator = MemorizationEvaluator(eval_config(settings), data, out, device, family, scorers)
    summary = evaluate_saved(evaluator, model, f"{pipeline_dir} ({settings.eval_num_images} images)")
    print(json.dumps(summary), flush=True)  # stdout: this JSON line only
    return 0


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
        "folder (weights in safetensors) or a StableDiffusionPipeline folder (prompts from the data's captions; "
        "Sim Score with sscd-weights, CLIP score with clip-model). Writes eval_final.md, pictures and "
        "metrics.json; prints one JSON line. "
        "A bad input exits 2 with one line naming it.",
    )
    ev.add_argument("source", metavar="RUN_DIR_OR_PIPELINE")
    ev.add_argument("--num-images", type=int, default=None, help="generated images (default: eval-num-images)")
    ev.add_argument("--device", default="", help=f"{DEVICES} (default: the run's setting)")
    ev.add_argument("--out", default="", help="output folder (default: <run>/evaluate-<time>)")
    ev.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override settings, e.g. 'dataset=cifar10 seed=1' (repeatable)",
    )
    ev.set_defaults(func=_with_bars(cmd_evaluate))
    one_line_errors(ev)
