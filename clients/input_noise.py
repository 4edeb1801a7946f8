"""The adding-noise baseline (the paper's Table I): Gaussian noise on the training images.

With ``input-noise-fixed`` each image's noise is drawn once, from (seed, image id) alone, so an
image carries the same noise in every epoch, round and shard it trains in (MSR moves it); the
evaluation always compares with the clean images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

NOISE_STREAM = 2  # numpy streams (seed, stream, id): apart from the class labels' (ddpm.schedule.LABEL_STREAM)


def fixed_input_noise(ids: Sequence[int] | np.ndarray, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal noise (len(ids), *shape), float32; row i a function of (seed, ids[i]) alone.

    One generator per image, once per message (not per step): an image's noise does not depend
    on which shard, round or batch it is in.
    """
    rows = [np.random.default_rng([seed, NOISE_STREAM, int(i)]).standard_normal(tuple(shape)) for i in ids]
    return torch.from_numpy(np.stack(rows).astype(np.float32)) if rows else torch.empty((0, *shape))
