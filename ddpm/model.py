"""The model a run starts from, built the same way on the server and on every node."""

from __future__ import annotations

from diffusers import UNet2DModel

from .adapters import attach_adapter
from .base import check_base_classes, load_base_unet
from .settings import Settings
from .unet import build_unet


def initial_model(settings: Settings, channels: int) -> UNet2DModel:
    """The ``init-from`` base with its adapter attached (seeded), or a fresh UNet of size ``model``
    (drawn from the global RNG: seed it first where the draw matters); class-conditional on the
    data set's classes with ``class-conditional`` (a base must already be, with as many classes)."""
    if settings.init_from:
        base = load_base_unet(settings.init_from)
        check_base_classes(base.config, settings.num_classes, settings.init_from)  # nodes too
        return attach_adapter(base, settings.adapter_spec())
    return build_unet(settings.model, settings.image_size, channels, settings.num_classes)
