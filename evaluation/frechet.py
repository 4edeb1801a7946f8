"""The Fréchet distance of two Gaussians and the two ways this package fits one to features.

``in_memory_statistics`` takes a feature matrix already in memory (generated images, a floor's
real images: at most a few thousand rows); ``streamed_statistics`` runs a model batch by batch and
keeps only a (F, F) accumulator (a 50,000-image reference set, whose (N, 2048) features would not
fit comfortably). Both give the mean and the ddof-1 covariance in float64, equal to rounding
(tests/test_fid.py); each keeps the arithmetic it has always had, so stored figures do not move.
bootstrap.py, fid.py and digit_fd.py import them from here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from ddpm.data import to_unit_range
from ddpm.progress import progress


def frechet_distance_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), pytorch-fid's implementation."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():  # pytorch-fid 0.3 passes scipy's deprecated `disp` to sqrtm
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        value = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    return max(0.0, value)  # a distance: negative only by rounding


def in_memory_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1, ``torch.cov``) of (N, F) features held in memory, in float64.

    For the generated images' features, which the interval's splits need in memory anyway.
    """
    x = features.double()
    return x.mean(0).numpy(), torch.cov(x.T).reshape(x.shape[1], x.shape[1]).numpy()


def rgb01(batch: torch.Tensor) -> torch.Tensor:
    """Images (uint8 or [0, 1]) as floats in [0, 1], grey repeated to 3 channels."""
    x = to_unit_range(batch)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def model_features(model: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as (B, F): the first output of a list or tuple, flattened."""
    out = model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out.flatten(1)


@torch.no_grad()
def streamed_statistics(
    images: torch.Tensor,
    model: Callable[[torch.Tensor], object],
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    desc: str = "FID features",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1) of ``model``'s features, accumulated batch by batch in float64.

    Only a (F, F) accumulator lives in memory, however many images: for reference sets (the
    training images). Images are uint8 or [0, 1]; ``desc`` names the pass in its progress line.
    """
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {images.shape[0]}")
    shift = total = outer = None
    count = 0
    with progress(images.shape[0], desc, "img") as bar:
        for s in range(0, images.shape[0], batch_size):
            f = model_features(model, rgb01(images[s : s + batch_size]).to(device)).double()
            if shift is None:  # shifting by a first estimate of the mean keeps the sums well conditioned
                shift = f.mean(0)
                total = torch.zeros_like(shift)
                outer = torch.zeros((f.shape[1], f.shape[1]), dtype=torch.float64, device=f.device)
            f = f - shift
            total += f.sum(0)
            outer += f.T @ f
            count += f.shape[0]
            bar.update(f.shape[0])
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return (shift + mean).cpu().numpy(), cov.cpu().numpy()
