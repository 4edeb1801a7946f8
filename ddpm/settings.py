"""One typed, validated settings object for a run, read from Flower's flat ``run_config``.

Keys are the kebab-case names users write in ``pyproject.toml`` or a ``--run-config`` preset;
attributes are their snake-case twins. Validation happens before any training and names the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .data import DATASETS
from .unet import MODEL_SIZES

MSR_MODES = ("memory", "random", "none")
SKIP_COUNT_MODES = ("reset", "cumulative")


@dataclass(frozen=True)
class Settings:
    """Every run setting, with the CPU default preset's values as defaults."""

    # data and model
    dataset: str = "digits"
    data_root: str = ""
    holdout_root: str = ""
    download: bool = True
    image_size: int = 8
    train_size: int = 400
    model: str = "tiny"
    hflip: bool = False
    # federation (IET)
    num_shards: int = 4
    num_rounds: int = 20
    local_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: int = 5
    grad_clip: float = 1.0
    round_timeout: float = 3600.0
    min_nodes: int = 1
    seed: int = 0
    device: str = "auto"
    # AGC (eq. 3-4), TAA (eq. 5-8), MSR (eq. 10-11)
    agc: bool = True
    skip_threshold: float = 0.5
    bank_eta: float = 0.8
    taa: bool = True
    aug_range: float = 1.7
    aug_sharpness: float = 5.0
    randaugment_magnitude: int = 3
    randaugment_ops: int = 2
    msr: str = "memory"
    msr_proportion: float = 0.25
    skip_counts: str = "reset"
    # evaluation
    eval_every: int = 5
    eval_num_images: int = 500
    eval_batch_size: int = 256
    sample_steps: int = 50
    mq_neighbours: int = 50
    mq_thresholds: str = "0.4,0.5,0.6"
    fid: bool = True
    fid_weights: str = ""
    fid_cache_dir: str = ""
    out_dir: str = "runs"

    # ---- reading -------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """The run-config keys, kebab-case."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        """Build from a flat run_config, rejecting unknown keys and wrong types, then validate."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in known:
                raise ValueError(f"{key}: unknown setting; known settings: {', '.join(known)}")
            values[known[key].name] = _coerce(key, raw, type(getattr(cls, known[key].name)))
        settings = cls(**values)
        settings.validate()
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """Flat kebab-case mapping (what travels in a ConfigRecord and lands in settings.toml)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

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
            seed=self.seed,
        )

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.mq_thresholds.split(","))

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError('<key>: ...')`` for the first setting outside its allowed range."""
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, MODEL_SIZES)
        _choice("msr", self.msr, MSR_MODES)
        _choice("skip-counts", self.skip_counts, SKIP_COUNT_MODES)
        _at_least("image-size", self.image_size, 4)
        _at_least("train-size", self.train_size, 0)
        _at_least("num-shards", self.num_shards, 1)
        _at_least("num-rounds", self.num_rounds, 1)
        _at_least("min-nodes", self.min_nodes, 1)
        _at_least("local-epochs", self.local_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        _at_least("warmup-epochs", self.warmup_epochs, 0)
        _at_least("eval-every", self.eval_every, 0)
        _at_least("eval-num-images", self.eval_num_images, 1)
        _at_least("eval-batch-size", self.eval_batch_size, 1)
        _at_least("sample-steps", self.sample_steps, 1)
        _at_least("mq-neighbours", self.mq_neighbours, 1)
        _at_least("randaugment-magnitude", self.randaugment_magnitude, 0)
        _at_least("randaugment-ops", self.randaugment_ops, 1)
        _positive("lr", self.lr)
        _positive("grad-clip", self.grad_clip)
        _positive("round-timeout", self.round_timeout)
        _positive("skip-threshold", self.skip_threshold)
        _positive("aug-sharpness", self.aug_sharpness)
        if not (self.aug_range > 1 or math.isinf(self.aug_range)):
            raise ValueError(f"aug-range: must be > 1 (or inf), got {self.aug_range}")
        if not 0 < self.bank_eta < 1:
            raise ValueError(f"bank-eta: must be in (0, 1), got {self.bank_eta}")
        if not 0 <= self.msr_proportion < 1:
            raise ValueError(f"msr-proportion: must be in [0, 1), got {self.msr_proportion}")
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"image-size: must be a power of two, got {self.image_size}")
        try:
            thresholds = self.thresholds
        except ValueError:
            raise ValueError(f"mq-thresholds: comma-separated numbers, got {self.mq_thresholds!r}") from None
        if not thresholds or any(not 0 < t <= 1 for t in thresholds):
            raise ValueError(f"mq-thresholds: each must be in (0, 1], got {self.mq_thresholds!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps", "xpu")):
            raise ValueError(f"device: 'auto', 'cpu', 'cuda[:N]', 'mps' or 'xpu', got {self.device!r}")
        if self.dataset == "digits" and self.train_size < 2:
            raise ValueError("train-size: digits needs a training subset size >= 2 (the rest is held out)")
        if self.dataset == "imagefolder" and not self.data_root:
            raise ValueError("data-root: required for dataset 'imagefolder' (a folder of images)")
        if self.data_root and self.dataset != "digits" and not Path(self.data_root).expanduser().is_dir():
            raise ValueError(f"data-root: directory {self.data_root!r} does not exist")
        if self.holdout_root and not Path(self.holdout_root).expanduser().is_dir():
            raise ValueError(f"holdout-root: directory {self.holdout_root!r} does not exist")
        if self.fid_weights and not Path(self.fid_weights).expanduser().is_file():
            raise ValueError(f"fid-weights: file {self.fid_weights!r} does not exist")
        limit = self.train_size if self.train_size else None
        if limit is not None and self.num_shards > limit:
            raise ValueError(f"num-shards: must be in [1, train-size={limit}], got {self.num_shards}")


def _coerce(key: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(raw, str):
            return raw
    raise ValueError(f"{key}: expected {kind.__name__}, got {raw!r}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{key}: must be an integer >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0 or math.isnan(value):
        raise ValueError(f"{key}: must be > 0, got {value}")
