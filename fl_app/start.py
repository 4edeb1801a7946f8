"""Where a run starts: a new run folder with fresh shards, or the last checkpoint of a run to resume."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from flwr.common.logger import log

from ddpm.adapters import load_trainable
from ddpm.data import ImageSet
from strategies.ledger import ShardLedger
from strategies.shards import make_shards

from .checkpoint import FORMAT, Checkpoint, legacy_warning, load_checkpoint
from .model import base_fingerprint as prove_base
from .model import initial_model
from .run_folder import RunWriter
from .settings import Settings


@dataclass
class Start:
    """The state a run begins its next round from."""

    model: UNet2DModel  # the global model (the base with its adapter when fine-tuning; SD: a UNet2DConditionModel)
    writer: RunWriter
    ledger: ShardLedger
    run_key: str  # names the shards' local state on the nodes
    base_fingerprint: str  # "" when training from scratch
    first_round: int
    aggregator_state: dict[str, np.ndarray] = field(default_factory=dict)


def start_point(settings: Settings, data: ImageSet, run_dir: Path) -> Start:
    """A new run (seeded model and shards) or, with ``resume``, the run's last checkpoint, checked
    against this server's data set and base."""
    torch.manual_seed(settings.seed)
    model = initial_model(settings, data.channels)
    base_fingerprint = prove_base(settings, model) if settings.init_from else ""
    if not settings.resume:
        labels = None if data.labels is None else data.labels.numpy()
        shards = make_shards(len(data), settings.num_shards, labels, settings.seed)
        ledger = ShardLedger(shards, len(data), settings.seed)
        return Start(model, RunWriter(run_dir, settings), ledger, uuid.uuid4().hex, base_fingerprint, 1)
    ckpt = _resume_point(settings, data.fingerprint, base_fingerprint)
    if ckpt.format < FORMAT:
        log(WARNING, "resume: %s", legacy_warning(run_dir, ckpt))
    load_trainable(model, {k: torch.from_numpy(v) for k, v in ckpt.weights.items()})
    return Start(
        model,
        RunWriter(run_dir, settings, rows=ckpt.rows, completed_round=ckpt.server_round, table_bytes=ckpt.tables),
        ShardLedger.from_state_dict(ckpt.ledger_meta, ckpt.ledger_arrays),
        ckpt.run_key,
        base_fingerprint,
        ckpt.server_round + 1,
        ckpt.aggregator,
    )


def _resume_point(settings: Settings, fingerprint: str, base_fingerprint: str) -> Checkpoint:
    ckpt = load_checkpoint(settings.resume)
    if ckpt.fingerprint != fingerprint:
        raise ValueError(f"resume: the run trained on data set {ckpt.fingerprint}; this server's copy is {fingerprint}")
    if ckpt.base_fingerprint != base_fingerprint:
        raise ValueError(
            f"init-from: the run fine-tuned the base {ckpt.base_fingerprint or '(none: from scratch)'}; "
            f"this server's is {base_fingerprint or '(none)'}"
        )
    if settings.num_rounds < ckpt.server_round:
        raise ValueError(f"num-rounds: the run already completed {ckpt.server_round} rounds, got {settings.num_rounds}")
    return ckpt
