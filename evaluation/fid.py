"""FID with pytorch-fid's Inception network, or the reason it could not be computed.

Weights come from a configured file (``fid-weights``), torch.hub's cache, or pytorch-fid's
download into that cache. Whatever the source, the file's sha256 must be that of pytorch-fid's
released ``pt_inception-2015-12-05`` weights, and it is read with ``torch.load(weights_only=True)``,
which unpickles tensors and containers only and never runs code from the file. A missing, corrupt
or different file raises ``FIDUnavailable`` with the reason; callers record FID as unavailable
instead of failing the run. The network is assembled from pytorch-fid's building blocks here (its
own constructor would download with a full unpickler). Training-set statistics are computed once
per (data-set fingerprint, weights) and cached on disk.

``fid_authors_variant`` is the FID of the paper's text-to-image table, computed as DCR's
``metrics/fid.py`` (copied unchanged into liuxiao-guan/IET-AGC_SD) does it: its inputs are
normalised to [-1, 1] by the data loader and again by pytorch-fid's network, which then sees
[-3, 1]. It is NOT comparable with pytorch-fid's FID (``fid_score``) and is reported under its own name.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_fid.inception as pf
import torch
import torchvision

from ddpm.files import atomic_write
from ddpm.precision import FP32, Precision

from .bootstrap import DEFAULT_RESAMPLES, QualityScore, score_features
from .crops import normalize_half, resize_center_crop
from .frechet import model_features, rgb01, streamed_statistics

log = logging.getLogger("flwr.iet_agc.evaluation")  # a child of Flower's logger (flwr run --stream, flwr log)

DOWNLOAD_TAG = "pt_inception-2015-12-05"  # pytorch-fid's released FID weights
DEFAULT_CACHE = Path.home() / ".cache" / "iet-agc"
FID_WEIGHTS_URL = pf.FID_WEIGHTS_URL  # .../pt_inception-2015-12-05-6726825d.pth (pytorch-fid 0.3.0)
FID_WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[-1]
# sha256 of that file (95,628,359 bytes). Its first 8 hex digits are the ones in the file name, which
# torch.hub's check_hash convention makes the sha256 prefix; the full digest is the one published with
# the file by the projects that pin it (torch-fidelity hosts the same bytes).
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
AUTHORS_VARIANT_TAG = "dcr-double-norm"  # in the cache keys of the authors' variant's statistics


class FIDUnavailable(RuntimeError):
    """The Inception weights could not be loaded; the message says why."""


def cache_dir(setting: str = "") -> Path:
    """The ``fid-cache-dir`` setting, or ``~/.cache/iet-agc`` when it is empty."""
    return Path(setting).expanduser() if setting else DEFAULT_CACHE


def download_path() -> Path:
    """Where torch.hub (and so pytorch-fid) keeps the downloaded weights: ``<hub dir>/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def sha256_file(path: Path | str) -> str:
    """The file's sha256 (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_inception_weights(
    path: Path | str, expected_sha256: str = FID_WEIGHTS_SHA256, label: str = ""
) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, after checking that its sha256 starts with ``expected_sha256``.

    The default is the digest of pytorch-fid's release; tests pass the digest of a file they made.
    A file that differs is never unpickled; an accepted one is read with ``weights_only=True``.
    Raises FIDUnavailable naming ``label`` (default: the path) and the reason.
    """
    path = Path(path)
    label = label or f"Inception weights file {path}"
    expected = expected_sha256.strip().lower()
    if not expected:
        raise ValueError("expected_sha256 must not be empty")
    try:
        digest = sha256_file(path)
    except OSError as err:
        raise FIDUnavailable(f"{label}: cannot read it ({err.strerror or err})") from err
    if not digest.startswith(expected):
        raise FIDUnavailable(
            f"{label} refused: its sha256 is {digest[:16]}..., not {expected[:16]}... "
            f"({DOWNLOAD_TAG} weights from {FID_WEIGHTS_URL})"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FIDUnavailable(f"{label}: not a weights-only state dict ({type(err).__name__}: {reason})") from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise FIDUnavailable(f"{label}: not a state dict of tensors")
    return state


class PoolInception(pf.InceptionV3):
    """pytorch-fid's ``InceptionV3([3])`` (2048-d pool3 features), assembled from a given network.

    ``InceptionV3.__init__`` builds ``fid_inception_v3()``, which downloads its weights through
    torch.hub with a full unpickler; this constructor takes the network instead and lays out the
    same four blocks (pytorch-fid 0.3.0), so ``forward`` (resize to 299, scale to [-1, 1]) is
    pytorch-fid's own.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        torch.nn.Module.__init__(self)  # not InceptionV3.__init__: it would download
        self.resize_input = True
        self.normalize_input = True
        self.output_blocks = [pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]
        self.last_needed_block = self.output_blocks[0]
        pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)
        self.blocks = torch.nn.ModuleList(
            [
                torch.nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool),
                torch.nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(kernel_size=3, stride=2)),
                torch.nn.Sequential(
                    net.Mixed_5b,
                    net.Mixed_5c,
                    net.Mixed_5d,
                    net.Mixed_6a,
                    net.Mixed_6b,
                    net.Mixed_6c,
                    net.Mixed_6d,
                    net.Mixed_6e,
                ),
                torch.nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d((1, 1))),
            ]
        )
        for param in self.parameters():
            param.requires_grad = False


def fid_inception_net(state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """``pytorch_fid.inception.fid_inception_v3()`` without its download: torchvision's Inception v3
    with pytorch-fid's FID blocks, loaded (strictly) from ``state``, or left random when None."""
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    if state is not None:
        net.load_state_dict(state)
    return net


@functools.lru_cache(maxsize=2)
def inception(weights: str = "", device: str = "cpu", expected_sha256: str = FID_WEIGHTS_SHA256) -> torch.nn.Module:
    """pytorch-fid's pool3 InceptionV3 from ``weights`` (a .pth file) or torch.hub's cache/download.

    Either file must have the sha256 ``expected_sha256`` (a prefix is enough; default: pytorch-fid's
    release). Raises FIDUnavailable with the reason (offline, missing, corrupt or different file).
    """
    if weights:
        label = f"fid-weights file {weights}"
        try:
            path = Path(weights).expanduser()
            found = path.is_file()
        except (OSError, RuntimeError, ValueError) as err:  # name too long, unknown ~user, NUL
            raise FIDUnavailable(f"{label}: {err}") from err
        if not found:
            raise FIDUnavailable(f"{label}: no such file")
    else:
        path = download_path()
        label = f"cached Inception weights {path}"
        if not path.is_file():
            log.info("downloading the FID Inception weights from %s to %s", FID_WEIGHTS_URL, path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # torch.hub writes to a temporary file and keeps it only when its sha256 matches
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=expected_sha256, progress=False)
            except (OSError, RuntimeError) as err:  # offline (URLError is an OSError), hash mismatch
                reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise FIDUnavailable(
                    f"Inception weights unavailable (download from {FID_WEIGHTS_URL}): {type(err).__name__}: {reason}"
                ) from err
    try:
        state = load_inception_weights(path, expected_sha256, label)
    except FIDUnavailable as err:
        if weights:
            raise
        raise FIDUnavailable(f"{err}; delete the file to download it again") from err
    try:
        net = fid_inception_net(state)
    except RuntimeError as err:  # a file with the expected hash but another layout (only with a custom hash)
        raise FIDUnavailable(f"{label}: not pytorch-fid's Inception layout ({str(err).splitlines()[0]})") from err
    return PoolInception(net).to(device).eval()


def random_inception(device: torch.device | str = "cpu") -> torch.nn.Module:
    """pytorch-fid's network with random weights: for timings and tests only, never for a reported FID."""
    return PoolInception(fid_inception_net(None)).to(device).eval()


def weights_tag(weights: str = "") -> str:
    """Names the Inception weights in cache keys: the download's tag, or a hash of the weights file."""
    if not weights:
        return DOWNLOAD_TAG
    path = Path(weights).expanduser()
    stat = path.stat()
    return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    return "w" + sha256_file(path)[:16]


@torch.no_grad()
def inception_features(
    images01: torch.Tensor, model: torch.nn.Module, batch_size: int = 200, device: torch.device | str = "cpu"
) -> np.ndarray:
    """2048-d pool3 features of images (uint8 or float in [0, 1]; grey is repeated to 3 channels).

    pytorch-fid's network resizes to 299x299 and rescales to [-1, 1] itself.
    """
    feats = [
        model_features(model, rgb01(images01[s : s + batch_size]).to(device)).double().cpu()
        for s in range(0, images01.shape[0], batch_size)
    ]
    return torch.cat(feats).numpy() if feats else np.empty((0, 0))


def authors_fid_inputs(images01: torch.Tensor) -> torch.Tensor:
    """DCR's FID input transform on [0, 1] images: ``Resize(299), CenterCrop(299), Normalize(0.5, 0.5)``.

    ``metrics/fid.py``'s ``get_activations`` (somepago/DCR; the same file in IET-AGC_SD) gives
    [-1, 1] tensors to pytorch-fid's ``InceptionV3`` (``normalize_input=True``), whose ``2x - 1``
    makes them [-3, 1]: x in [0, 1] reaches the first convolution as ``4x - 3``.
    """
    return normalize_half(resize_center_crop(images01, 299, 299))


class AuthorsVariantInputs(torch.nn.Module):
    """``model`` behind DCR's FID transform: with pytorch-fid's network, the authors' double normalisation."""

    def __init__(self, model: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> object:
        return self.model(authors_fid_inputs(x))


def cached_statistics(
    images: torch.Tensor,
    key: str,
    model: Callable[[torch.Tensor], object],
    directory: Path | str,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """``streamed_statistics`` of a reference set, read from ``directory/<key>.npz`` when present.

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
    mu, sigma = streamed_statistics(images, model, batch_size, device, "FID features of the training set")
    try:
        atomic_write(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma, count=images.shape[0]), suffix=".npz")
    except OSError as err:  # a read-only cache is not worth failing an evaluation for
        log.warning("could not write FID statistics cache %s: %s", path, err)
    return mu, sigma


def fid_score(
    generated01: torch.Tensor,
    reference01: torch.Tensor,
    weights: str = "",
    device: torch.device | str = "cpu",
    *,
    floor01: torch.Tensor | None = None,
    batch_size: int = 50,
    reference_key: str = "",
    cache: str = "",
    model: Callable[[torch.Tensor], object] | None = None,
    expected_sha256: str = FID_WEIGHTS_SHA256,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    precision: Precision = FP32,
    authors_variant: bool = False,
) -> QualityScore:
    """FID of generated images against reference images, its split-sample interval over the generated
    images and its floor (the FID of as many held-out real images): the one FID entry point.

    Parameters
    ----------
    generated01 : torch.Tensor
        Generated images (N, C, H, W), uint8 or float in [0, 1]; grey is repeated to RGB.
    reference01 : torch.Tensor
        Reference images (the training set), same forms; their statistics are streamed batch by batch.
    weights : str (default: "")
        A pytorch-fid Inception weights file; "" takes torch.hub's cache (downloading into it).
    device : torch.device | str (default: "cpu")
        Where the network and the interval's resamples run (2048-d covariances: a GPU makes them cheap).
    floor01 : torch.Tensor | None (default: None)
        Held-out real images; the first N give the floor. None (or fewer than 2): no floor.
    batch_size : int (default: 50)
        Images per pass of the network.
    reference_key : str (default: "")
        Names the reference set (data set, fingerprint): its statistics are cached under ``cache``/fid.
    cache : str (default: "")
        The ``fid-cache-dir`` setting ("" is ``~/.cache/iet-agc``).
    model : Callable[[torch.Tensor], object] | None (default: None)
        A feature extractor that replaces the Inception network (tests, other features).
    expected_sha256 : str (default: FID_WEIGHTS_SHA256)
        The weights file's sha256 (a prefix will do); FIDUnavailable when no such file can be had.
    resamples : int (default: DEFAULT_RESAMPLES)
        Random splits of the interval (>= 2; a test that only wants ``.value`` passes 2).
    seed : int (default: 0)
        Seeds the resampling.
    precision : Precision (default: FP32)
        The network's forward under autocast (features back in fp32; statistics in fp64); the
        training set's cached statistics are keyed by it.
    authors_variant : bool (default: False)
        The authors' double-normalised inputs (``authors_fid_inputs``) before the network, for
        every image set (generated, reference, floor); statistics cached under their own key.
        Not comparable with pytorch-fid's FID: report it as ``fid_authors_variant``.
    """
    if model is None:
        model = inception(weights, str(device), expected_sha256)
        tag = weights_tag(weights)
    else:
        tag = f"custom-{type(model).__name__}"
    if authors_variant:
        model, tag = AuthorsVariantInputs(model), f"{tag}-{AUTHORS_VARIANT_TAG}"
    if precision.dtype is not None:
        model, tag = precision.features(model, device), f"{tag}-{precision.name}"
    feats = torch.from_numpy(inception_features(generated01, model, batch_size, device))
    if reference_key:
        directory = cache_dir(cache) / "fid"
        mu_r, sigma_r = cached_statistics(reference01, f"{reference_key}-{tag}", model, directory, batch_size, device)
    else:
        mu_r, sigma_r = streamed_statistics(reference01, model, batch_size, device)
    floor = None
    if floor01 is not None and floor01.shape[0] >= 2:
        floor = torch.from_numpy(inception_features(floor01[: feats.shape[0]], model, batch_size, device))
    return score_features(feats, mu_r, sigma_r, floor, resamples=resamples, seed=seed, device=device)


def fid_authors_variant(generated01: torch.Tensor, reference01: torch.Tensor, *args, **kwargs) -> QualityScore:
    """The authors' FID (Table II of the paper): ``fid_score`` with ``authors_variant=True``.

    pytorch-fid's network and weights, DCR's ``Resize(299), CenterCrop(299)`` and its inputs in
    [-3, 1] (normalised twice); NOT comparable with pytorch-fid's FID. Same arguments as ``fid_score``.
    """
    return fid_score(generated01, reference01, *args, authors_variant=True, **kwargs)
