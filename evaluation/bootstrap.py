"""The quality figure's uncertainty: a split-sample interval of a Fréchet distance (digit_fd, FID).

What the interval is for: a run reports FD_N, the distance of N generated images to the
reference statistics. Another N images of the same model would give another FD_N; two runs can be
told apart only by more than that spread. So the interval is meant to hold E[FD_N], the figure's
expected value at this N, in ``level`` of runs, and its half-width is z * sd(FD_N).

How: sd(FD_N) is estimated from the N images themselves by splitting them at random into disjoint
parts. Two disjoint halves are two independent sample sets of N/2 images, so (FD_a - FD_b)^2 / 2
is an unbiased estimate of Var(FD_{N/2}); quarters give Var(FD_{N/4}) the same way. A Fréchet
distance of m samples varies as Var(FD_m) = a/m + b/m^2 (a linear term in the sample mean and
covariance, and a quadratic one that dominates when the model is close to the reference), so the
two sizes fix a and b and give Var(FD_N) = (6 Var(FD_{N/2}) - Var(FD_{N/4})) / 8, kept within
[Var(FD_{N/2}) / 4, Var(FD_{N/2}) / 2] (a, b >= 0). Each random split (``resamples`` of them, one
seeded permutation each) gives 4 quarters, their 6 pairs, and the 3 ways to pair them into halves.

Why not the bootstrap it replaces: resampling with replacement measures the spread around the
sample's own statistics, whose distance to the reference is already inflated by its sampling
error, and repeated rows inflate it again; in a 64-d Gaussian simulation its percentile interval
was 1.4x (1,000 images) to 1.8x (500) wider than the real spread and held E[FD_N] in 149/150 and
150/150 runs. ``scripts/fd_interval_coverage.py`` measures both (docs/results.md).
Cost: one pass over the N rows per split (four (F, F) second-moment sums) and 10 eigenvalue
problems per split, batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from .frechet import frechet_distance_stats, in_memory_statistics

DEFAULT_RESAMPLES = 25  # random splits into quarters
MIN_SPLIT_ROWS = 8  # quarters of at least 2 rows (a covariance)
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """The split-sample interval: the figure +- z * ``sd``, ``sd`` the estimated sd(FD_N) (module
    docstring); ``lo`` >= 0. NaN where there are fewer than ``MIN_SPLIT_ROWS`` rows to split."""

    lo: float
    hi: float
    level: float
    resamples: int
    sd: float

    @property
    def width(self) -> float:
        return self.hi - self.lo


@dataclass(frozen=True)
class QualityScore:
    """A Fréchet distance with its split-sample interval and the floor: the same distance for as many
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
    """The Fréchet distance of generated ``features`` to the reference, its interval and the
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


def split_variances(
    x: torch.Tensor, mu_ref: torch.Tensor, sigma_ref: torch.Tensor, splits: int, seed: int
) -> tuple[float, float]:
    """Unbiased estimates of Var(FD) at N/2 and at N/4 rows from ``splits`` random permutations of
    ``x`` (N, F), each cut into 4 quarters: the quarters' sample variance (ddof 1) and, for the 3
    pairings of quarters into halves, (FD_a - FD_b)^2 / 2; averaged over the splits."""
    n, f = x.shape
    center = x.mean(0)
    xc = x - center  # centring keeps the summed second moments well conditioned
    gen = torch.Generator().manual_seed(seed)
    cut = [n * q // 4 for q in range(5)]
    halves = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]], device=x.device)  # 3 pairings
    counts = torch.tensor([b - a for a, b in zip(cut[:-1], cut[1:], strict=True)], dtype=x.dtype, device=x.device)
    m = torch.cat([counts, counts[halves].sum(1)])  # rows of the 4 quarters, then of the 6 halves
    fd = []
    for _ in range(splits):  # one pass over the rows per split; the quarters' sums make the halves'
        order = torch.randperm(n, generator=gen).to(x.device)
        parts = [xc[order[a:b]] for a, b in zip(cut[:-1], cut[1:], strict=True)]
        sums = torch.stack([p.sum(0) for p in parts])  # (4, F)
        seconds = torch.stack([p.T @ p for p in parts])  # (4, F, F)
        sums = torch.cat([sums, sums[halves].sum(1)])  # (10, F)
        seconds = torch.cat([seconds, seconds[halves].sum(1)])
        mean = sums / m[:, None]
        cov = (seconds - m[:, None, None] * mean[:, :, None] * mean[:, None, :]) / (m[:, None, None] - 1)
        fd.append(frechet_distance_batch(mean + center, cov, mu_ref, sigma_ref))
    fd = torch.stack(fd)  # (splits, 10)
    quarter = fd[:, :4].var(dim=1, unbiased=True).mean()
    half = ((fd[:, 4::2] - fd[:, 5::2]) ** 2 / 2).mean()
    return float(half), float(quarter)


def extrapolated_variance(half: float, quarter: float) -> float:
    """Var(FD_N) from Var(FD_{N/2}) and Var(FD_{N/4}) under Var(FD_m) = a/m + b/m^2: (6 half -
    quarter) / 8, kept within [half / 4, half / 2] (all b: a = 0; all a: b = 0)."""
    return min(max((6 * half - quarter) / 8, half / 4), half / 2)


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
    """Split-sample interval of the Fréchet distance of ``features`` (N, F) to (mu_ref, sigma_ref):
    the distance +- z * sd(FD_N) (module docstring), ``resamples`` random splits seeded by ``seed``.

    Raises ValueError for fewer than 2 rows, fewer than 2 resamples or a level outside (0, 1);
    with fewer than ``MIN_SPLIT_ROWS`` rows the interval is NaN (no quarter has a covariance).
    """
    x = torch.as_tensor(features, dtype=torch.float64, device=device)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: need a (N, F) array with N >= 2, got shape {tuple(x.shape)}")
    if resamples < 2:
        raise ValueError(f"resamples: must be >= 2, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    if x.shape[0] < MIN_SPLIT_ROWS:
        return Interval(math.nan, math.nan, level, resamples, math.nan)
    f = x.shape[1]
    mu_r = torch.as_tensor(mu_ref, dtype=torch.float64, device=device)
    sigma_r = torch.as_tensor(sigma_ref, dtype=torch.float64, device=device)
    own = float(frechet_distance_batch(x.mean(0)[None], torch.cov(x.T).reshape(f, f)[None], mu_r, sigma_r)[0])
    sd = math.sqrt(extrapolated_variance(*split_variances(x, mu_r, sigma_r, resamples, seed)))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return Interval(max(0.0, own - z * sd), own + z * sd, level, resamples, sd)
