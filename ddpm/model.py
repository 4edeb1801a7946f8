"""The model a run starts from, built the same way on the server and on every node."""

from __future__ import annotations

from diffusers import UNet2DModel

from .adapters import attach_adapter
from .base import load_base_unet
from .settings import Settings
from .unet import build_unet


def initial_model(settings: Settings, channels: int) -> UNet2DModel:
    """The ``init-from`` base with its adapter attached (seeded), or a fresh UNet of size ``model``
    (drawn from the global RNG: seed it first where the draw matters)."""
    if settings.init_from:
        return attach_adapter(load_base_unet(settings.init_from), settings.adapter_spec())
    return build_unet(settings.model, settings.image_size, channels)
