"""The server-side evaluator: DDIM samples -> MQ (reference rule) and FID (or why it is missing)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from diffusers import UNet2DModel
from torchvision.utils import save_image

from ddpm.data import ImageSet
from ddpm.schedule import ddim_sample
from ddpm.settings import Settings

from .fid import FIDUnavailable, fid
from .mq import mq_counts, nearest_neighbours

log = logging.getLogger("iet_agc.evaluation")


class Evaluator(Protocol):
    """Called by the ServerApp after chosen rounds with the global model; returns metric columns."""

    def __call__(self, server_round: int, model: UNet2DModel) -> dict[str, float | None]: ...


class MemorizationEvaluator:
    """Generates ``eval-num-images`` images and reports MQ at each threshold and FID."""

    def __init__(self, settings: Settings, data: ImageSet, out_dir: Path, device: torch.device) -> None:
        self.settings, self.data, self.out_dir, self.device = settings, data, Path(out_dir), device
        self.fid_reason = "" if settings.fid else "disabled by setting fid = false"
        self.last_images: torch.Tensor | None = None

    def __call__(self, server_round: int, model: UNet2DModel) -> dict[str, float | None]:
        s = self.settings
        images = ddim_sample(
            model,
            s.eval_num_images,
            steps=s.sample_steps,
            batch_size=s.eval_batch_size,
            seed=s.seed,
            device=self.device,
        )
        self.last_images = images
        neighbours = nearest_neighbours(images, self.data.images, n=s.mq_neighbours, device=self.device)
        metrics: dict[str, float | None] = dict(mq_counts(neighbours.ratio, s.thresholds))
        metrics["fid"] = self._fid(images)
        save_image(images[:64], self.out_dir / f"samples_round{server_round:03d}.png", nrow=8)
        return metrics

    def _fid(self, images: torch.Tensor) -> float | None:
        if self.fid_reason:  # disabled, or already failed this run: do not retry the download
            return None
        try:
            return fid(images, self.data.images.float() / 255, self.settings.fid_weights, str(self.device))
        except FIDUnavailable as err:
            self.fid_reason = str(err)
            log.warning("FID unavailable: %s", err)
            return None
