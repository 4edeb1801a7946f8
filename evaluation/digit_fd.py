"""``digit_fd``: Fréchet distance on the features of a small digit classifier (digits data set only).

The offline stand-in for FID (the usual MNIST-style practice): Inception weights cannot be had
offline and mean little on 8x8 digits. The classifier is trained by this code on the digits
hold-out split (never on the training images it will be compared with), deterministically on the
CPU in a few seconds, and cached on disk. It is labelled ``digit_fd`` and is never called FID.

The classifier sees a third of the held-out digits (``NET_SHARE``); the other two thirds, which
neither it nor the DDPM ever saw, give the floor: digit_fd of as many real digits as were generated.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.data import to_unit_range
from ddpm.files import atomic_write

from .bootstrap import DEFAULT_RESAMPLES, QualityScore, score_features
from .frechet import frechet_distance_stats, streamed_statistics

log = logging.getLogger("flwr.iet_agc.evaluation")  # a child of Flower's logger (flwr run --stream, flwr log)

DIGIT_SIZE = 8  # the classifier sees every image at sklearn's native 8x8
NET_VERSION = 2  # bump when the architecture or training recipe changes (invalidates caches)
MIN_HOLDOUT = 20
NET_SHARE = 1 / 3  # of the held-out digits train the classifier; the rest are the floor's real digits


class DigitNet(nn.Module):
    """MLP 64 -> 128 -> 64 -> 10 on 8x8 grey images in [0, 1]; ``forward`` gives the 64-d features.

    Features are the pre-activations of the 64-unit layer (no dead ReLU units, so the covariance
    stays full rank).
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(DIGIT_SIZE**2, 128), nn.ReLU(), nn.Linear(128, 64))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(64, 10))

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 1, 8, 8): channel mean (grey repeated to RGB is undone), area resize."""
        x = x.float().mean(1, keepdim=True)
        if x.shape[-2:] != (DIGIT_SIZE, DIGIT_SIZE):
            x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="area")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))


def train_digit_net(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, steps: int = 200) -> DigitNet:
    """Full-batch Adam on (uint8 images, labels), seeded, on one CPU thread: the same weights every time.

    One thread also keeps these tiny matrix products fast on a busy machine (no thread spin-waits).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet()
    x, y = to_unit_range(images), labels.long()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net.logits(x), y).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@torch.no_grad()
def accuracy(net: DigitNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images classified correctly (a sanity check of the features)."""
    return float((net.logits(to_unit_range(images)).argmax(1) == labels).double().mean())


@dataclass
class DigitFD:
    """The trained classifier and the training images' feature statistics, ready to score samples."""

    net: DigitNet
    mu: np.ndarray
    sigma: np.ndarray
    accuracy: float  # on the training split, which the classifier never saw
    floor_images: torch.Tensor | None = None  # held-out digits the classifier never saw (uint8)

    def __call__(self, generated01: torch.Tensor) -> float:
        """digit_fd of generated images (uint8 or [0, 1]) against the training images."""
        return frechet_distance_stats(
            *streamed_statistics(generated01, self.net, batch_size=4096, desc="digit_fd features"), self.mu, self.sigma
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's 64-d features of images (uint8 or [0, 1])."""
        x = to_unit_range(images)
        return self.net(x)

    def score(self, generated01: torch.Tensor, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> QualityScore:
        """digit_fd with its split-sample interval over the generated images and its floor (same count)."""
        floor = None if self.floor_images is None else self.features(self.floor_images)
        return score_features(self.features(generated01), self.mu, self.sigma, floor, resamples=resamples, seed=seed)


def load_digit_fd(
    train: torch.Tensor,
    train_labels: torch.Tensor | None,
    holdout: torch.Tensor,
    holdout_labels: torch.Tensor,
    cache: Path | str,
    seed: int = 0,
) -> DigitFD:
    """Train (or load from ``cache``/digit_fd) the classifier on a seeded third of the hold-out split
    (at least ``MIN_HOLDOUT`` images); fit the training images' statistics; keep the rest for the floor."""
    if holdout.shape[0] < MIN_HOLDOUT:
        raise ValueError(f"holdout: the digit classifier needs >= {MIN_HOLDOUT} held-out images, got {len(holdout)}")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(holdout.shape[0]))
    share = max(MIN_HOLDOUT, int(holdout.shape[0] * NET_SHARE))
    floor_images = holdout[order[share:]]
    holdout, holdout_labels = holdout[order[:share]], holdout_labels[order[:share]]
    h = hashlib.sha256(holdout.contiguous().numpy().tobytes())
    h.update(holdout_labels.numpy().astype(np.int64).tobytes())
    path = Path(cache) / "digit_fd" / f"digitnet-v{NET_VERSION}-seed{seed}-{h.hexdigest()[:16]}.pt"
    net = None
    if path.is_file():
        try:
            net = DigitNet()
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            net.eval()
        except Exception as err:  # corrupt cache: retrain
            log.warning("retraining digit classifier, cache %s unreadable: %s", path, err)
            net = None
    if net is None:
        net = train_digit_net(holdout, holdout_labels, seed)
        try:
            atomic_write(path, lambda tmp: torch.save(net.state_dict(), tmp))
        except OSError as err:
            log.warning("could not cache the digit classifier at %s: %s", path, err)
    acc = accuracy(net, train, train_labels) if train_labels is not None else float("nan")
    mu, sigma = streamed_statistics(train, net, batch_size=4096, desc="digit_fd features")
    return DigitFD(net, mu, sigma, acc, floor_images if len(floor_images) >= 2 else None)
