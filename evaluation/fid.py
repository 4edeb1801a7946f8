"""FID with pytorch-fid's Inception network, or the reason it could not be computed.

Weights come from a configured file, pytorch-fid's own cache, or its download. When none can be
had (offline), callers record FID as unavailable with the reason instead of failing the run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F


class FIDUnavailable(RuntimeError):
    """The Inception weights could not be loaded; the message says why."""


@functools.lru_cache(maxsize=2)
def inception(weights: str = "", device: str = "cpu") -> torch.nn.Module:
    """pytorch-fid's pool3 InceptionV3, from ``weights`` (a .pth file) or its cache/download."""
    import pytorch_fid.inception as pf

    try:
        if weights:
            state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
            # pytorch-fid only knows its download URL; hand it the local file instead.
            with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: state):
                model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        else:
            model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except Exception as err:  # network errors, missing or corrupt files
        source = f"fid-weights file {weights}" if weights else f"download from {pf.FID_WEIGHTS_URL}"
        raise FIDUnavailable(f"Inception weights unavailable ({source}): {type(err).__name__}: {err}") from err
    return model.to(device).eval()


@torch.no_grad()
def inception_features(
    images01: torch.Tensor, model: torch.nn.Module, batch_size: int = 200, device="cpu"
) -> np.ndarray:
    """2048-d pool3 features of images in [0, 1] (grey images are repeated to 3 channels)."""
    feats = []
    for start in range(0, images01.shape[0], batch_size):
        x = images01[start : start + batch_size].float().to(device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats.append(model(x)[0].squeeze(-1).squeeze(-1).cpu().double())
    return torch.cat(feats).numpy()


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature matrix (rows = images)."""
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (pytorch-fid's formula)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(*statistics(feat_a), *statistics(feat_b)))


def fid(generated01: torch.Tensor, reference01: torch.Tensor, weights: str = "", device: str = "cpu") -> float:
    """FID between generated and reference images in [0, 1]; raises FIDUnavailable offline."""
    model = inception(weights, str(device))
    return frechet_distance(
        inception_features(generated01, model, device=device), inception_features(reference01, model, device=device)
    )
