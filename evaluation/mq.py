"""MQ, the paper's memorization count (eq. 12-13), computed exactly as a chunked matrix product.

For generated x with squared distances d_1 <= ... <= d_n to its n nearest training images
(nearest included), ratio = d_1 / mean(d_1..d_n); x counts as memorized when ratio < delta.
Memory is bounded by the chunk sizes: no N_gen x N_train matrix is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def flatten01(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 or float in [0, 1] -> (N, C*H*W) float32 in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
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
) -> Neighbours:
    """Exact n nearest training images (squared Euclidean) per generated image, chunked."""
    gen, ref = flatten01(generated), flatten01(train)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"generated images have {gen.shape[1]} values each, training images {ref.shape[1]}")
    if ref.shape[0] < n:
        raise ValueError(f"need at least n={n} training images, got {ref.shape[0]}")
    ref_sq = ref.pow(2).sum(1)
    out_d, out_i = [], []
    for g0 in range(0, gen.shape[0], gen_chunk):
        g = gen[g0 : g0 + gen_chunk].to(device)
        g_sq = g.pow(2).sum(1, keepdim=True)
        best_d = torch.full((g.shape[0], 0), torch.inf, device=device)
        best_i = torch.empty((g.shape[0], 0), dtype=torch.long, device=device)
        for t0 in range(0, ref.shape[0], train_chunk):
            r = ref[t0 : t0 + train_chunk].to(device)
            d = (g_sq + ref_sq[t0 : t0 + train_chunk].to(device)[None] - 2 * g @ r.T).clamp_min_(0)
            ids = torch.arange(t0, t0 + r.shape[0], device=device).expand(g.shape[0], -1)
            cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, ids], 1)
            best_d, pos = cat_d.topk(min(n, cat_d.shape[1]), dim=1, largest=False, sorted=True)
            best_i = cat_i.gather(1, pos)
        out_d.append(best_d.cpu())
        out_i.append(best_i.cpu())
    return Neighbours(torch.cat(out_d), torch.cat(out_i))


def mq_counts(ratio: torch.Tensor, thresholds: tuple[float, ...] = (0.4, 0.5, 0.6)) -> dict[str, int]:
    """MQ_delta = number of generated images with ratio strictly below delta."""
    return {f"mq_{t:g}": int((ratio < t).sum()) for t in thresholds}
