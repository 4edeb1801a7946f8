"""Threshold-Aware Augmentation (eq. 5-7): augment kept samples just above the skip line.

Strength rho = exp(-A * |r - lambda| / lambda) grows as the ratio r approaches lambda. We read
the paper's "RandAugment parameter" M as torchvision's RandAugment magnitude (its default
31-bin scale) and apply ``magnitude = round(rho * M)`` per sample.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torchvision.transforms import v2


def in_augment_range(ratio: torch.Tensor, keep: torch.Tensor, threshold: float, aug_range: float) -> torch.Tensor:
    """Eq. 8's middle case: kept and lambda <= r < R * lambda (R = inf: every finite r)."""
    upper = ratio < aug_range * threshold if math.isfinite(aug_range) else torch.isfinite(ratio)
    return keep & (ratio >= threshold) & upper


def strength(ratio: torch.Tensor, threshold: float, sharpness: float) -> torch.Tensor:
    """Eq. 6-7: rho = exp(-A * |r - lambda| / lambda), in (0, 1]."""
    return torch.exp(-sharpness * (ratio - threshold).abs() / threshold)


def magnitudes(rho: torch.Tensor, max_magnitude: int) -> torch.Tensor:
    """Per-sample RandAugment magnitude: round(rho * M), an integer in [0, M]."""
    return torch.round(rho * max_magnitude).long()


class AugmentPolicy(Protocol):
    """Turns images in [0, 1] plus their strengths rho into augmented copies of the same shape."""

    def __call__(self, images: torch.Tensor, rho: torch.Tensor) -> torch.Tensor: ...


class RandAugmentPolicy:
    """torchvision RandAugment with the magnitude scaled by rho.

    Samples are grouped by their integer magnitude (at most M+1 groups, a fixed small loop,
    not a per-sample one); each group gets one RandAugment draw of ``num_ops`` operations.
    """

    def __init__(self, max_magnitude: int, num_ops: int = 2) -> None:
        self.max_magnitude = max_magnitude
        self._augs = [v2.RandAugment(num_ops=num_ops, magnitude=m) for m in range(max_magnitude + 1)]

    def __call__(self, images: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        mags = magnitudes(rho, self.max_magnitude)
        out = images.clone()
        for m in mags.unique().tolist():  # <= M+1 groups
            sel = mags == m
            out[sel] = self._augs[m](images[sel]).clamp(0, 1)
        return out
