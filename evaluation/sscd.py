"""Sim Score (the paper's Table II memorization metric for text-to-image), as DCR computes it.

somepago/DCR's ``diff_retrieval.py`` (run by liuxiao-guan/IET-AGC_SD's ``diff_retrieval.sh`` with
``--arch resnet50_disc``, i.e. ``sscd_disc_large.torchscript.pt``): SSCD features of
``Resize(256), CenterCrop(224), Normalize(0.5, 0.5)`` crops, L2-normalised; each generation's
best cosine against the training images (``topk(1)``); the Sim Score is its 95th percentile
(``np.percentile``, linear interpolation); beside it the share of generations above 0.5
(``sim_gt_05pc``, strict) and the background: each training image's best cosine against the
*other* training images (DCR's ``topk(2)[:, -1]``; here the self-match is excluded by index).

The network is a TorchScript file given by path (``sscd-weights``); nothing is downloaded: SSCD's
weights are CC-BY-NC 4.0, so this package neither bundles nor fetches them. Meta publishes no
sha256 for the file, so any file is accepted unless ``expected_sha256`` pins one; its sha256 is
always computed and carried with the results. ``torch.jit.load`` runs the TorchScript program in
the file (TorchScript ops, not arbitrary Python): load only a file you trust, or pin its sha256.
A missing file, one that is not TorchScript, or one whose output is not (N, dim) features raises
``SSCDUnavailable`` with the reason; callers record Sim Score as unavailable instead of failing.
Matching is exact (no approximate search): chunked matrix products with a running best.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.files import atomic_write, error_text

from .crops import DCR_CROP, dcr_crops
from .fid import sha256_file

log = logging.getLogger("flwr.iet_agc.evaluation")

SSCD_MODEL = "sscd_disc_large"  # ResNeXt101 32x4, 1024-d (SSCD's README); DCR's --arch resnet50_disc
SSCD_FILE = f"{SSCD_MODEL}.torchscript.pt"
SSCD_URL = f"https://dl.fbaipublicfiles.com/sscd-copy-detection/{SSCD_FILE}"  # CC-BY-NC 4.0
SSCD_DIM = 1024
SSCD_SHA256 = ""  # no digest is published (SSCD's README, DCR, IET-AGC_SD): pin one with expected_sha256
SIM_PERCENTILE = 95.0  # the Sim Score: DCR's sim_95pc
COPY_THRESHOLD = 0.5  # DCR's sim_gt_05pc: the share of generations whose best cosine is > 0.5


class SSCDUnavailable(RuntimeError):
    """The SSCD network could not be loaded or does not give features; the message says why."""


@dataclass(frozen=True)
class SSCDNetwork:
    """A loaded SSCD TorchScript network: call it on DCR crops to get (N, dim) features."""

    module: torch.nn.Module
    path: str
    sha256: str  # of the file, always computed (recorded beside the scores)
    dim: int
    device: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@dataclass(frozen=True)
class Matches:
    """Each query's best cosine similarity among the keys and the key's index (ties: the lowest)."""

    scores: torch.Tensor  # (Q,) float32
    index: torch.Tensor  # (Q,) int64


def load_sscd(path: str, device: str = "cpu", expected_sha256: str = SSCD_SHA256, dim: int = SSCD_DIM) -> SSCDNetwork:
    """The SSCD TorchScript network in ``path`` (the ``sscd-weights`` setting), checked by a probe.

    ``expected_sha256`` (a prefix will do; "" accepts any file) is checked before the file is
    loaded; ``dim`` is the feature size the probe must see (0: any). Cached per file state and
    device. Raises SSCDUnavailable naming the file and the reason.
    """
    label = f"sscd-weights file {path}"
    if not str(path).strip():
        raise SSCDUnavailable(
            f"sscd-weights is empty: Sim Score needs a local copy of {SSCD_FILE} (CC-BY-NC 4.0, never "
            f"downloaded by this package; from {SSCD_URL})"
        )
    try:
        resolved = Path(path).expanduser().resolve()
        stat = resolved.stat() if resolved.is_file() else None
    except (OSError, RuntimeError, ValueError) as err:  # name too long, unknown ~user, NUL
        raise SSCDUnavailable(f"{label}: {error_text(err)}") from err
    if stat is None:
        raise SSCDUnavailable(f"{label}: no such file")
    return _load(
        str(resolved), stat.st_size, stat.st_mtime_ns, str(device), expected_sha256.strip().lower(), dim, label
    )


@functools.lru_cache(maxsize=2)
def _load(path: str, size: int, mtime_ns: int, device: str, expected: str, dim: int, label: str) -> SSCDNetwork:
    """``load_sscd``'s work, cached; size and mtime key the cache, so a replaced file is read again."""
    try:
        digest = sha256_file(path)
    except OSError as err:
        raise SSCDUnavailable(f"{label}: cannot read it ({error_text(err)})") from err
    if expected and not digest.startswith(expected):
        raise SSCDUnavailable(f"{label} refused: its sha256 is {digest[:16]}..., not {expected[:16]}...")
    try:
        with warnings.catch_warnings():  # torch 2.14 marks torch.jit as deprecated; the files are TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location=device)
    except (RuntimeError, ValueError, OSError, EOFError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SSCDUnavailable(f"{label}: not a TorchScript file ({type(err).__name__}: {reason})") from err
    module.eval()
    found = _probe(module, device, label)
    if dim and found != dim:
        raise SSCDUnavailable(f"{label}: gives {found}-d features, not {dim} ({SSCD_MODEL}'s)")
    log.info("SSCD network %s (sha256 %s, %d-d)", path, digest, found)
    return SSCDNetwork(module, path, digest, found, device)


@torch.no_grad()
def _probe(module: torch.nn.Module, device: str, label: str) -> int:
    """The feature size of ``module`` on two DCR-sized crops; SSCDUnavailable when it gives no (2, D)."""
    try:
        out = module(torch.zeros(2, 3, DCR_CROP, DCR_CROP, device=device))
    except Exception as err:  # a TorchScript program can raise anything; report it, never crash the run
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SSCDUnavailable(f"{label}: fails on a 224x224 batch ({type(err).__name__}: {reason})") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SSCDUnavailable(f"{label}: gives {shape} for 2 images, not (2, features)")
    return int(out.shape[1])


@torch.no_grad()
def sscd_features(
    images: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """L2-normalised (N, D) float32 features (on the CPU) of ``model`` on DCR crops of ``images``.

    Images: (N, C, H, W) uint8 or [0, 1]; cropped and normalised batch by batch on ``device``
    (DCR normalises the features again after SSCD's own L2 norm; so does this).
    """
    feats = []
    for s in range(0, images.shape[0], batch_size):
        out = model(dcr_crops(images[s : s + batch_size].to(device)))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != min(batch_size, images.shape[0] - s):
            raise ValueError(f"the SSCD network must give (batch, D) features, got {getattr(out, 'shape', out)}")
        feats.append(F.normalize(out.float(), dim=1).cpu())
    return torch.cat(feats) if feats else torch.empty(0, 0)


@torch.no_grad()
def best_matches(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    exclude_self: bool = False,
    query_chunk: int = 1024,
    key_chunk: int = 8192,
    device: torch.device | str = "cpu",
) -> Matches:
    """Each query's largest dot product with the keys (cosines of L2-normalised rows) and its index.

    Exact: one (query_chunk, key_chunk) matrix product at a time, merged into a running best (a
    later chunk replaces only a strictly larger value, so ties go to the lowest index, as
    ``torch.max`` within a chunk). ``exclude_self``: queries and keys are the same rows and row i
    never matches itself (the background's rule). Memory O(query_chunk x key_chunk).
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"features must be (Q, D) and (K, D), got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if keys.shape[0] < 1 + exclude_self:
        raise ValueError(f"need at least {1 + exclude_self} key rows, got {keys.shape[0]}")
    if not (torch.isfinite(queries).all() and torch.isfinite(keys).all()):
        raise ValueError("features must be finite")
    q, k = queries.to(device, torch.float32), keys.to(device, torch.float32)
    scores = torch.empty(q.shape[0], device=q.device)
    index = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    for qs in range(0, q.shape[0], query_chunk):
        qb = q[qs : qs + query_chunk]
        best = torch.full((qb.shape[0],), -torch.inf, device=q.device)
        where = torch.zeros(qb.shape[0], dtype=torch.long, device=q.device)
        for ks in range(0, k.shape[0], key_chunk):
            sim = qb @ k[ks : ks + key_chunk].T
            if exclude_self:
                _mask_self(sim, qs, ks)
            value, at = sim.max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            where = torch.where(better, at + ks, where)
        scores[qs : qs + qb.shape[0]], index[qs : qs + qb.shape[0]] = best, where
    return Matches(scores.cpu(), index.cpu())


def _mask_self(sim: torch.Tensor, q_start: int, k_start: int) -> None:
    """Set the entries of a (query block, key block) product that pair a row with itself to -inf."""
    rows = torch.arange(sim.shape[0], device=sim.device)
    cols = rows + (q_start - k_start)
    inside = (cols >= 0) & (cols < sim.shape[1])
    sim[rows[inside], cols[inside]] = -torch.inf


def sim_scores(gen_feats: torch.Tensor, train_feats: torch.Tensor, **chunks) -> Matches:
    """Each generation's best cosine against the training images and the nearest one's index
    (DCR's ``simscores.topk(1)``); ``chunks``: ``best_matches``'s chunk sizes and device."""
    return best_matches(gen_feats, train_feats, **chunks)


def background_scores(train_feats: torch.Tensor, **chunks) -> Matches:
    """Each training image's best cosine against the other training images (DCR's background,
    ``sim(train, train)`` without the self-match); needs at least 2 images."""
    return best_matches(train_feats, train_feats, exclude_self=True, **chunks)


def percentile(values: torch.Tensor | np.ndarray, q: float = SIM_PERCENTILE) -> float:
    """The q-th percentile with numpy's default linear interpolation, as DCR's ``np.percentile``."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(
    scores: torch.Tensor, q: float = SIM_PERCENTILE, threshold: float = COPY_THRESHOLD, prefix: str = "sim"
) -> dict[str, float]:
    """``<prefix>_p95`` (the Sim Score for generations), ``<prefix>_mean`` and
    ``<prefix>_gt_0.5`` (share strictly above ``threshold``, DCR's ``sim_gt_05pc``)."""
    if scores.numel() == 0:
        raise ValueError("no scores to summarize")
    values = scores.double()
    return {
        f"{prefix}_p{q:g}": percentile(values.numpy(), q),
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_gt_{threshold:g}": float((values > threshold).double().mean()),
    }


@dataclass(frozen=True)
class SimScore:
    """One Sim Score evaluation: generations against training images, and the background."""

    matches: Matches  # per generation: best cosine, index of the nearest training image (the pairs grid)
    background: Matches | None  # per training image against the others; None when not computed
    sha256: str  # the SSCD file's ("" for a stand-in callable)

    def metrics(self) -> dict[str, float]:
        """``sim_p95`` (the Sim Score), ``sim_mean``, ``sim_gt_0.5`` and the same with ``sim_bg_``."""
        out = summarize(self.matches.scores)
        if self.background is not None:
            out |= summarize(self.background.scores, prefix="sim_bg")
        return out


def sim_score(
    generated: torch.Tensor,
    train: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    background: bool = True,
    train_features: torch.Tensor | None = None,
    query_chunk: int = 1024,
    key_chunk: int = 8192,
) -> SimScore:
    """Sim Score of generated images against the training images (Table II; DCR's computation).

    Parameters
    ----------
    generated, train : torch.Tensor
        (N, C, H, W) uint8 or [0, 1] images (grey repeated to RGB); DCR crops are made here.
    model : Callable
        An ``SSCDNetwork`` (``load_sscd``) or a stand-in giving (batch, D) features.
    batch_size : int (default: 64)
        Images per network pass (DCR's loaders: 64).
    device : torch.device | str (default: "cpu")
        Where the crops, the network and the matrix products run.
    background : bool (default: True)
        Also the train-vs-train background (needs at least 2 training images).
    train_features : torch.Tensor | None (default: None)
        The training images' features, when already computed (``cached_features``).
    query_chunk, key_chunk : int (default: 1024, 8192)
        Block sizes of the exact matching.
    """
    gen = sscd_features(generated, model, batch_size, device)
    ref = train_features if train_features is not None else sscd_features(train, model, batch_size, device)
    chunks = {"query_chunk": query_chunk, "key_chunk": key_chunk, "device": device}
    bg = background_scores(ref, **chunks) if background else None
    return SimScore(sim_scores(gen, ref, **chunks), bg, getattr(model, "sha256", ""))


def cached_features(
    images: torch.Tensor,
    key: str,
    model: Callable[[torch.Tensor], torch.Tensor],
    directory: Path | str,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``sscd_features`` of a reference set, read from ``directory/<key>.npy`` when present.

    The key must name everything the features depend on: the data set's fingerprint and the SSCD
    file's sha256 (``SSCDNetwork.sha256``). A file of another shape is recomputed and replaced.
    """
    path = Path(directory) / f"{key}.npy"
    if path.is_file():
        try:
            stored = np.load(path, allow_pickle=False)
            if stored.ndim == 2 and stored.shape[0] == images.shape[0]:
                return torch.from_numpy(stored)
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable SSCD feature cache %s: %s", path, err)
    feats = sscd_features(images, model, batch_size, device)
    try:
        atomic_write(path, lambda tmp: np.save(tmp, feats.numpy()), suffix=".npy")
    except OSError as err:  # a read-only cache is not worth failing an evaluation for
        log.warning("could not write SSCD feature cache %s: %s", path, err)
    return feats
