"""The run's checkpoint: everything the server needs to continue after the last completed round.

``RUN_DIR/checkpoint/round-NNNNNN/`` holds the global weights (``weights.safetensors``: all of
them, or when fine-tuning with an adapter only the adapter's trainable tensors, the base being
reloaded from ``init-from`` and checked by its fingerprint), the
ledger's arrays (``ledger.safetensors``: shards and cumulative skip counts), a server optimizer's
state where the aggregation keeps one (``aggregator.safetensors``: FedAvgM, FedAdam) and ``state.json``
(the ledger's other values with MSR's RNG state, the rows written so far, the settings, the run
key). Nothing is unpickled. A checkpoint is written into a temporary folder and renamed into
place, so a crash leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

CHECKPOINT_DIR = "checkpoint"
AGGREGATOR_FILE = "aggregator.safetensors"
FORMAT = 1


class CheckpointError(ValueError):
    """A run folder without a usable checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    server_round: int
    weights: dict[str, np.ndarray]
    ledger_meta: dict
    ledger_arrays: dict[str, np.ndarray]
    rows: list[dict]
    settings: dict
    run_key: str
    fingerprint: str  # the training data set's, checked again on resume
    base_fingerprint: str = ""  # the initial model's when fine-tuning (init-from): weights hold only what trains
    aggregator: dict[str, np.ndarray] = field(default_factory=dict)  # a server optimizer's state (FedAvgM, FedAdam)


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically under ``run_dir``; older checkpoints are removed afterwards."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"round-{ckpt.server_round:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in ckpt.weights.items()}, tmp / "weights.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in ckpt.ledger_arrays.items()}, tmp / "ledger.safetensors")
    files = ["weights.safetensors", "ledger.safetensors", "state.json"]
    if ckpt.aggregator:
        save_file({k: np.ascontiguousarray(v) for k, v in ckpt.aggregator.items()}, tmp / AGGREGATOR_FILE)
        files.append(AGGREGATOR_FILE)
    state = {
        "format": FORMAT,
        "round": ckpt.server_round,
        "run-key": ckpt.run_key,
        "fingerprint": ckpt.fingerprint,
        "base-fingerprint": ckpt.base_fingerprint,
        "ledger": ckpt.ledger_meta,
        "rows": [{k: _json_safe(v) for k, v in row.items()} for row in ckpt.rows],
        "settings": ckpt.settings,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for name in files:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same round written again (a resumed run redid it)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in root.glob("round-*"):
        if old.name < final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint folder of a run, or CheckpointError naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run folder (no such directory)")
    found = sorted(p for p in (run_dir / CHECKPOINT_DIR).glob("round-*") if p.is_dir())
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoint ({CHECKPOINT_DIR}/round-*) in this run folder")
    return found[-1]


def _read_state(path: Path) -> dict:
    """``state.json`` of a checkpoint folder, checked for its format."""
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing state.json") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{path}/state.json: unreadable checkpoint (format {found!r}, expected {FORMAT})")
    return state


def checkpoint_settings(run_dir: Path) -> dict:
    """The settings of the run whose newest checkpoint is in ``run_dir`` (state.json only)."""
    path = latest_checkpoint(run_dir)
    try:
        return dict(_read_state(path)["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the newest checkpoint of ``run_dir``; a missing or corrupt file raises CheckpointError."""
    path = latest_checkpoint(run_dir)
    state = _read_state(path)
    for name in ("weights.safetensors", "ledger.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}")
    try:
        return Checkpoint(
            int(state["round"]),
            load_file(path / "weights.safetensors"),
            state["ledger"],
            load_file(path / "ledger.safetensors"),
            list(state["rows"]),
            dict(state["settings"]),
            str(state["run-key"]),
            str(state["fingerprint"]),
            str(state.get("base-fingerprint", "")),
            load_file(path / AGGREGATOR_FILE) if (path / AGGREGATOR_FILE).is_file() else {},
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
