"""DDPM noise schedule (linear betas 1e-4..0.02, T=1000, epsilon prediction) and DDIM sampling."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .progress import progress

NUM_TRAIN_TIMESTEPS = 1000


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


@torch.no_grad()
def ddim_sample(
    model: UNet2DModel,
    num_images: int,
    *,
    steps: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Generate ``num_images`` images in [0, 1] with DDIM (eta 0), batch by batch.

    The initial noise of image i depends only on (seed, i), so results do not depend on
    ``batch_size``.
    """
    model = model.to(device).eval()
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    scheduler = sampling_scheduler()
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_images, *shape), generator=gen)
    out = []
    with progress(num_images, f"DDIM sampling ({steps} steps)", "img") as bar:
        for start in range(0, num_images, batch_size):
            x = noise[start : start + batch_size].to(device)
            for t in scheduler.timesteps:
                eps = model(x, t).sample
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
            bar.update(x.shape[0])
    return torch.cat(out) if out else torch.empty((0, *shape))
