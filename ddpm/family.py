"""The model seam: what the trainer, AGC/TAA, the sampler, the evaluator and the export ask of a
family of diffusion models, and today's pixel-space DDPM as its first family.

A family says how an image becomes the network's input (the pixels themselves, or a VAE's
latent), what conditions the network (nothing, a class, a caption's embedding), what it predicts
(diffusers' ``prediction_type``: epsilon, v_prediction, sample) and the per-sample loss against
that (eq. 8 reads one loss per sample), how to sample (DDIM, with or without guidance) and what
pipeline it exports. Images always travel as pixels in [-1, 1], so TAA augments pixels and AGC
reads the family's per-sample loss whatever the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from .precision import FP32, Precision
from .schedule import ddim_sample, draw_class_labels, model_classes, train_scheduler

Condition = Tensor | None  # what conditions each image: class labels, token ids, a mask; None: nothing
Schedule = SchedulerMixin  # a diffusers noise schedule (DDPMScheduler, DDIMScheduler, ...)


@dataclass(frozen=True)
class Sampling:
    """How a family samples: DDIM ``steps``, images per batch, the ``seed`` (image i depends on
    (seed, i) alone, whatever the batch size), the device and the network's ``precision``."""

    steps: int = 50
    batch_size: int = 256
    seed: int = 0
    device: torch.device | str = "cpu"
    precision: Precision = FP32


@runtime_checkable
class DiffusionFamily(Protocol):
    """One family of diffusion models, as training, sampling and export see it.

    Attributes
    ----------
    name : str
        The family's name in logs and errors.
    prediction_type : str
        What the network predicts, in diffusers' words: ``epsilon``, ``v_prediction`` or ``sample``.
    """

    name: str
    prediction_type: str

    def train_scheduler(self) -> Schedule:
        """The noise schedule training draws timesteps from and noises inputs with."""
        ...

    def encode(self, images: Tensor) -> Tensor:
        """Pixels in [-1, 1], (B, C, H, W) -> what the network denoises (the same, or a latent)."""
        ...

    def noise_like(self, images: Tensor) -> Tensor:
        """Standard normal noise in the space the network denoises, for a batch of pixels."""
        ...

    def draw_condition(self, model: nn.Module, num_images: int, seed: int) -> Condition:
        """The conditions to sample ``num_images`` evaluation images with (None: unconditional),
        condition i a function of (seed, i) alone."""
        ...

    def check_condition(self, model: nn.Module, condition: Condition, n: int) -> Condition:
        """The condition of ``n`` training images (labels, token ids), checked once per shard;
        a ValueError says what the model expects."""
        ...

    def flip_condition(self, condition: Condition, flip: Tensor) -> Condition:
        """The conditions of a batch whose images at ``flip`` (B,) bool were flipped horizontally
        (a pixel mask flips with its image; labels and captions stay)."""
        ...

    def per_sample_loss(
        self, model: nn.Module, scheduler: Schedule, x0: Tensor, t: Tensor, noise: Tensor, condition: Condition = None
    ) -> Tensor:
        """One loss per sample (B,) of the network on encoded ``x0`` noised to ``t`` with ``noise``."""
        ...

    def sample(self, model: nn.Module, num_images: int, how: Sampling, condition: Condition = None) -> Tensor:
        """``num_images`` images in [0, 1] as pixels, image i a function of (``how.seed``, i) alone."""
        ...

    def pipeline(self, model: nn.Module) -> DiffusionPipeline:
        """The diffusers pipeline a finished run saves (``save_pretrained``) for users to load."""
        ...


@dataclass(frozen=True)
class PixelDDPM:
    """DDPM in pixel space (Ho et al.): a ``UNet2DModel`` predicting the noise, unconditional or
    conditioned on a class (``num_class_embeds``), sampled with DDIM, saved as a ``DDPMPipeline``.

    The loss is eq. 1 per sample: the mean over pixels of ``(eps_theta(x_t, t[, y]) - eps)^2``.
    """

    name: str = "pixel-ddpm"
    prediction_type: str = "epsilon"

    def train_scheduler(self) -> DDPMScheduler:
        return train_scheduler()

    def encode(self, images: Tensor) -> Tensor:
        return images  # the network denoises the pixels themselves

    def noise_like(self, images: Tensor) -> Tensor:
        return torch.randn_like(images)

    def check_condition(self, model: nn.Module, condition: Condition, n: int) -> Condition:
        """Class labels: given exactly when the model has a class embedding, one per image, each
        a valid class index."""
        classes = getattr(getattr(model, "config", None), "num_class_embeds", None)  # stand-in models: none
        if classes is None:
            if condition is not None:
                raise ValueError("class-conditional: labels were given but the model has no class embedding")
            return None
        if condition is None:
            raise ValueError(f"class-conditional: the model is conditioned on {classes} classes but got no labels")
        labels = torch.as_tensor(condition, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"class-conditional: expected {n} labels (one per image), got shape {tuple(labels.shape)}")
        low, high = (int(labels.min()), int(labels.max())) if n else (0, 0)
        if not 0 <= low <= high < classes:
            raise ValueError(f"class-conditional: labels must be in [0, {classes - 1}], got {low}..{high}")
        return labels

    def flip_condition(self, condition: Condition, flip: Tensor) -> Condition:
        return condition  # class labels do not flip

    def per_sample_loss(
        self, model: nn.Module, scheduler: Schedule, x0: Tensor, t: Tensor, noise: Tensor, condition: Condition = None
    ) -> Tensor:
        """Mean over pixels of the squared error of the predicted noise, one value per sample."""
        noisy = scheduler.add_noise(x0, noise, t)
        extra = {} if condition is None else {"class_labels": condition}  # unconditional: the plain call
        pred = model(noisy, t, **extra).sample.float()  # the loss in fp32 under any autocast (AGC reads it)
        return (pred - noise).pow(2).flatten(1).mean(1)

    def sample(self, model: nn.Module, num_images: int, how: Sampling, condition: Condition = None) -> Tensor:
        """DDIM (eta 0, ``ddpm.schedule.ddim_sample``); a class-conditional model without labels
        gets them drawn from the seed."""
        steps, batch, seed, device = how.steps, how.batch_size, how.seed, how.device
        return ddim_sample(
            model,
            num_images,
            steps=steps,
            batch_size=batch,
            seed=seed,
            device=device,
            class_labels=condition,
            precision=how.precision,
        )

    def draw_condition(self, model: nn.Module, num_images: int, seed: int) -> Condition:
        """Class labels uniform over the model's classes (``draw_class_labels``), or None."""
        classes = model_classes(model)
        return None if classes is None else draw_class_labels(num_images, classes, seed)

    def pipeline(self, model: nn.Module) -> DDPMPipeline:
        if not isinstance(model, UNet2DModel):
            raise TypeError(f"pixel-ddpm exports a UNet2DModel, got {type(model).__name__}")
        return DDPMPipeline(unet=model, scheduler=train_scheduler())


PIXEL_DDPM = PixelDDPM()
