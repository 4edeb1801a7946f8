"""Per-shard state on a node's disk, so it survives a crash of the node or of the whole run.

``STATE_DIR/<run key>/shard-<s>/round-<r>.safetensors`` holds the Adam moments, the warm-up
position and the AGC memory bank after round r. A round loads the newest file of an earlier
round: a round redone after a crash starts from the same state as the first time. Files are
written to a temporary name and renamed, and only the last two per shard are kept.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ddpm.files import atomic_write

from .config import ACCOUNTANTS
from .trainer import ShardState

ROUND_FILE = re.compile(r"round-(\d+)\.safetensors$")


def default_state_dir() -> Path:
    """``$XDG_CACHE_HOME/iet-agc/state`` (``~/.cache/iet-agc/state``): node-local, shared in simulation."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iet-agc" / "state"


def state_problem(state: ShardState, params: Sequence[torch.Tensor]) -> str | None:
    """Why a loaded state cannot continue training ``params`` (the model's trainable tensors, in
    the optimizer's order), or None: a bank of another length, moments of another shape, a
    non-finite value or a negative step would fail (or poison) the shard in every later round."""
    bank = ShardState().bank
    if tuple(state.bank.shape) != tuple(bank.shape) or not torch.isfinite(state.bank).all():
        shape = tuple(state.bank.shape)
        return f"its AGC memory bank has shape {shape} or non-finite values (want {tuple(bank.shape)})"
    if state.step < 0:
        return f"its step is {state.step}"
    for index, entry in (state.optimizer or {}).items():
        if not 0 <= index < len(params):
            return f"it holds optimizer moments of tensor {index}, but the model trains {len(params)}"
        for name, value in entry.items():
            if name == "step":
                continue
            if tuple(value.shape) != tuple(params[index].shape) or not torch.isfinite(value).all():
                return (
                    f"its {name} of tensor {index} has shape {tuple(value.shape)} or non-finite values "
                    f"(the model's tensor is {tuple(params[index].shape)})"
                )
    return None


class ShardStateStore:
    """Saved shard states under one node-local directory, keyed by run and shard.

    ``set_aside`` lists the files ``load`` renamed to ``*.bad`` this time, with the reason."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_state_dir()
        self.set_aside: list[tuple[Path, str]] = []

    def check_writable(self) -> None:
        """Refuse (``state-dir: ...``) a state folder that cannot be made or written, before the
        round trains rather than after it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as err:
            raise ValueError(f"state-dir: cannot write shard states to {str(self.root)!r} ({err})") from None

    def _dir(self, run_key: str, shard: int) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_key):
            raise ValueError(f"run key {run_key!r} is not a plain file name")
        return self.root / run_key / f"shard-{shard}"

    def _rounds(self, folder: Path) -> dict[int, Path]:
        if not folder.is_dir():
            return {}
        return {int(m.group(1)): p for p in folder.iterdir() if (m := ROUND_FILE.fullmatch(p.name))}

    def load(
        self, run_key: str, shard: int, before_round: int, params: Sequence[torch.Tensor] | None = None
    ) -> tuple[ShardState, int | None]:
        """The state after the shard's last round before ``before_round`` and that round's number,
        or a fresh state and None where this node holds none (the shard restarts its local state).
        With ``params``, a state that cannot train them (``state_problem``) is renamed ``*.bad``
        (kept for a look, never read again) and the next older one is tried."""
        rounds = {r: p for r, p in self._rounds(self._dir(run_key, shard)).items() if r < before_round}
        for r in sorted(rounds, reverse=True):
            try:
                tensors = load_file(rounds[r])
                with safe_open(rounds[r], framework="pt") as fh:  # the step is in the header
                    meta = fh.metadata()
                step = int(meta["step"])
            except (OSError, SafetensorError, KeyError, ValueError, AttributeError):
                continue  # unreadable (a crash while writing cannot cause it; a disk fault can): older one
            moments: dict[int, dict[str, torch.Tensor]] = {}
            for key, tensor in tensors.items():
                if key.startswith("opt."):
                    _, index, name = key.split(".", 2)
                    moments.setdefault(int(index), {})[name] = tensor
            try:  # a DP shard's accounting must not silently fall back to an older, smaller history
                accountant = load_accountant(meta.get("accountant", ""))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"dp-sgd: shard state {rounds[r]}: {err}") from None
            state = ShardState(optimizer=moments or None, step=step, bank=tensors["bank"], accountant=accountant)
            problem = None if params is None else state_problem(state, params)
            if problem is None:
                return state, r
            bad = rounds[r].with_name(rounds[r].name + ".bad")
            os.replace(rounds[r], bad)
            self.set_aside.append((bad, problem))
        return ShardState(), None

    def save(self, run_key: str, shard: int, server_round: int, state: ShardState) -> Path:
        """Write the shard's state after ``server_round``; keep it and the newest earlier one."""
        folder = self._dir(run_key, shard)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"bank": state.bank.detach().cpu().contiguous()}
        for index, entry in (state.optimizer or {}).items():
            for name, value in entry.items():
                tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        target = folder / f"round-{server_round:06d}.safetensors"
        meta = {"step": str(state.step), "round": str(server_round), "accountant": dump_accountant(state.accountant)}
        atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=meta))
        earlier = sorted(r for r in self._rounds(folder) if r < server_round)
        for r in earlier[:-1]:
            (folder / f"round-{r:06d}.safetensors").unlink(missing_ok=True)
        return target


def dump_accountant(state: dict | None) -> str:
    """Opacus' accountant ``state_dict`` (mechanism, history of (sigma, sample rate, steps)) as
    JSON for the state file's header; '' for none."""
    if state is None:
        return ""
    return json.dumps({"mechanism": state["mechanism"], "history": [list(h) for h in state["history"]]})


def load_accountant(text: str) -> dict | None:
    """The accountant state ``dump_accountant`` wrote, checked (a ValueError otherwise); None for ''."""
    if not text:
        return None
    state = json.loads(text)
    history = state["history"]
    ok = isinstance(history, list) and all(
        isinstance(h, list) and len(h) == 3 and h[0] >= 0 and 0 < h[1] <= 1 and int(h[2]) == h[2] >= 0 for h in history
    )
    if state.get("mechanism") not in ACCOUNTANTS or not ok:
        raise ValueError(f"not an accountant state: {text[:200]!r}")
    return {"mechanism": state["mechanism"], "history": [(float(s), float(q), int(k)) for s, q, k in history]}
