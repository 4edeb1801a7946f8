"""Per-shard state <-> Flower records, so it can live in a node's ``context.state`` between rounds."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from .trainer import ShardState


def _keys(shard: int) -> tuple[str, str]:
    return f"shard-{shard}.arrays", f"shard-{shard}.meta"


def load_shard_state(state: RecordDict, shard: int) -> ShardState:
    """The shard's saved state on this node, or a fresh one (bank of zeros, no optimizer moments)."""
    akey, mkey = _keys(shard)
    if akey not in state:
        return ShardState()
    arrays = state[akey].to_torch_state_dict()
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in arrays.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = tensor
    return ShardState(optimizer=moments or None, step=int(state[mkey]["step"]), bank=arrays["bank"])


def save_shard_state(state: RecordDict, shard: int, shard_state: ShardState) -> None:
    """Store the shard's optimizer moments, warm-up position and memory bank in ``state``."""
    akey, mkey = _keys(shard)
    tensors = {"bank": shard_state.bank.detach().cpu()}
    for index, entry in (shard_state.optimizer or {}).items():
        for name, value in entry.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    state[akey] = ArrayRecord(tensors)
    state[mkey] = ConfigRecord({"step": shard_state.step})
