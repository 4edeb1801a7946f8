"""DDPM noise schedule (linear betas 1e-4..0.02, T=1000, epsilon prediction) and DDIM sampling."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .precision import FP32, Precision
from .progress import progress

NUM_TRAIN_TIMESTEPS = 1000
LABEL_STREAM = 1  # labels come from numpy's stream (seed, LABEL_STREAM), apart from the noise's torch stream


def train_scheduler() -> DDPMScheduler:
    """The training noise schedule of DDPM (Ho et al.), as the paper uses it."""
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )


def sampling_scheduler() -> DDIMScheduler:
    """DDIM with the same betas; x0 predictions clipped to [-1, 1] (authors' evaluation)."""
    return DDIMScheduler.from_config(train_scheduler().config, clip_sample=True)


def draw_class_labels(num_images: int, num_classes: int, seed: int) -> torch.Tensor:
    """Labels for class-conditional sampling: uniform over 0..C-1, as the authors' evaluation
    (``random.randint`` per image), from numpy's generator seeded with ``(seed, LABEL_STREAM)``, a
    stream apart from the noise's. Label i depends only on (seed, i), not on ``num_images``."""
    if num_classes < 1:
        raise ValueError(f"class-conditional: need at least one class, got {num_classes}")
    rng = np.random.default_rng([seed, LABEL_STREAM])
    return torch.from_numpy(rng.integers(0, num_classes, size=num_images, dtype=np.int64))


def model_classes(model: UNet2DModel) -> int | None:
    """The number of classes a UNet is conditioned on (diffusers' ``num_class_embeds``), or None."""
    return getattr(model.config, "num_class_embeds", None)


@torch.no_grad()
def ddim_sample(
    model: UNet2DModel,
    num_images: int,
    *,
    steps: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    class_labels: torch.Tensor | None = None,
    precision: Precision = FP32,
) -> torch.Tensor:
    """Generate ``num_images`` images in [0, 1] with DDIM (eta 0), batch by batch.

    ``precision``: the network's forward under autocast (channels-last, compiled as it says); the
    DDIM update itself runs in fp32 on the prediction cast back.

    The initial noise of image i depends only on (seed, i), so another ``batch_size`` gives the
    same images but for float rounding (other batch shapes run other kernels; README
    "Determinism"). A class-conditional model gets ``class_labels`` (one per image) at every step;
    without them, ``draw_class_labels`` over its ``num_class_embeds`` classes.
    """
    model = model.to(device).eval()
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    classes = model_classes(model)
    if classes is not None and class_labels is None:
        class_labels = draw_class_labels(num_images, classes, seed)
    if class_labels is not None:
        if classes is None:
            raise ValueError("class-conditional: class_labels were given but the model has no class embedding")
        if tuple(class_labels.shape) != (num_images,):
            raise ValueError(f"class_labels: expected shape ({num_images},), got {tuple(class_labels.shape)}")
    scheduler = sampling_scheduler()
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_images, *shape), generator=gen)
    out = []
    precision.prepare(model)
    autocast = precision.autocast(torch.device(device))
    with progress(num_images, f"DDIM sampling ({steps} steps)", "img") as bar:
        for start in range(0, num_images, batch_size):
            x = noise[start : start + batch_size].to(device)
            y = None if class_labels is None else class_labels[start : start + batch_size].to(device)
            for t in scheduler.timesteps:
                with autocast:
                    eps = model(x, t, class_labels=y).sample.float()
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
            bar.update(x.shape[0])
    precision.release(model)
    return torch.cat(out) if out else torch.empty((0, *shape))
