"""Initial shards: lists of sample ids, IID per class where labels exist, else equal parts."""

from __future__ import annotations

import numpy as np


def make_shards(num_samples: int, num_shards: int, labels: np.ndarray | None, seed: int) -> list[np.ndarray]:
    """Split ids 0..N-1 into K shards, seeded.

    With labels, each class is shuffled and dealt round-robin over the shards, so every shard
    holds the same number of images of every class (within one) and sizes differ by at most one.
    Without labels, a seeded permutation is cut into K equal parts.
    """
    if not 1 <= num_shards <= num_samples:
        raise ValueError(f"num-shards: must be in [1, {num_samples}], got {num_shards}")
    rng = np.random.default_rng(seed)
    if labels is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(num_samples), num_shards)]
    labels = np.asarray(labels)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels: expected shape ({num_samples},), got {labels.shape}")
    dealt = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    return [np.sort(dealt[k::num_shards]) for k in range(num_shards)]
