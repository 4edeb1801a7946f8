"""Ambient Diffusion's sampler (Daras et al., NeurIPS 2023) as a diffusers pipeline.

The network takes ``[M * x_t, M]`` (2C channels) and predicts x0; every DDIM step derives epsilon
from that prediction (clipped to [-1, 1], as their ``eval.py`` ``ambient_sampler`` clips the
network's output). ``M`` is one random mask per image of survival ``(1 - p)(1 - delta)``, shared
across channels and fixed over the whole trajectory (their ``ambient_sampler`` with
``num_masks = 1``, ``survival_probability = (1 - corruption_probability) * (1 - delta_probability)``).
Theirs steps EDM's Heun sampler over a sigma grid; ours steps DDIM over the training schedule, as
this project samples every model.

This file imports only torch, numpy and diffusers: ``AmbientPipeline.save_pretrained`` copies it
into the saved folder as ``pipeline.py``, so the folder loads without this project installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder)
    images = pipe(batch_size=16, seed=0).images
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel

MASK_STREAM = 3  # numpy stream (seed, MASK_STREAM) of the sampling masks, apart from the noise's torch stream


def sampling_masks(num_images: int, size: int, survival: float, seed: int) -> torch.Tensor:
    """(num_images, 1, size, size) float 0/1 masks, each pixel kept with probability ``survival``;
    mask i a function of (seed, i) alone (sequential draws of one generator)."""
    rng = np.random.default_rng([seed, MASK_STREAM])
    return torch.from_numpy((rng.random((num_images, 1, size, size)) < survival).astype(np.float32))


def initial_noise(num_images: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """The trajectories' starting noise, image i a function of (seed, i): as ``ddpm.schedule.ddim_sample``."""
    return torch.randn((num_images, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ambient_ddim(unet: UNet2DModel, scheduler: DDIMScheduler, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """DDIM (eta 0) from ``noise`` over ``scheduler.timesteps`` (set them first), the network fed
    ``[M * x_t, M]`` with one fixed mask per image; returns x0 in [-1, 1].

    ``scheduler`` predicts ``sample``: its step derives epsilon = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    from the clipped x0 (``use_clipped_model_output``).
    """
    x = noise
    seen = masks.to(noise).expand_as(noise)
    for t in scheduler.timesteps:
        x0 = unet(torch.cat([seen * x, seen], dim=1), t).sample.float()  # the step in fp32 under autocast
        x = scheduler.step(x0, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)


class AmbientPipeline(DiffusionPipeline):
    """An Ambient Diffusion model: a 2C-channel x0-predicting ``UNet2DModel`` and its DDIM scheduler.

    Parameters
    ----------
    unet : UNet2DModel
        The denoiser: ``in_channels`` = 2 * ``out_channels`` (the masked image and the mask).
    scheduler : DDIMScheduler
        DDIM with ``prediction_type = "sample"`` and ``clip_sample = True``.
    survival : float (default: 1.0)
        The sampling masks' survival probability, ``(1 - p)(1 - delta)`` of the training corruption.
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, survival: float = 1.0) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(survival=float(survival))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        seed: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """``batch_size`` images from ``num_inference_steps`` DDIM steps; image i a function of
        (``seed``, i). ``output_type``: ``pil``, ``np`` (N, H, W, C) or ``pt`` (N, C, H, W), in [0, 1]."""
        cfg = self.unet.config
        channels, size = cfg.out_channels, cfg.sample_size
        noise = initial_noise(batch_size, (channels, size, size), seed).to(self.device)
        masks = sampling_masks(batch_size, size, self.config.survival, seed)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        images = (ambient_ddim(self.unet, self.scheduler, noise, masks) + 1) / 2
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            images = self.numpy_to_pil(images) if output_type == "pil" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' folder, plus this file as ``pipeline.py`` (``custom_pipeline=folder`` loads it)."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(__file__, Path(save_directory) / "pipeline.py")
