"""MQ, the paper's memorization count (eq. 12-13), computed exactly as a chunked matrix product.

For generated x with squared distances d_1 <= ... <= d_n to its n nearest training images
(nearest included), ratio = d_1 / mean(d_1..d_n); x counts as memorized when ratio < delta.
Memory is bounded by the chunk sizes: no N_gen x N_train matrix is ever held.

The calibrated score compares generated ratios with the ratios of held-out real images (a model
that never saw them): ``copy_p`` = share of generated images below the held-out p % quantile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ddpm.data import to_unit_range
from ddpm.progress import progress

from .columns import mq_column


@dataclass(frozen=True)
class Neighbours:
    """Per generated image: squared distances to its n nearest training images and their ids."""

    dist: torch.Tensor  # (G, n), ascending
    index: torch.Tensor  # (G, n), int64 training ids

    @property
    def ratio(self) -> torch.Tensor:
        """Eq. 12: nearest / mean of the n nearest (0 where all n distances are 0)."""
        mean = self.dist.mean(1)
        return torch.where(mean > 0, self.dist[:, 0] / mean.clamp_min(torch.finfo(mean.dtype).tiny), 0.0)

    @property
    def nearest(self) -> torch.Tensor:
        """Training id of each generated image's nearest training image (x-bar of eq. 12)."""
        return self.index[:, 0]


