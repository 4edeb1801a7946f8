"""FID with pytorch-fid's Inception network, or the reason it could not be computed.

Weights come from a configured file, pytorch-fid's own cache, or its download. When none can be
had (offline), callers record FID as unavailable with the reason instead of failing the run.
Training-set statistics are computed once per (data-set fingerprint, weights) and cached on disk.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch

log = logging.getLogger("iet_agc.evaluation")

DOWNLOAD_TAG = "pt_inception-2015-12-05"  # pytorch-fid's released FID weights
DEFAULT_CACHE = Path.home() / ".cache" / "iet-agc"


class FIDUnavailable(RuntimeError):
    """The Inception weights could not be loaded; the message says why."""


def cache_dir(setting: str = "") -> Path:
    """The ``fid-cache-dir`` setting, or ``~/.cache/iet-agc`` when it is empty."""
    return Path(setting).expanduser() if setting else DEFAULT_CACHE


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


def random_inception(device: torch.device | str = "cpu") -> torch.nn.Module:
    """pytorch-fid's network with random weights: for timings and tests only, never for a reported FID."""
    import pytorch_fid.inception as pf

    with (
        mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None),
    ):
        model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return model.to(device).eval()


def weights_tag(weights: str = "") -> str:
    """Names the Inception weights in cache keys: the download's tag, or a hash of the weights file."""
    if not weights:
        return DOWNLOAD_TAG
    path = Path(weights).expanduser()
    stat = path.stat()
    return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "w" + h.hexdigest()[:16]


def _to01(batch: torch.Tensor) -> torch.Tensor:
    x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def _features(model: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out.flatten(1)


@torch.no_grad()
def inception_features(
    images01: torch.Tensor, model: torch.nn.Module, batch_size: int = 200, device: torch.device | str = "cpu"
) -> np.ndarray:
    """2048-d pool3 features of images (uint8 or float in [0, 1]; grey is repeated to 3 channels).

    pytorch-fid's network resizes to 299x299 and rescales to [-1, 1] itself.
    """
    feats = [
        _features(model, _to01(images01[s : s + batch_size]).to(device)).double().cpu()
        for s in range(0, images01.shape[0], batch_size)
    ]
    return torch.cat(feats).numpy() if feats else np.empty((0, 0))


@torch.no_grad()
def feature_statistics(
    images: torch.Tensor,
    model: Callable[[torch.Tensor], object],
    batch_size: int = 50,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1) of ``model``'s features, accumulated batch by batch in float64.

    Only a (F, F) accumulator lives in memory, however many images; images are uint8 or [0, 1].
    """
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {images.shape[0]}")
    shift = total = outer = None
    count = 0
    for s in range(0, images.shape[0], batch_size):
        f = _features(model, _to01(images[s : s + batch_size]).to(device)).double()
        if shift is None:  # shifting by a first estimate of the mean keeps the sums well conditioned
            shift = f.mean(0)
            total = torch.zeros_like(shift)
            outer = torch.zeros((f.shape[1], f.shape[1]), dtype=torch.float64, device=f.device)
        f = f - shift
        total += f.sum(0)
        outer += f.T @ f
        count += f.shape[0]
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return (shift + mean).cpu().numpy(), cov.cpu().numpy()


def frechet_distance_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), pytorch-fid's implementation."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():  # pytorch-fid 0.3 passes scipy's deprecated `disp` to sqrtm
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        value = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    return max(0.0, value)  # a distance: negative only by rounding


def cached_statistics(
    images: torch.Tensor,
    key: str,
    model: Callable[[torch.Tensor], object],
    directory: Path | str,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """``feature_statistics`` of a reference set, read from ``directory/<key>.npz`` when present.

    The key must name everything the statistics depend on (data-set fingerprint, weights).
    """
    path = Path(directory) / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                if int(stored["count"]) == images.shape[0]:
                    return stored["mu"], stored["sigma"]
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable FID statistics cache %s: %s", path, err)
    mu, sigma = feature_statistics(images, model, batch_size, device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, mu=mu, sigma=sigma, count=images.shape[0])
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache is not worth failing an evaluation for
        log.warning("could not write FID statistics cache %s: %s", path, err)
    return mu, sigma


def fid(
    generated01: torch.Tensor,
    reference01: torch.Tensor,
    weights: str = "",
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 50,
    num_images: int | None = None,
    reference_key: str = "",
    cache: str = "",
    model: Callable[[torch.Tensor], object] | None = None,
) -> float:
    """FID of the first ``num_images`` generated images (all by default) against reference images.

    Images are uint8 or float in [0, 1]. With ``reference_key`` (e.g. the data-set fingerprint) the
    reference statistics are cached under ``cache``/fid. Raises FIDUnavailable when no weights can
    be had; ``model`` replaces the Inception network (tests, other feature extractors).
    """
    if model is None:
        model = inception(weights, str(device))
        tag = weights_tag(weights)
    else:
        tag = f"custom-{type(model).__name__}"
    gen = generated01[:num_images] if num_images else generated01
    mu_g, sigma_g = feature_statistics(gen, model, batch_size, device)
    if reference_key:
        directory = cache_dir(cache) / "fid"
        mu_r, sigma_r = cached_statistics(reference01, f"{reference_key}-{tag}", model, directory, batch_size, device)
    else:
        mu_r, sigma_r = feature_statistics(reference01, model, batch_size, device)
    return frechet_distance_stats(mu_g, sigma_g, mu_r, sigma_r)
