"""Ambient Diffusion (Daras et al., NeurIPS 2023) as a model family behind the seam.

Each training image is seen only through a fixed mask A (each pixel survives with 1 - p, shared
across channels) and a further mask B (survival 1 - delta); the network takes ``[A*B*x_t, A*B]``
(2C channels), predicts x0, and is trained on the pixels of A: the further-hidden pixels of A
teach it to predict what it cannot see, so it never learns from pixels outside A. As the
authors' code (giannisdaras/ambient-diffusion):

- ``training/dataset.py`` ``Dataset.__getitem__`` (``corruption_pattern = "dust"``): A and then
  B drawn once per image from numpy's generator seeded by the image's index
  (``np.random.seed(raw_idx)``), so both are fixed, B included; ours seeds by (run seed, image
  id), so they are also the same in every round and shard, and differ between a sweep's seeds.
  Shared across channels as their ``mask_full_rgb = True`` (their default draws per channel).
- ``training/loss.py`` ``AmbientVPLoss``: the loss backed (``training_loop.py``: ``loss = val_loss``)
  is ``weight * (A * (D - y))^2`` with ``weight = 1 / sigma^2``, i.e. SNR(t) = abar_t / (1 - abar_t)
  in DDPM's terms; their ``train_loss`` over A*B is only logged. Not clipped there; ``max_snr``
  clips it here (inf: as theirs). They sum over pixels, we average (a constant factor); their t is
  continuous (EDM's VP sigma), ours DDPM's 1000 steps; their ``VPPrecond`` adds the masked input as
  a skip (D = x - sigma F), ours is the plain UNet's x0 output.
- ``eval.py`` ``ambient_sampler``: see ``ddpm.ambient_pipeline``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from .ambient_pipeline import AmbientPipeline, ambient_ddim, initial_noise, sampling_masks
from .family import Condition, Sampling, Schedule
from .progress import progress
from .schedule import train_scheduler

AMBIENT_STREAM = 4  # numpy streams (seed, AMBIENT_STREAM, id): apart from the added noise's (clients.input_noise)


def ambient_masks(ids: Sequence[int] | np.ndarray, size: tuple[int, int], p: float, delta: float, seed: int) -> Tensor:
    """Each image's ``[A, A*B]`` (len(ids), 2, H, W) float 0/1: A keeps a pixel with probability
    1 - p, B with 1 - delta; row i a function of (seed, ids[i]) alone (their ``dataset.py``: A, then
    B, from one generator per image), so an image has its masks in any shard, round or order."""
    rows = []
    for i in ids:
        rng = np.random.default_rng([seed, AMBIENT_STREAM, int(i)])
        a = rng.random(size) >= p
        b = rng.random(size) >= delta
        rows.append(np.stack([a, a & b]))
    return torch.from_numpy(np.stack(rows).astype(np.float32)) if rows else torch.empty((0, 2, *size))


def snr(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """SNR(t) = abar_t / (1 - abar_t), (B,): their VP loss weight 1 / sigma^2 (``AmbientVPLoss``)."""
    abar = alphas_cumprod[t]
    return abar / (1 - abar)


def masked_x0_loss(pred: Tensor, x0: Tensor, mask: Tensor, weight: Tensor) -> Tensor:
    """``weight * (mask * (pred - x0))^2`` averaged over all C*H*W pixels, one value per sample (B,):
    their ``AmbientVPLoss`` summed over the image (zeros outside the mask), per pixel as eq. 1 is."""
    return weight * (mask * (pred - x0)).pow(2).flatten(1).mean(1)


def ambient_scheduler() -> DDIMScheduler:
    """DDIM on the training betas, the network's output read as x0 (clipped to [-1, 1])."""
    return DDIMScheduler.from_config(train_scheduler().config, prediction_type="sample", clip_sample=True)


