"""One typed, validated settings object for a run, read from Flower's flat ``run_config``.

Keys are the kebab-case names users write in ``pyproject.toml`` or a ``--run-config`` preset;
attributes are their snake-case twins. Each field declares its type and allowed range beside it
(a ``Rule`` in the field's metadata); ``Settings.allowed()`` lists them, the README's settings
table shows them. Two levels of checking, both raising ``ValueError('<key>: ...')``:

- pure checks (types, ranges, choices, and the rules between settings that need no file system):
  on every construction, so on the server, on every node and in every tool;
- ``check_environment()``: what depends on the machine the run starts on (paths that must exist,
  the number of images in an image folder, a writable ``out-dir``): only where the run is started
  (``config.settings_from_run_config``, used by ``iet-agc run`` and the ServerApp), never on
  a node, which may lack the server's folders.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from clients.config import ACCOUNTANTS, OPTIMIZERS, PrivacyConfig
from clients.taa import TAA_INTERPOLATIONS
from ddpm.adapters import ADAPTERS, LORA_TARGETS, AdapterSpec
from ddpm.base import base_config, check_base_classes, is_hub_id
from ddpm.captions import METADATA
from ddpm.class_embedding import CLASS_EMBEDDINGS
from ddpm.data import (
    DATA_SPLITS,
    DATASETS,
    DIGITS_IMAGES,
    IMAGE_SUFFIXES,
    folder_captions,
    num_channels,
    num_train_images,
)
from ddpm.data import num_classes as dataset_classes
from ddpm.device import DEVICE_PATTERN, DEVICES
from ddpm.initialisation import MODEL_INITS
from ddpm.precision import LAYOUTS, PRECISIONS
from ddpm.schedule import NUM_TRAIN_TIMESTEPS
from ddpm.text_latent import is_text_pipeline, latent_factors, text_pipeline_configs
from ddpm.unet import _SIZES, MODEL_SIZES
from evaluation.config import CLIP_MODEL
from strategies.aggregation import AGGREGATIONS
from strategies.msr import MSR_MODES

SKIP_COUNT_MODES = ("reset", "cumulative")
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")  # fl_app/trackers.py logs a run to one of them
# A tracker's names: a W&B project (at most 128 characters, none of /\#?%:), an MLflow experiment,
# a TensorBoard sub-folder (no path separator, never "." or "..").
TRACKER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+=,@ -]{0,127}"
TRACKER_TAG = r"[A-Za-z0-9_.-]{1,64}=[^;\x00-\x1f]{0,500}"

# Upper bounds where a larger value would only hang the run or exhaust memory.
MAX_SEED = 2**31 - 1  # torch and numpy seeds
MAX_ROUNDS = 10_000
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000  # optimizer steps (local-steps, warmup-steps)
MAX_BATCH = 65_536
MAX_SHARDS = 1_000  # each shard keeps its own optimizer state on the nodes
MAX_NODES = 1_000
MAX_TRAIN_SIZE = 100_000_000
MAX_EVAL_IMAGES = 1_000_000  # the paper evaluates 65,536
MAX_NEIGHBOURS = 1_000  # the paper's n is 50
MAX_TIMEOUT = 7 * 24 * 3600.0  # one week, in seconds
MAX_IMAGE_SIZE = 1024
MAX_UPDATE_RATIO = 10.0  # the largest ratio measured in normal rounds was far below (docs/results.md)
RANDAUGMENT_MAX_MAGNITUDE = 30  # torchvision's RandAugment: 31 magnitude bins, 0..30
RANDAUGMENT_NUM_OPS = 14  # torchvision's RandAugment operation space


@dataclass(frozen=True)
class Rule:
    """The allowed values of one setting: its type, and for numbers a closed or open interval."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False  # high itself excluded
    inf: bool = False  # floats: +inf allowed as well (never -inf or NaN)
    power_of_two: bool = False
    choices: tuple[str, ...] = ()
    pattern: str = ""  # strings: must match in full
    nonempty: bool = False
    path: bool = False  # strings: a file system path (no NUL character)
    auto: bool = False  # integers: the word "auto" is taken as 0 (the value picked at run time)
    text: str = ""  # replaces the generated description

    @property
    def allowed(self) -> str:
        """What the setting accepts, in words: the tail of ``'<key>: must be ...'``."""
        if self.text:
            return self.text
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is str:
            return "a non-empty path" if self.nonempty else ("a path (may be empty)" if self.path else "a string")
        lo = "" if self.low is None else f"{'(' if self.low_open else '['}{_num(self.low)}"
        hi = "" if self.high is None else f"{_num(self.high)}{')' if self.high_open else ']'}"
        if lo and hi:
            span = f"in {lo}, {hi}"
        elif lo:
            span = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            span = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        if self.kind is int:
            return ("a power of two " if self.power_of_two else "an integer ") + span
        return f"a number {span}, or inf" if self.inf else f"a finite number {span}"

    def fail(self, key: str, value: Any, note: str = "") -> ValueError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown)} characters)"
        return ValueError(f"{key}: must be {self.allowed}{note}, got {shown}")

    def coerce(self, key: str, raw: Any) -> Any:
        """The value as ``kind``: TOML's types plus what a message or the CLI may carry as text."""
        if self.kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
                return raw.strip().lower() == "true"
        elif self.kind is int:
            if self.auto and isinstance(raw, str) and raw.strip().lower() == "auto":
                return 0
            if isinstance(raw, int) and not isinstance(raw, bool):
                return raw
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
        elif self.kind is float:
            try:
                if isinstance(raw, int | float) and not isinstance(raw, bool):
                    return float(raw)
                if isinstance(raw, str):
                    return float(raw)
            except (ValueError, OverflowError):
                pass
        elif isinstance(raw, str):
            return raw
        raise self.fail(key, raw)

    def check(self, key: str, value: Any) -> None:
        """Raise ``ValueError('<key>: must be ..., got ...')`` when ``value`` is outside the rule."""
        if self.kind is float and not math.isfinite(value):
            if self.inf and value == math.inf:
                return
            raise self.fail(key, value)
        if self.auto and value == 0:
            return
        if self.kind in (int, float):
            low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if low_bad or high_bad or (self.power_of_two and value & (value - 1)):
                raise self.fail(key, value)
        elif self.kind is str:
            if self.choices and value not in self.choices:
                raise self.fail(key, value)
            if self.pattern and not re.fullmatch(self.pattern, value):
                raise self.fail(key, value)
            if self.nonempty and not value.strip():
                raise self.fail(key, value)
            if self.path and "\0" in value:
                raise self.fail(key, value, " (no NUL character)")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _setting(default: Any, kind: type, **rule: Any) -> Any:
    return field(default=default, metadata={"rule": Rule(kind, **rule)})