def flatten01(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """(N, C, H, W) uint8 or float in [0, 1] -> (N, C*H*W) float32 in [0, 1] (a view when possible).

    Raises ValueError for NaN/inf or float values outside [0, 1]: the reference rule is defined on
    images in [0, 1], and a [-1, 1] tensor passed by mistake would silently change every ratio.
    """
    if images.dim() < 2:
        raise ValueError(f"{name}: expected a batch of images (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = to_unit_range(images)
    elif images.is_floating_point():
        x = images.float()
        if x.numel():
            lo, hi = (float(v) for v in x.aminmax())  # NaN propagates into both
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name}: contains NaN or infinite values")
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    else:
        raise ValueError(f"{name}: expected uint8 (0..255) or float (0..1) images, got {images.dtype}")
    return x.reshape(x.shape[0], -1)


@torch.no_grad()
def nearest_neighbours(
    generated: torch.Tensor,
    train: torch.Tensor,
    n: int = 50,
    *,
    gen_chunk: int = 1024,
    train_chunk: int = 8192,
    device: torch.device | str = "cpu",
    desc: str = "nearest neighbours",
) -> Neighbours:
    """Exact n nearest training images (squared Euclidean, images in [0, 1]) per generated image.

    Candidates come from ``|g|^2 + |t|^2 - 2 g.t`` block by block (one ``addmm`` per
    gen_chunk x train_chunk block into a reused buffer, a top-n per block merged into a running
    top-n); the n winners' distances are then recomputed directly as ``sum((g - t)^2)`` so exact
    copies score 0 and no cancellation error reaches the ratio. Memory: the inputs as float32 on
    ``device`` plus O(gen_chunk * train_chunk + G * n).
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if gen_chunk < 1 or train_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1, got gen_chunk={gen_chunk}, train_chunk={train_chunk}")
    gen, ref = flatten01(generated, "generated"), flatten01(train, "train")
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(
            f"generated images have shape {tuple(generated.shape[1:])} ({gen.shape[1]} values), training images "
            f"{tuple(train.shape[1:])} ({ref.shape[1]} values): compare at the training resolution"
        )
    if ref.shape[0] < n:
        raise ValueError(f"need at least n={n} training images, got {ref.shape[0]}")
    device = torch.device(device)
    num_gen, num_ref = gen.shape[0], ref.shape[0]
    ref = ref.to(device)
    ref_sq = torch.einsum("ij,ij->i", ref, ref)
    out_d = torch.empty((num_gen, n), dtype=torch.float32)
    out_i = torch.empty((num_gen, n), dtype=torch.int64)
    gen_chunk, train_chunk = min(gen_chunk, max(num_gen, 1)), min(train_chunk, num_ref)
    buffer = torch.empty(gen_chunk * train_chunk, device=device)
    with progress(num_gen * num_ref, desc, "pairs", scale=True) as bar:  # (generated, training) pairs compared
        for g0 in range(0, num_gen, gen_chunk):
            g = gen[g0 : g0 + gen_chunk].to(device)
            best_d = torch.empty((g.shape[0], 0), device=device)
            best_i = torch.empty((g.shape[0], 0), dtype=torch.int64, device=device)
            for t0 in range(0, num_ref, train_chunk):
                r = ref[t0 : t0 + train_chunk]
                # |t|^2 - 2 g.t ranks training images like the squared distance (|g|^2 is constant per row).
                block = buffer[: g.shape[0] * r.shape[0]].view(g.shape[0], r.shape[0])
                torch.addmm(ref_sq[t0 : t0 + r.shape[0]].expand_as(block), g, r.T, beta=1, alpha=-2, out=block)
                d, i = block.topk(min(n, r.shape[0]), dim=1, largest=False, sorted=False)
                best_d, best_i = torch.cat([best_d, d], 1), torch.cat([best_i, i.add_(t0)], 1)
                if best_d.shape[1] > n:
                    best_d, pos = best_d.topk(n, dim=1, largest=False, sorted=False)
                    best_i = best_i.gather(1, pos)
                bar.update(g.shape[0] * r.shape[0])
            exact = _exact_distances(g, ref, best_i, max(1, (gen_chunk * train_chunk) // (n * ref.shape[1])))
            exact, order = exact.sort(dim=1, stable=True)
            out_d[g0 : g0 + g.shape[0]] = exact.cpu()
            out_i[g0 : g0 + g.shape[0]] = best_i.gather(1, order).cpu()
    return Neighbours(out_d, out_i)


def _exact_distances(g: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """sum((g_i - ref[ids_ij])^2) for each (i, j), ``rows`` generated images at a time."""
    out = torch.empty(ids.shape, device=g.device)
    for r0 in range(0, g.shape[0], rows):
        diff = ref.index_select(0, ids[r0 : r0 + rows].reshape(-1)).view(-1, ids.shape[1], ref.shape[1])
        out[r0 : r0 + rows] = torch.linalg.vector_norm(diff.sub_(g[r0 : r0 + rows, None, :]), dim=-1).square_()
    return out


def mq_counts(ratio: torch.Tensor, thresholds: tuple[float, ...] = (0.4, 0.5, 0.6)) -> dict[str, int]:
    """Eq. 13: MQ_delta = number of generated images with ratio strictly below delta."""
    return {mq_column(t): int((ratio < t).sum()) for t in thresholds}


COPY_LEVELS: tuple[float, ...] = (0.01, 0.05)


def holdout_quantiles(holdout_ratio: torch.Tensor, levels: Sequence[float] = COPY_LEVELS) -> dict[float, float]:
    """Quantiles (linear interpolation) of the eq. 12 ratio of held-out real images: the floor."""
    if holdout_ratio.numel() == 0:
        raise ValueError("holdout: no held-out images to calibrate against")
    q = torch.quantile(holdout_ratio.double(), torch.tensor(list(levels), dtype=torch.float64))
    return {float(p): float(v) for p, v in zip(levels, q, strict=True)}


def copy_scores(
    ratio: torch.Tensor, holdout_ratio: torch.Tensor, levels: Sequence[float] = COPY_LEVELS
) -> dict[str, float]:
    """``copy_p``: share of generated images whose ratio is strictly below the held-out p % quantile.

    A model whose samples are as far from the training set as unseen real images scores about p/100;
    memorized copies push it towards 1. Unlike MQ this does not saturate on data sets (digits) whose
    real images already have small ratios.
    """
    if ratio.numel() == 0:
        raise ValueError("generated: no generated images")
    quantiles = holdout_quantiles(holdout_ratio, levels)
    r = ratio.double()
    return {f"copy_{p * 100:g}": float((r < q).double().mean()) for p, q in quantiles.items()}