@dataclass(frozen=True)
class AmbientFamily:
    """Ambient Diffusion in pixel space: a ``UNet2DModel`` with 2C inputs predicting x0, trained
    on masked images, sampled with DDIM through fixed random masks, saved as an ``AmbientPipeline``.

    Parameters
    ----------
    p : float (default: 0.4)
        A's corruption: each pixel of a training image is hidden with probability p (their default 0.4).
    delta : float (default: 0.1)
        B's further corruption of A's pixels (their default 0.1).
    max_snr : float (default: inf)
        The loss weight SNR(t) clipped at this value (inf: unclipped, as their ``AmbientVPLoss``).
    """

    p: float = 0.4
    delta: float = 0.1
    max_snr: float = math.inf
    name: str = "ambient"
    prediction_type: str = "sample"

    @property
    def survival(self) -> float:
        """The sampling masks' survival (1 - p)(1 - delta), as their ``eval.py``."""
        return (1 - self.p) * (1 - self.delta)

    def train_scheduler(self) -> DDPMScheduler:
        return train_scheduler()  # the forward process only (add_noise, alphas_cumprod)

    def encode(self, images: Tensor) -> Tensor:
        return images

    def noise_like(self, images: Tensor) -> Tensor:
        return torch.randn_like(images)

    def check_condition(self, model: nn.Module, condition: Condition, n: int) -> Condition:
        """The masks ``[A, A*B]`` (n, 2, H, W) of 0/1, for a model with twice as many inputs as outputs."""
        cfg = getattr(model, "config", None)
        if cfg is not None and cfg.in_channels != 2 * cfg.out_channels:
            raise ValueError(
                f"ambient: the model needs 2C input channels (image and mask), got in_channels "
                f"{cfg.in_channels} for out_channels {cfg.out_channels}"
            )
        if condition is None or condition.ndim != 4 or tuple(condition.shape[:2]) != (n, 2):
            shape = None if condition is None else tuple(condition.shape)
            raise ValueError(f"ambient: expected the masks [A, A*B] of {n} images, shape ({n}, 2, H, W), got {shape}")
        if not bool(((condition == 0) | (condition == 1)).all()):
            raise ValueError("ambient: masks must be 0/1")
        return condition.float()

    def flip_condition(self, condition: Condition, flip: Tensor) -> Condition:
        """The masks flip with their images, so the pixels the network sees stay those of A."""
        return torch.where(flip[:, None, None, None], condition.flip(-1), condition)

    def per_sample_loss(
        self, model: nn.Module, scheduler: Schedule, x0: Tensor, t: Tensor, noise: Tensor, condition: Condition = None
    ) -> Tensor:
        """SNR(t)-weighted squared error of the predicted x0 over A's pixels (``masked_x0_loss``),
        the network fed ``[A*B*x_t, A*B]``."""
        a, seen = condition[:, :1], condition[:, 1:].expand_as(x0)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = model(torch.cat([seen * noisy, seen], dim=1), t).sample.float()  # fp32 loss under autocast
        weight = snr(scheduler.alphas_cumprod, t).clamp(max=self.max_snr)
        return masked_x0_loss(pred, x0, a, weight)

    def draw_condition(self, model: nn.Module, num_images: int, seed: int) -> Condition:
        return None  # unconditional; the sampling masks are drawn inside ``sample``

    @torch.no_grad()
    def sample(self, model: nn.Module, num_images: int, how: Sampling, condition: Condition = None) -> Tensor:
        """``ambient_ddim`` batch by batch, images in [0, 1]; image i a function of (seed, i) alone,
        the same images ``AmbientPipeline(seed=how.seed)`` gives."""
        if condition is not None:
            raise ValueError("ambient: samples unconditionally (class-conditional is refused with ambient)")
        model = model.to(how.device).eval()
        cfg = model.config
        noise = initial_noise(num_images, (cfg.out_channels, cfg.sample_size, cfg.sample_size), how.seed)
        masks = sampling_masks(num_images, cfg.sample_size, self.survival, how.seed)
        scheduler = ambient_scheduler()
        scheduler.set_timesteps(how.steps, device=how.device)
        out = []
        how.precision.prepare(model)
        with progress(num_images, f"Ambient DDIM sampling ({how.steps} steps)", "img") as bar:
            for start in range(0, num_images, how.batch_size):
                rows = slice(start, start + how.batch_size)
                with how.precision.autocast(torch.device(how.device)):
                    x = ambient_ddim(model, scheduler, noise[rows].to(how.device), masks[rows].to(how.device))
                out.append(((x + 1) / 2).cpu())
                bar.update(x.shape[0])
        how.precision.release(model)
        return torch.cat(out) if out else torch.empty((0, *noise.shape[1:]))

    def pipeline(self, model: nn.Module) -> AmbientPipeline:
        return AmbientPipeline(unet=model, scheduler=ambient_scheduler(), survival=self.survival)
