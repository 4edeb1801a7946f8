"""Anti-Gradient Control: the per-timestep memory bank (eq. 3) and the loss-ratio skip rule (eq. 4, 8).

Pure tensor functions, vectorised over the batch, with no host synchronisation.
"""

from __future__ import annotations

from typing import Protocol

import torch


def update_memory_bank(bank: torch.Tensor, t: torch.Tensor, losses: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. 3 applied to every sample of a batch, exactly as sequential updates in batch order.

    For a timestep drawn m times with losses l_0..l_{m-1} (batch order), sequential EMA updates
    give ``eta^m * bank + (1 - eta) * sum_j eta^(m-1-j) * l_j``; this computes that in closed
    form with a stable sort, so repeated timesteps are updated once per occurrence.
    """
    t = t.long()
    losses = losses.detach().to(bank.dtype)
    counts = torch.bincount(t, minlength=bank.numel())  # m per timestep
    order = torch.argsort(t, stable=True)
    t_sorted = t[order]
    first = torch.searchsorted(t_sorted, t_sorted)  # index of each group's first member
    rank = torch.empty_like(t)
    rank[order] = torch.arange(t.numel(), device=t.device) - first  # j, 0-based, batch order
    eta_t = torch.as_tensor(eta, dtype=bank.dtype, device=bank.device)
    weights = (1 - eta_t) * eta_t.pow((counts[t] - 1 - rank).to(bank.dtype))
    new = bank * eta_t.pow(counts.to(bank.dtype))
    return new.index_add(0, t, weights * losses)


def loss_ratio(losses: torch.Tensor, bank_t: torch.Tensor) -> torch.Tensor:
    """Eq. 4: r = L / l_t; +inf where the bank is still 0 (nothing to compare with yet)."""
    return torch.where(bank_t > 0, losses / bank_t.clamp_min(torch.finfo(bank_t.dtype).tiny), torch.inf)


class SkipRule(Protocol):
    """Decides which samples of a batch are skipped, from their loss ratio (eq. 4)."""

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:  # bool mask, True = skip
        ...


class RatioSkip:
    """The paper's rule: skip when r < lambda (the authors' ``loss * mem_ratio < bank[t]``)."""

    def __init__(self, threshold: float) -> None:
        if not threshold > 0:
            raise ValueError(f"skip-threshold: must be > 0, got {threshold}")
        self.threshold = threshold

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        return ratio < self.threshold


class NeverSkip:
    """AGC off: every sample is kept (the bank is still kept, so TAA can work without AGC)."""

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(ratio, dtype=torch.bool)


def kept_mean(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eq. 8's batch loss: sum over kept samples / number kept (at least 1), sync-free."""
    return (per_sample * keep).sum() / keep.sum().clamp_min(1)