def _int(default: int, low: int, high: int, **rule: Any) -> Any:
    return _setting(default, int, low=low, high=high, **rule)


def _float(default: float, **rule: Any) -> Any:
    return _setting(default, float, **rule)


def _bool(default: bool) -> Any:
    return _setting(default, bool)


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return _setting(default, str, choices=choices)


def _path(default: str, **rule: Any) -> Any:
    return _setting(default, str, path=True, **rule)


def parse_thresholds(text: str, key: str) -> tuple[float, ...]:
    """'0.4,0.5,0.6' -> (0.4, 0.5, 0.6): MQ's delta values, each in (0, 1], none repeated (to 6
    significant digits, which name the results columns); a ValueError naming ``key`` otherwise."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{key}: must be comma-separated numbers, each in (0, 1], got {text!r}") from None
    if any(not 0 < v <= 1 for v in values):  # NaN fails both comparisons
        raise ValueError(f"{key}: must be comma-separated numbers, each in (0, 1], got {text!r}")
    if len({f"{v:g}" for v in values}) != len(values):  # one results column per threshold
        raise ValueError(f"{key}: a threshold is repeated (to 6 significant digits, the column names), got {text!r}")
    return values


@dataclass(frozen=True)
class Settings:
    """Every run setting, with the CPU default preset's values as defaults.

    Constructing one (keyword arguments, ``from_run_config``, ``replace``) coerces each value to
    its field's type and runs the pure checks; ``Settings.allowed()`` maps each key to its range.
    Rules between settings: ``image-size`` >= the model's smallest size (tiny 4, cifar 8, afhq64
    16); ``train-size`` in [2, 1796] for digits, [0, 50000] for CIFAR (0 = all), and for an image
    folder at most its number of images; ``num-shards`` and ``mq-neighbours`` <= the training
    images used; ``holdout-size``, ``data-seed`` and ``data-split = "spare"`` are for digits only,
    ``train-size + holdout-size <= 1797`` and ``spare`` needs digits left over (the spare count then
    bounds ``num-shards`` and ``mq-neighbours``);
    ``data-root`` required for ``imagefolder``; ``class-conditional`` needs a labelled data set
    (not ``imagefolder``); ``class-embedding = "per-block"`` needs ``class-conditional``, and
    neither it nor ``model-init = "authors"`` goes with ``init-from``; ``adapter`` lora or difffit needs
    ``init-from``; ``ambient`` refuses ``taa``, ``init-from``, ``class-conditional`` and ``dp-sgd``;
    ``captions`` is for ``imagefolder`` only.
    With ``init-from``, ``model`` is unused (the base's architecture) and the
    environment check requires ``image-size``, the data set's channels and (``class-conditional``)
    its classes to be the base's; a ``StableDiffusionPipeline`` base (``text_conditional``) needs a
    captioned image folder, an ``image-size`` its VAE and UNet divide, and refuses
    ``class-conditional`` and ``dp-sgd`` (``_check_text_base``).
    """

    # data and model
    dataset: str = _choice("digits", DATASETS)
    data_root: str = _path("")
    holdout_root: str = _path("")
    captions: str = _path(
        "", text=f"a path (may be empty: data-root's {METADATA}); imagefolder only; an existing captions JSON when set"
    )
    download: bool = _bool(True)
    image_size: int = _int(8, 4, MAX_IMAGE_SIZE, power_of_two=True)
    train_size: int = _int(400, 0, MAX_TRAIN_SIZE)
    holdout_size: int = _int(0, 0, MAX_TRAIN_SIZE)
    data_seed: int = _int(-1, -1, MAX_SEED, text=f"-1 (the run's seed) or an integer in [0, {MAX_SEED}]")
    data_split: str = _choice("train", DATA_SPLITS)
    model: str = _choice("tiny", MODEL_SIZES)
    hflip: bool = _bool(False)
    class_conditional: bool = _bool(False)
    class_embedding: str = _choice("added", CLASS_EMBEDDINGS)
    model_init: str = _choice("diffusers", MODEL_INITS)
    # fine-tuning a pretrained base (architecture from the checkpoint; ``model`` is then unused)
    init_from: str = _path(
        "",
        text="a DDPMPipeline or StableDiffusionPipeline folder, a Hub id (owner/name), or empty (train from scratch)",
    )
    adapter: str = _choice("none", ADAPTERS)
    lora_rank: int = _int(8, 1, 1024)
    lora_alpha: float = _float(8.0, low=0, low_open=True)
    lora_targets: str = _choice("attention", tuple(LORA_TARGETS))
    lora_freeze_a: bool = _bool(False)
    save_adapter: bool = _bool(True)
    # the text-conditional family (init-from a StableDiffusionPipeline): classifier-free guidance at sampling
    guidance_scale: float = _float(7.5, low=1)
    # federation (IET)
    num_shards: int = _int(4, 1, MAX_SHARDS)
    num_rounds: int = _int(20, 1, MAX_ROUNDS)
    local_epochs: int = _int(10, 1, MAX_EPOCHS)
    batch_size: int = _int(32, 1, MAX_BATCH)
    lr: float = _float(1e-3, low=0, high=1, low_open=True)
    warmup_epochs: int = _int(5, 0, MAX_EPOCHS)
    # steps instead of epochs (the authors' Stable Diffusion run: 2,000 a round, 5,000 of warm-up)
    local_steps: int = _int(0, 0, MAX_STEPS, text=f"0 (local-epochs decides) or an integer in [1, {MAX_STEPS}]")
    warmup_steps: int = _int(-1, -1, MAX_STEPS, text=f"-1 (warmup-epochs decides) or an integer in [0, {MAX_STEPS}]")
    optimizer: str = _choice("adam", OPTIMIZERS)
    weight_decay: float = _float(0.0, low=0, high=1)
    seed: int = _int(0, 0, MAX_SEED)
    grad_clip: float = _float(1.0, low=0, low_open=True)
    round_timeout: float = _float(3600.0, low=0, high=MAX_TIMEOUT, low_open=True)
    min_nodes: int = _int(1, 1, MAX_NODES)
    max_failed_rounds: int = _int(3, 1, MAX_ROUNDS)
    node_max_failures: int = _int(2, 1, MAX_ROUNDS)
    # a reply whose update norm is this many times the other replies' median is dropped (inf: off)
    max_update_ratio: float = _float(MAX_UPDATE_RATIO, low=1, low_open=True, inf=True)
    messages_per_node: int = _int(2, 1, MAX_SHARDS)
    # how many of a node's shards one message carries (0: all of them; 1: a message per shard)
    shards_per_message: int = _int(
        1, 0, MAX_SHARDS, text=f"0 (all of a node's shards) or an integer in [1, {MAX_SHARDS}]"
    )
    device: str = _setting("auto", str, pattern=DEVICE_PATTERN, text=f"one of {DEVICES} (N in 0..999)")
    # how the network computes (ddpm/precision.py): autocast, NHWC weights, a compiled forward
    precision: str = _choice("auto", PRECISIONS)
    channels_last: str = _choice("auto", LAYOUTS)
    compile: bool = _bool(False)
    # AGC (eq. 3-4), TAA (eq. 5-8), MSR (eq. 10-11)
    agc: bool = _bool(True)
    skip_threshold: float = _float(0.5, low=0, high=10, low_open=True)
    bank_eta: float = _float(0.8, low=0, high=1, low_open=True, high_open=True)
    taa: bool = _bool(True)
    aug_range: float = _float(1.7, low=1, low_open=True, inf=True)
    aug_sharpness: float = _float(5.0, low=0, low_open=True)
    randaugment_magnitude: int = _int(3, 0, RANDAUGMENT_MAX_MAGNITUDE)
    randaugment_ops: int = _int(2, 1, RANDAUGMENT_NUM_OPS)
    taa_interpolation: str = _choice("bilinear", TAA_INTERPOLATIONS)
    # baselines (the paper's Table I): noise added to the training images
    input_noise_variance: float = _float(0.0, low=0, high=10)
    input_noise_fixed: bool = _bool(False)
    # baselines: DP-SGD through Opacus (Poisson sampling, per-sample clipping, its accountant)
    dp_sgd: bool = _bool(False)
    dp_noise_multiplier: float = _float(
        0.0, low=0, high=1000, text="0 (from dp-target-epsilon) or a number in (0, 1000]"
    )
    dp_target_epsilon: float = _float(
        0.0, low=0, high=1e6, text="0 (dp-noise-multiplier given) or a number in (0, 1e6]"
    )
    dp_delta: float = _float(1e-5, low=0, high=1, low_open=True, high_open=True)
    dp_max_grad_norm: float = _float(1.0, low=0, high=1e6, low_open=True)
    dp_accountant: str = _choice("prv", ACCOUNTANTS)
    dp_max_physical_batch: int = _int(0, 0, MAX_BATCH, text=f"0 (no split) or an integer in [1, {MAX_BATCH}]")
    # baselines: Ambient Diffusion (Daras et al.), training on masked images
    ambient: bool = _bool(False)
    ambient_p: float = _float(0.4, low=0, high=1, high_open=True)
    ambient_delta: float = _float(0.1, low=0, high=1, high_open=True)
    ambient_max_snr: float = _float(math.inf, low=0, low_open=True, inf=True)
    msr: str = _choice("memory", MSR_MODES)
    msr_proportion: float = _float(0.25, low=0, high=1, high_open=True)
    skip_counts: str = _choice("reset", SKIP_COUNT_MODES)
    # aggregation of the shard models (IET's FedAvg by default; each is the Flower strategy of that name)
    aggregation: str = _choice("fedavg", AGGREGATIONS)
    fedprox_mu: float = _float(0.01, low=0, low_open=True)
    fedavgm_lr: float = _float(1.0, low=0, low_open=True)
    fedavgm_momentum: float = _float(0.9, low=0, high=1, high_open=True)
    fedadam_eta: float = _float(1e-3, low=0, low_open=True)
    fedadam_tau: float = _float(1e-3, low=0, low_open=True)
    fedtrimmedavg_beta: float = _float(0.25, low=0, high=0.5, high_open=True)
    # evaluation
    eval_every: int = _int(5, 0, MAX_ROUNDS)
    eval_num_images: int = _int(500, 1, MAX_EVAL_IMAGES)
    eval_batch_size: int = _int(
        0,
        1,
        MAX_BATCH,
        auto=True,
        text=f"auto (or 0: what fills the device, 256 off CUDA) or an integer in [1, {MAX_BATCH}]",
    )
    sample_steps: int = _int(50, 1, NUM_TRAIN_TIMESTEPS)
    mq_neighbours: int = _int(50, 1, MAX_NEIGHBOURS)
    mq_thresholds: str = _setting(
        "0.4,0.5,0.6", str, text="comma-separated distinct numbers, each in (0, 1] (e.g. 0.4,0.5,0.6)"
    )
    fid: bool = _bool(True)
    fid_weights: str = _path("")
    fid_cache_dir: str = _path("")
    # the text-conditional family's Table II metrics (evaluation/text_metrics.py)
    sscd_weights: str = _path(
        "", text="a path (may be empty: Sim Score unavailable); an existing file when set; text-conditional runs only"
    )
    clip_model: str = _path(
        CLIP_MODEL, text="a CLIP model folder (save_pretrained) or a Hub id (owner/name), or empty (no CLIP score)"
    )
    out_dir: str = _path("runs", nonempty=True)
    resume: str = _path("")
    # experiment tracking (the ServerApp logs the run to it; fl_app/trackers.py)
    tracker: str = _choice("none", TRACKERS)
    tracker_dir: str = _path("", text="a path (may be empty: tensorboard/, mlflow/ or wandb/ beside the run folder)")
    tracker_uri: str = _setting(
        "",
        str,
        pattern=r"|[A-Za-z][A-Za-z0-9+.-]*://\S{1,2000}|databricks",
        text="empty (offline: the local tracker-dir) or a URI scheme://... (MLflow server, W&B host)",
    )
    tracker_project: str = _setting(
        "iet-agc",
        str,
        pattern=TRACKER_NAME,
        text="1-128 letters, digits, spaces or _ . + = , @ -, beginning with a letter or digit",
    )
    tracker_run_name: str = _setting(
        "",
        str,
        pattern=f"|{TRACKER_NAME}",
        text="empty (the run folder's name) or as tracker-project",
    )
    tracker_group: str = _setting("", str, pattern=f"|{TRACKER_NAME}", text="empty or as tracker-project")
    tracker_tags: str = _setting(
        "",
        str,
        pattern=f"|{TRACKER_TAG}(;{TRACKER_TAG}){{0,31}}",
        text="empty or up to 32 key=value pairs separated by ; (key: 1-64 of A-Z a-z 0-9 _ . -)",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            key = f.name.replace("_", "-")
            object.__setattr__(self, f.name, f.metadata["rule"].coerce(key, getattr(self, f.name)))
        self.validate()

    # ---- reading -------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """The run-config keys, kebab-case."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def allowed(cls) -> dict[str, str]:
        """Each key's allowed values in words (the README's settings table shows the same)."""
        return {f.name.replace("_", "-"): f.metadata["rule"].allowed for f in fields(cls)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        """Build from a flat run_config, rejecting unknown keys and wrong types, then validate."""
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in known:
                raise ValueError(f"{key}: unknown setting; known settings: {', '.join(known)}")
            values[known[key]] = raw
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Flat kebab-case mapping (what travels in a ConfigRecord and lands in settings.toml)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # ---- derived -------------------------------------------------------------------
    def dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ddpm.data.load_dataset`` (the same on the server and every node)."""
        return dict(
            name=self.dataset,
            root=self.data_root,
            holdout_root=self.holdout_root,
            download=self.download,
            image_size=self.image_size,
            train_size=self.train_size,
            seed=self.split_seed,
            holdout_size=self.holdout_size,
            data_split=self.data_split,
            captions=self.captions,
        )

    @functools.cached_property
    def text_conditional(self) -> bool:
        """Whether ``init-from`` names a text-to-image ``StableDiffusionPipeline`` (its
        ``model_index.json``): the run is then of the text-conditional latent family (VAE and text
        encoder frozen, the UNet conditioned on each image's caption). Read from this machine's
        copy of the base, once per settings object (the only derived value that reads a file)."""
        return bool(self.init_from) and is_text_pipeline(self.init_from)

    @property
    def split_seed(self) -> int:
        """The seed of the digits split: ``data-seed``, or the run's ``seed`` when it is -1."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def adapter_spec(self) -> AdapterSpec:
        """The adapter to attach to the base (the same on the server and every node)."""
        return AdapterSpec(
            self.adapter, self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_freeze_a, self.seed
        )

    @property
    def num_classes(self) -> int | None:
        """Classes the UNet is conditioned on: the data set's with ``class-conditional``, else None."""
        return dataset_classes(self.dataset) if self.class_conditional else None

    @property
    def thresholds(self) -> tuple[float, ...]:
        return parse_thresholds(self.mq_thresholds, "mq-thresholds")

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        """The pure checks: each field's rule, then the rules between settings (no file system)."""
        for f in fields(self):
            f.metadata["rule"].check(f.name.replace("_", "-"), getattr(self, f.name))
        low = max(4, 2 ** (len(_SIZES[self.model]["down_block_types"]) - 1))
        if self.image_size < low:
            raise ValueError(
                f"image-size: must be a power of two in [{low}, {MAX_IMAGE_SIZE}] for model {self.model!r} "
                f"(it halves the image {low.bit_length() - 1} times), got {self.image_size}"
            )
        self._check_thresholds()
        if self.input_noise_fixed and self.input_noise_variance == 0:
            raise ValueError(
                "input-noise-fixed: draws the added noise once per image, but input-noise-variance is 0 (no "
                "noise); set input-noise-variance > 0 (the paper's adding-noise baseline: 0.1) or "
                "input-noise-fixed = false"
            )
        self._check_privacy()
        self._check_tracker()
        self._check_ambient()
        if self.adapter != "none" and not self.init_from:
            raise ValueError(
                f"adapter: {self.adapter!r} adapts a pretrained model and needs init-from (a DDPMPipeline "
                'folder or a Hub id); use adapter = "none" to train from scratch'
            )
        self._check_model_build()
        if self.class_conditional and dataset_classes(self.dataset) is None:
            text = " (a Stable Diffusion init-from conditions on captions, not labels)" if self.init_from else ""
            raise ValueError(
                f"class-conditional: dataset {self.dataset!r} has no labels to condition on{text}; set "
                "class-conditional = false, or use a labelled data set (digits, cifar10, cifar100)"
            )
        if self.captions and self.dataset != "imagefolder":
            raise ValueError(
                f'captions: image folders only; {self.dataset} has no captions, leave captions = "" '
                f"(got {self.captions!r})"
            )
        if self.dataset == "imagefolder" and not self.data_root:
            raise ValueError("data-root: required for dataset 'imagefolder' (a folder of images)")
        self._check_split()
        if self.dataset != "imagefolder":  # sizes known without reading the disk
            available = num_train_images(self.dataset)
            low_size = 2 if self.dataset == "digits" else 0
            if not low_size <= self.train_size <= available:
                what = "1797 images, at least 1 held out" if self.dataset == "digits" else "0 = all"
                raise ValueError(
                    f"train-size: must be an integer in [{low_size}, {available}] for {self.dataset} ({what}), "
                    f"got {self.train_size}"
                )
            if self.data_split == "spare":
                spare = DIGITS_IMAGES - self.train_size - self.holdout_size
                self._check_train_size_bounds(spare, "spare digits")
            else:
                self._check_train_size_bounds(self.train_size or available, "train-size")
        elif self.train_size:
            self._check_train_size_bounds(self.train_size, "train-size")

    def _check_privacy(self) -> None:
        """DP-SGD's settings, and what its accountant cannot cover (refused naming both keys)."""
        sigma, target = self.dp_noise_multiplier, self.dp_target_epsilon
        if not self.dp_sgd:  # the dp-* keys are unused, as fedprox-mu is without fedprox
            return
        if self.local_steps:
            raise ValueError(
                f"local-steps: dp-sgd's Poisson sampling and its accountant plan whole epochs (local-epochs); "
                f"set local-steps = 0 with dp-sgd = true (got local-steps = {self.local_steps})"
            )
        if (sigma > 0) == (target > 0):
            raise ValueError(
                "dp-noise-multiplier: with dp-sgd, set exactly one of dp-noise-multiplier and dp-target-epsilon "
                f"(> 0), got dp-noise-multiplier = {sigma:g} and dp-target-epsilon = {target:g}"
            )
        unsound = {
            "agc": (
                self.agc,
                "AGC reads each sample's loss to decide what trains, which the accountant does not cover",
            ),
            "taa": (self.taa, "TAA reads each sample's loss to choose what to augment, outside the accountant"),
            "msr": (
                self.msr != "none",
                "MSR moves samples between shards, so shards are no longer disjoint and parallel composition fails",
            ),
            "aggregation": (
                self.aggregation == "fedprox",
                "FedProx's proximal term is a gradient outside Opacus' per-sample clipping",
            ),
            "adapter": (self.adapter == "difffit", "DiffFit's scale parameters have no per-sample gradients in Opacus"),
            "precision": (
                self.precision in ("bf16", "fp16"),
                "Opacus' per-sample gradients under autocast are neither built nor tested here (auto picks fp32)",
            ),
            "channels-last": (self.channels_last == "true", "Opacus' per-sample convolution gradients assume NCHW"),
            "compile": (self.compile, "Opacus' per-sample gradient hooks do not go through a compiled forward"),
        }
        off = {
            "agc": "false",
            "taa": "false",
            "msr": '"none"',
            "aggregation": '"fedavg"',
            "adapter": '"none" or "lora"',
            "precision": '"auto" or "fp32"',
            "channels-last": '"auto" or "false"',
            "compile": "false",
        }
        for key, (bad, why) in unsound.items():
            if bad:
                raise ValueError(f"{key}: not with dp-sgd: {why}; set {key} = {off[key]} or dp-sgd = false")

    def _check_model_build(self) -> None:
        """``class-embedding`` and ``model-init`` build a fresh UNet: a conditional one, not a base."""
        if self.class_embedding != "added" and not self.class_conditional:
            raise ValueError(
                f"class-embedding: {self.class_embedding!r} conditions on a class, but class-conditional is "
                'false; set class-conditional = true, or class-embedding = "added" (the default)'
            )
        for key, value, default in (
            ("class-embedding", self.class_embedding, "added"),
            ("model-init", self.model_init, "diffusers"),
        ):
            if value != default and self.init_from:
                raise ValueError(
                    f"{key}: {value!r} builds a fresh UNet, but init-from loads a base (its architecture and "
                    f'weights come from the checkpoint); set {key} = "{default}", or init-from = "" to train '
                    "from scratch"
                )

    def _check_ambient(self) -> None:
        """Ambient Diffusion's unsound or unsupported combinations, refused naming both keys."""
        if not self.ambient:
            return
        refused = {  # key: (set, why it cannot go with ambient)
            "taa": (
                self.taa,
                "TAA's augmented copy is made from the clean image: its shear, rotate and translate would "
                "show the network pixels outside the image's mask A, which Ambient Diffusion must never see; "
                "set taa = false",
            ),
            "init-from": (
                bool(self.init_from),
                "a pretrained base (a DDPM, or a Stable Diffusion pipeline on latents) takes the image alone "
                "and predicts noise, Ambient's network takes 2C (image and mask) and predicts x0; train from "
                "scratch (init-from empty)",
            ),
            "class-conditional": (
                self.class_conditional,
                "the Ambient family's condition carries the masks, not class labels "
                "(not built yet); set class-conditional = false",
            ),
            "dp-sgd": (
                self.dp_sgd,
                "Table I measures each baseline alone, and DP-SGD over masked images (Opacus' per-sample "
                "gradients through the 2C network, the accountant over Ambient's fixed masks) is neither built "
                "nor tested here; set dp-sgd = false",
            ),
        }
        for key, (on, why) in refused.items():
            if on:
                raise ValueError(f"ambient: cannot be combined with {key}: {why}")

    def _check_split(self) -> None:
        """The digits split: held-out count, its seed, which part trains (other data sets: defaults only)."""
        if self.dataset != "digits":
            fixed = "holdout-root" if self.dataset == "imagefolder" else "its test split"
            if self.holdout_size:
                raise ValueError(
                    f"holdout-size: digits only; {self.dataset} holds out {fixed}, leave 0, got {self.holdout_size}"
                )
            if self.data_seed != -1:
                raise ValueError(
                    f"data-seed: digits only; the split of {self.dataset} is fixed (no seed), leave -1, "
                    f"got {self.data_seed}"
                )
            if self.data_split != "train":
                raise ValueError(
                    f"data-split: {self.data_split!r} is for digits only (the digits neither trained on nor "
                    f'held out); {self.dataset} trains on its training images, leave "train"'
                )
            return
        most = DIGITS_IMAGES - self.train_size
        if 2 <= self.train_size < DIGITS_IMAGES and self.holdout_size > most:
            raise ValueError(
                f"holdout-size: must be an integer in [0, {most}] for digits with train-size {self.train_size} "
                f"(1797 images; 0 = all the rest), got {self.holdout_size}"
            )
        if self.data_split == "spare" and (not self.holdout_size or self.holdout_size >= most):
            raise ValueError(
                f"data-split: 'spare' trains on the digits neither in train-size nor in holdout-size; "
                f"set holdout-size in [1, {most - 1}] so that some are left (train-size {self.train_size}, "
                f"holdout-size {self.holdout_size or '0 = all the rest'})"
            )

    def _check_train_size_bounds(self, size: int, source: str) -> None:
        """num-shards and mq-neighbours cannot exceed the number of training images used."""
        for key, value in (("num-shards", self.num_shards), ("mq-neighbours", self.mq_neighbours)):
            if value > size:
                raise ValueError(f"{key}: must be an integer in [1, {size}] ({source} = {size}), got {value}")

    def _check_tracker(self) -> None:
        """tracker-uri means a server: MLflow's or a W&B host (http/https); TensorBoard writes files only."""
        if not self.tracker_uri or self.tracker in ("none", "mlflow"):
            return
        if self.tracker == "tensorboard":
            raise ValueError(
                f"tracker-uri: tensorboard writes event files to tracker-dir and has no server; leave tracker-uri "
                f"empty, got {self.tracker_uri!r}"
            )
        if not self.tracker_uri.startswith(("http://", "https://")):
            raise ValueError(f"tracker-uri: wandb needs an http:// or https:// host, got {self.tracker_uri!r}")

    @property
    def tracker_tag_pairs(self) -> dict[str, str]:
        """``tracker-tags`` as a mapping: 'cell=agc;seed=0' -> {'cell': 'agc', 'seed': '0'}."""
        pairs = (p.partition("=") for p in self.tracker_tags.split(";") if p)
        return {k: v for k, _, v in pairs}

    def _check_thresholds(self) -> None:
        parse_thresholds(self.mq_thresholds, "mq-thresholds")

    def check_environment(self) -> None:
        """The checks that read the file system of the machine that starts the run (never a node's).

        Raises ``ValueError('<key>: ...')``: ``data-root``, ``holdout-root``, ``resume`` must be
        existing folders and ``fid-weights`` an existing file when set; an image folder must hold
        at least one image and at least ``train-size``, ``num-shards`` and ``mq-neighbours``
        images; ``out-dir`` (and ``fid-cache-dir`` when set) must be a folder that exists or can
        be made, and is writable; the ``init-from`` base must load (a folder, or a Hub id that can be
        downloaded) and agree with ``image-size`` and the data set's channels; ``tracker-dir``, when
        set with a tracker, must be writable (the tracker's library and server: ``config``).
        """
        if self.init_from:
            self._check_base()
        if self.data_root and self.dataset != "digits":
            _existing_dir("data-root", self.data_root)
        if self.dataset == "imagefolder":
            available = _count_images("data-root", self.data_root)
            if self.train_size > available:
                raise ValueError(
                    f"train-size: must be an integer in [0, {available}] (0 = all): data-root "
                    f"{self.data_root!r} holds {available} images, got {self.train_size}"
                )
            self._check_train_size_bounds(self.train_size or available, "training images")
        if self.holdout_root:
            _existing_dir("holdout-root", self.holdout_root)
            if self.dataset == "imagefolder":
                _count_images("holdout-root", self.holdout_root)
        self._check_captions()
        self._check_text_metrics()
        if self.fid_weights and not _probe("fid-weights", self.fid_weights, lambda p: p.expanduser().is_file()):
            raise ValueError(f"fid-weights: must be an existing file, got {self.fid_weights!r} (no such file)")
        if self.resume and not _probe("resume", self.resume, lambda p: p.expanduser().is_dir()):
            raise ValueError(f"resume: must be an existing run folder, got {self.resume!r} (no such directory)")
        if self.fid_cache_dir:
            _writable_dir("fid-cache-dir", self.fid_cache_dir)
        _writable_dir("out-dir", self.out_dir)
        if self.tracker != "none" and self.tracker_dir:
            _writable_dir("tracker-dir", self.tracker_dir)
        _check_compute(self.device, self.precision)
        if self.dp_sgd and self.dp_target_epsilon:  # no sigma reaches the target: stop before training
            self._check_privacy_budget()

    def _check_privacy_budget(self) -> None:
        """Every shard size's sigma for ``dp-target-epsilon`` exists (Opacus' search), or a ValueError."""
        from clients.dp_sgd import dp_planned_epsilon_check  # Opacus only where DP runs

        if self.dataset == "imagefolder":
            n = self.train_size or _count_images("data-root", self.data_root)
        elif self.data_split == "spare":
            n = DIGITS_IMAGES - self.train_size - self.holdout_size
        else:
            n = self.train_size or num_train_images(self.dataset)
        sizes = [n // self.num_shards, -(-n // self.num_shards)]
        dp_planned_epsilon_check(privacy_config(self), sizes, self.batch_size, self.local_epochs)

    def _check_captions(self) -> None:
        """``captions`` must be an existing file; a text-conditional run needs every training image
        captioned (read and matched to the images here, none decoded); a pixel run reads none."""
        if self.captions and not _probe("captions", self.captions, lambda p: p.expanduser().is_file()):
            raise ValueError(f"captions: must be an existing captions JSON file, got {self.captions!r} (no such file)")
        if not self.text_conditional:
            if self.captions:
                base = repr(self.init_from) if self.init_from else "empty (training from scratch)"
                raise ValueError(
                    "captions: only a text-conditional run (init-from a StableDiffusionPipeline) reads captions, "
                    f'and init-from is {base}; leave captions = "" (got {self.captions!r})'
                )
            return
        root = Path(self.data_root).expanduser()
        found = _probe("data-root", self.data_root, lambda p: folder_captions(root, self.captions))
        if found is None:
            raise ValueError(
                f"captions: the text-conditional family of init-from {self.init_from!r} trains on each image's "
                f"caption, but data-root {self.data_root!r} has no {METADATA} and captions is empty; add "
                f"{METADATA} (file_name, text) to data-root or set captions to a captions JSON"
            )

    def _check_text_metrics(self) -> None:
        """``sscd-weights``: an existing file, and only on a text-conditional run (Sim Score is that
        family's metric); ``clip-model`` on a text-conditional run: an existing folder or a Hub id
        (not refused elsewhere: its default is OpenAI's ViT-B/16, unused by other runs)."""
        if self.sscd_weights:
            if not self.text_conditional:
                base = repr(self.init_from) if self.init_from else "empty (training from scratch)"
                raise ValueError(
                    "sscd-weights: Sim Score is the text-conditional family's metric (init-from a "
                    f'StableDiffusionPipeline), and init-from is {base}; leave sscd-weights = "" '
                    f"(got {self.sscd_weights!r})"
                )
            if not _probe("sscd-weights", self.sscd_weights, lambda p: p.expanduser().is_file()):
                raise ValueError(
                    "sscd-weights: must be an existing file (SSCD's sscd_disc_large.torchscript.pt, "
                    f"CC-BY-NC: never bundled nor downloaded), got {self.sscd_weights!r} (no such file)"
                )
        clip = self.clip_model
        if self.text_conditional and clip and not is_hub_id(clip):
            if not _probe("clip-model", clip, lambda p: p.expanduser().is_dir()):
                raise ValueError(
                    f"clip-model: must be a CLIP model folder (save_pretrained) or a Hub id (owner/name), "
                    f"got {clip!r} (no such folder)"
                )

    def _check_text_base(self) -> None:
        """A Stable Diffusion base: every part there, the settings that cannot go with it refused
        naming both keys, ``image-size`` a multiple of what its VAE and UNet divide by."""
        configs = text_pipeline_configs(self.init_from)  # init-from: a missing part, named
        where = f"init-from {self.init_from!r} (a StableDiffusionPipeline: the text-conditional family)"
        if self.class_conditional:
            raise ValueError(
                f"class-conditional: {where} conditions on captions, not class labels; set class-conditional = false"
            )
        if self.dp_sgd:
            raise ValueError(
                f"dp-sgd: not with {where}: Opacus keeps one gradient per sample for every trainable tensor "
                "(batch 8 on SD 2.1's 865M-parameter UNet: 28 GB more), DP-SGD through the frozen VAE and text "
                "encoder is neither built nor tested here, and the paper's text-to-image baselines are "
                "Somepalli's and Wen's, not DP-SGD; set dp-sgd = false"
            )
        if self.dataset != "imagefolder":
            raise ValueError(
                f'dataset: {where} trains on captioned images: use dataset = "imagefolder" with a '
                f"{METADATA} in data-root or a captions JSON (got {self.dataset!r}, which has no captions)"
            )
        vae, unet = latent_factors(configs)
        if self.image_size % (vae * unet):
            raise ValueError(
                f"image-size: must be a multiple of {vae * unet} for {where}: its VAE divides the image by {vae} "
                f"and its UNet the latent by {unet}, got {self.image_size}"
            )
        channels = configs["vae"].get("in_channels", 3)
        if channels != num_channels(self.dataset):
            raise ValueError(
                f"init-from: the VAE of {self.init_from!r} takes {channels}-channel images, the data set gives "
                f"{num_channels(self.dataset)}"
            )

    def _check_base(self) -> None:
        """The base UNet's sample size and channels must be the run's (read from its config only)."""
        if self.text_conditional:
            self._check_text_base()
            return
        config = base_config(self.init_from)
        size, channels = config.get("sample_size"), config.get("in_channels")
        if isinstance(size, (list, tuple)):
            size = size[0] if len(set(size)) == 1 else size
        if size != self.image_size:
            raise ValueError(
                f"image-size: must be {size} to match the base model of init-from {self.init_from!r} "
                f"(its UNet's sample_size), got {self.image_size}"
            )
        want = num_channels(self.dataset)
        if channels != want or config.get("out_channels", channels) != want:
            raise ValueError(
                f"dataset: {self.dataset!r} has {want}-channel images, but the base model of init-from "
                f"{self.init_from!r} takes {channels} channels in and gives {config.get('out_channels')} out"
            )
        check_base_classes(config, self.num_classes, self.init_from)


def _check_compute(device: str, precision: str) -> None:
    """The server's ``device`` must exist here and compute its ``precision`` (``device: ...``,
    ``precision: ...``)."""
    from ddpm.device import usable_device
    from ddpm.precision import check_precision

    check_precision(precision, usable_device(device))


def _probe(key: str, value: str, test: Any) -> Any:
    """``test(Path(value))``, with file system errors (name too long, unknown ~user) naming the key."""
    try:
        return test(Path(value))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{key}: cannot use {value!r} ({err})") from None


def _existing_dir(key: str, value: str) -> None:
    """An existing folder (a leading ``~`` is expanded, as the data loaders do)."""
    if not _probe(key, value, lambda p: p.expanduser().is_dir()):
        raise ValueError(f"{key}: must be an existing directory, got {value!r} (no such directory)")


def _count_images(key: str, root: str) -> int:
    count = _probe(key, root, lambda p: num_train_images("imagefolder", str(p)))
    if not count:
        raise ValueError(f"{key}: must hold at least one image ({', '.join(IMAGE_SUFFIXES)}), found none in {root!r}")
    return count


def _writable_dir(key: str, value: str) -> None:
    """A folder that exists and is writable, or that can be made under a writable folder (made later)."""

    def nearest(path: Path) -> Path:
        path = path.expanduser()
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    existing = _probe(key, value, nearest)
    if not existing.is_dir():
        raise ValueError(f"{key}: must be a writable directory, got {value!r} ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: must be a writable directory, got {value!r} ({existing} is not writable)")


def privacy_config(settings: Settings) -> PrivacyConfig | None:
    """DP-SGD's config for the shards (None without ``dp-sgd``)."""
    if not settings.dp_sgd:
        return None
    return PrivacyConfig(
        noise_multiplier=settings.dp_noise_multiplier,
        target_epsilon=settings.dp_target_epsilon,
        delta=settings.dp_delta,
        max_grad_norm=settings.dp_max_grad_norm,
        accountant=settings.dp_accountant,
        max_physical_batch=settings.dp_max_physical_batch,
        rounds=settings.num_rounds,
    )
