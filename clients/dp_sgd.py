"""DP-SGD (Abadi et al., 2016) through Opacus: the shard's model, optimizer and batches made
private by Opacus' ``PrivacyEngine``, its accountant carried across rounds.

Poisson sampling (Opacus' ``DPDataLoader`` over the shard's positions, the accountant's
assumption), per-sample clipping to ``max_grad_norm`` and Gaussian noise of std
``noise_multiplier * max_grad_norm`` on the summed gradient are Opacus'; this module only wires
them to the trainer's step and keeps the accountant's history as plain values for the shard state.
An empty Poisson batch still takes a noisy step (as DP-SGD's analysis assumes): it runs one
zero-weight, data-independent image so that Opacus sees a batch (diffusers' attention cannot
reshape a batch of none).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import opacus
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from .config import PrivacyConfig
from .dp_sigmas import KNOWN_SIGMAS


def poisson_plan(n: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate, steps per round) of a shard of ``n`` images: Opacus' rate 1 / (batches per epoch)
    for batches of ``batch_size`` (at most ``n``), and that many expected batches per epoch."""
    if n < 1:
        raise ValueError(f"dp-sgd: a shard needs at least one image, got {n}")
    per_epoch = max(1, n // min(batch_size, n))
    return 1.0 / per_epoch, per_epoch * local_epochs


def noise_multiplier_for(config: PrivacyConfig, sample_rate: float, steps: int) -> float:
    """sigma: ``config.noise_multiplier``, or Opacus' for ``target_epsilon`` after ``steps`` steps at
    ``sample_rate``; a ValueError naming ``dp-target-epsilon`` when no sigma reaches it."""
    if config.target_epsilon <= 0:
        return config.noise_multiplier
    sigma, problem = searched_sigma(config.target_epsilon, config.delta, sample_rate, steps, config.accountant)
    if problem:
        raise ValueError(
            f"dp-target-epsilon: {config.target_epsilon:g} (delta {config.delta:g}) cannot be reached in "
            f"{steps} steps at sample rate {sample_rate:.4g} with the {config.accountant} accountant "
            f"(Opacus: {problem}); raise dp-target-epsilon or train fewer steps"
        )
    return sigma


def sigma_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/iet-agc/dp-sigma`` (``~/.cache/iet-agc/dp-sigma``): per machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iet-agc" / "dp-sigma"


@functools.lru_cache(maxsize=256)
def searched_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str):
    """(sigma, "") from Opacus' ``get_noise_multiplier``, or (nan, Opacus' refusal), kept per process
    and on disk: its search evaluates the accountant a dozen times or more (the PRV accountant
    takes ~6 min for the CIFAR-10 DP-SGD preset on a 2-core CPU), and the server's check and every
    shard of every round ask the same question. The file holds the question it answers (Opacus'
    version included); anything else there is asked again. The shipped presets' questions come
    answered (``clients.dp_sigmas``, checked against Opacus' accountant by the tests)."""
    key = {
        "target_epsilon": target_epsilon,
        "delta": delta,
        "sample_rate": sample_rate,
        "steps": steps,
        "accountant": accountant,
        "opacus": opacus.__version__,
    }
    path = sigma_cache_dir() / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json")
    with suppress(OSError, ValueError, TypeError, KeyError):
        kept = json.loads(path.read_text())
        if kept["key"] == key and isinstance(kept["problem"], str):
            if kept["problem"] or (math.isfinite(kept["sigma"]) and kept["sigma"] > 0):
                return float(kept["sigma"]), kept["problem"]
    for known in KNOWN_SIGMAS:  # the shipped presets' questions, answered by this Opacus version
        if known["key"] == key:
            return float(known["sigma"]), ""
    try:
        answer = (
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            ),
            "",
        )
    except ValueError as err:
        answer = math.nan, str(err)
    with suppress(OSError):  # a read-only cache costs time, not correctness
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as fh:
            try:
                json.dump({"key": key, "sigma": answer[0], "problem": answer[1]}, fh)
                fh.close()
                os.replace(fh.name, path)  # whole or not at all: another process may read it now
            finally:
                with suppress(OSError):
                    os.unlink(fh.name)
    return answer


GRAD_SAMPLE_MODE = "functorch"


class PrivateTraining:
    """A shard's round under DP-SGD: Opacus' private model, optimizer and Poisson batches.

    Parameters
    ----------
    model : torch.nn.Module
        The shard's model (wrapped in Opacus' ``GradSampleModule``: use ``self.model``).
    optimizer : torch.optim.Optimizer
        Its optimizer over the trainable tensors (wrapped in a ``DPOptimizer``: use ``self.optimizer``).
    n : int
        The shard's number of images (positions 0..n-1 are what the batches hold).
    batch_size : int
        The expected logical batch size (the sample rate is Opacus' 1 / batches per epoch).
    config : PrivacyConfig
        sigma (or the target epsilon), C, delta, accountant, physical batch limit.
    noise_multiplier : float
        sigma, resolved (``noise_multiplier_for``).
    accountant : dict | None
        The accountant's state after the shard's earlier rounds (None: the first).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        n: int,
        batch_size: int,
        config: PrivacyConfig,
        noise_multiplier: float,
        accountant: dict | None,
    ) -> None:
        self.config = config
        self.engine = PrivacyEngine(accountant=config.accountant)
        if accountant is not None:
            self.engine.accountant.load_state_dict(accountant)
        # drop_last: Opacus' rate is 1 / len(loader), so n // batch batches as the plain trainer and
        # ``poisson_plan`` count (Opacus then ignores drop_last for the Poisson batches themselves)
        positions = DataLoader(TensorDataset(torch.arange(n)), batch_size=min(batch_size, n), drop_last=True)
        self.model, self.optimizer, self.loader = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=positions,
            noise_multiplier=noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=GRAD_SAMPLE_MODE,
        )

    def batches(self) -> Iterator[torch.Tensor]:
        """One epoch's physical batches of positions (empty ones included: each logical batch,
        however small, ends in a noisy step)."""
        with ExitStack() as stack:
            loader = self.loader
            if self.config.max_physical_batch > 0:
                loader = stack.enter_context(
                    BatchMemoryManager(
                        data_loader=loader,
                        max_physical_batch_size=self.config.max_physical_batch,
                        optimizer=self.optimizer,
                    )
                )
            for (positions,) in loader:
                yield positions

    def stepped(self) -> bool:
        """Whether the optimizer's last ``step()`` ended a logical batch (a noisy update)."""
        optimizer: DPOptimizer = self.optimizer
        return not optimizer._is_last_step_skipped  # noqa: SLF001 - Opacus' own flag for split batches

    def accountant_state(self) -> dict:
        return dict(self.engine.accountant.state_dict())

    def epsilon(self) -> float:
        """The epsilon spent so far by this shard (all its rounds), at ``config.delta``."""
        return float(self.engine.get_epsilon(self.config.delta))


def dp_planned_epsilon_check(config: PrivacyConfig, shard_sizes: list[int], batch_size: int, local_epochs: int) -> None:
    """Before training: every shard's sigma exists for the target epsilon (a ValueError otherwise)."""
    for n in sorted(set(shard_sizes)):
        rate, per_round = poisson_plan(n, batch_size, local_epochs)
        noise_multiplier_for(config, rate, per_round * config.rounds)  # raises, naming the key
