"""Bootstrap interval of a Fréchet distance (digit_fd, FID) over the generated samples.

The quality figure is an estimate from N generated images; resampling those images with
replacement shows how much of a difference between two runs the sample count alone can explain.
A resample repeats images, and a Fréchet distance of fewer distinct images is larger, so the
resampled distances sit above the sample's own; the interval is their percentile interval shifted
by that bias (mean of the resamples minus the sample's distance), which centres it on the figure.
All resamples are drawn at once as a (B, N) count matrix: the statistics of every resample come
from one batched product and the distances from one batched symmetric eigen-decomposition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .frechet import frechet_distance_stats, in_memory_statistics

DEFAULT_RESAMPLES = 200
DEFAULT_LEVEL = 0.95
MEMORY_BUDGET = 256 * 2**20  # bytes of (F, F) float64 matrices held per chunk of resamples


@dataclass(frozen=True)
class Interval:
    """A bias-shifted percentile bootstrap interval: the central ``level`` of the resampled
    distances, each minus ``bias`` (their mean minus the sample's own distance); ``lo`` >= 0."""

    lo: float
    hi: float
    level: float
    resamples: int
    bias: float

    @property
    def width(self) -> float:
        return self.hi - self.lo


@dataclass(frozen=True)
class QualityScore:
    """A Fréchet distance with its bootstrap interval and the floor: the same distance for as many
    held-out real images (what a generator that draws from the data distribution would score)."""

    value: float
    lo: float
    hi: float
    floor: float | None  # None where no held-out images are available
    floor_n: int  # held-out images the floor used (the generated count, or all there are if fewer)

    def columns(self, name: str) -> dict[str, float | None]:
        """``{name, name_lo, name_hi, name_floor}``: the rounds.csv columns."""
        return {name: self.value, f"{name}_lo": self.lo, f"{name}_hi": self.hi, f"{name}_floor": self.floor}


def score_features(
    features: torch.Tensor,
    mu_ref: np.ndarray,
    sigma_ref: np.ndarray,
    floor_features: torch.Tensor | None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> QualityScore:
    """The Fréchet distance of generated ``features`` to the reference, its bootstrap interval and the
    floor: the first N rows of ``floor_features`` (held-out real images) scored the same way."""
    value = frechet_distance_stats(*in_memory_statistics(features.cpu()), mu_ref, sigma_ref)
    interval = frechet_interval(features, mu_ref, sigma_ref, resamples=resamples, seed=seed, device=device)
    floor, floor_n = None, 0
    if floor_features is not None and floor_features.shape[0] >= 2:
        floor_n = min(features.shape[0], floor_features.shape[0])
        floor = frechet_distance_stats(*in_memory_statistics(floor_features[:floor_n].cpu()), mu_ref, sigma_ref)
    return QualityScore(value, interval.lo, interval.hi, floor, floor_n)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    vals, vecs = torch.linalg.eigh(matrix)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_batch(
    mu: torch.Tensor, sigma: torch.Tensor, mu_ref: torch.Tensor, sigma_ref: torch.Tensor
) -> torch.Tensor:
    """Fréchet distances of B Gaussians (mu (B, F), sigma (B, F, F)) to one reference, shape (B,).

    Tr((S S_r)^(1/2)) is the sum of the square roots of the eigenvalues of R S R with R = S_r^(1/2)
    (same eigenvalues, but symmetric): one batched ``eigvalsh`` instead of B general ``sqrtm`` calls.
    """
    root = _sqrt_psd(sigma_ref)
    cross = torch.linalg.eigvalsh(root @ sigma @ root).clamp(min=0).sqrt().sum(-1)
    diff = ((mu - mu_ref) ** 2).sum(-1)
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1) + sigma_ref.trace()
    return (diff + trace - 2 * cross).clamp(min=0)


def frechet_interval(
    features: np.ndarray | torch.Tensor,
    mu_ref: np.ndarray,
    sigma_ref: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Interval:
    """Bootstrap interval of the Fréchet distance of ``features`` (N, F) to (mu_ref, sigma_ref).

    Each resample draws N of the N feature rows with replacement (one seeded ``randint`` for all
    resamples, turned into per-row counts); its mean and covariance (ddof 1) are count-weighted
    sums over the rows. Raises ValueError for fewer than 2 rows, fewer than 2 resamples or a level
    outside (0, 1).
    """
    x = torch.as_tensor(features, dtype=torch.float64, device=device)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: need a (N, F) array with N >= 2, got shape {tuple(x.shape)}")
    if resamples < 2:
        raise ValueError(f"resamples: must be >= 2, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    n, f = x.shape
    mu_r = torch.as_tensor(mu_ref, dtype=torch.float64, device=device)
    sigma_r = torch.as_tensor(sigma_ref, dtype=torch.float64, device=device)
    center = x.mean(0)
    xc = x - center  # centring first keeps the weighted sums well conditioned
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, MEMORY_BUDGET // (3 * 8 * f * f))
    values = []
    for start in range(0, resamples, chunk):  # chunks of resamples, not of samples: memory only
        b = min(chunk, resamples - start)
        idx = torch.randint(0, n, (b, n), generator=gen).to(x.device)
        counts = torch.zeros(b, n, dtype=torch.float64, device=x.device)
        counts.scatter_add_(1, idx, torch.ones_like(counts))
        mean = counts @ xc / n  # (b, F)
        second = torch.einsum("bn,nf,ng->bfg", counts, xc, xc)
        cov = (second - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        values.append(frechet_distance_batch(mean + center, cov, mu_r, sigma_r))
    dist = torch.cat(values).cpu()
    own = frechet_distance_batch(center[None], torch.cov(x.T).reshape(f, f)[None], mu_r, sigma_r).cpu()[0]
    bias = float(dist.mean() - own)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(dist, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(max(0.0, lo - bias), hi - bias, level, resamples, bias)
