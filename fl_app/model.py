"""The model a run starts from, built the same way on the server and on every node."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from ddpm.adapters import attach_adapter, load_trainable
from ddpm.ambient import AmbientFamily
from ddpm.base import check_base_classes, is_hub_id, load_base_unet, model_fingerprint
from ddpm.captions import first_captions
from ddpm.data import ImageSet
from ddpm.family import PIXEL_DDPM, DiffusionFamily
from ddpm.text_latent import TextLatentDiffusion, frozen_fingerprint, load_text_family
from ddpm.unet import build_unet

from .settings import Settings


def _fresh(settings: Settings, channels: int) -> UNet2DModel:
    """A UNet of size ``model``, conditioned as ``class-embedding`` and drawn as ``model-init`` say;
    with ``ambient`` it takes 2C input channels (the masked image and its mask)."""
    return build_unet(
        settings.model,
        settings.image_size,
        channels,
        settings.num_classes,
        class_embedding=settings.class_embedding,
        init=settings.model_init,
        in_channels=2 * channels if settings.ambient else channels,
    )


def initial_model(
    settings: Settings, channels: int, weights: Mapping[str, torch.Tensor] | None = None
) -> UNet2DModel | UNet2DConditionModel:
    """The ``init-from`` base with its adapter attached (seeded), or a fresh UNet of size ``model``
    (drawn from the global RNG: seed it first where the draw matters); class-conditional on the
    data set's classes with ``class-conditional`` (a base must already be, with as many classes);
    with ``ambient``, 2C input channels (``model_family``). A Stable Diffusion base
    (``text_conditional``) gives its ``UNet2DConditionModel``: the VAE and text encoder stay
    frozen in the family (``model_family``), never in the model, so they never travel.

    ``weights`` (a node's copy of the global model's trainable tensors) are loaded into it. A
    UNet without a base is then never initialised at random: it is laid out on the meta device
    and takes the given tensors as its own, so a message does not pay for weights it would
    overwrite (0.15 s for ``cifar``, 0.4 s for ``afhq64`` on a CPU core).
    """
    if settings.text_conditional:
        model = attach_adapter(copy.deepcopy(_text_checkpoint(settings.init_from).unet), settings.adapter_spec())
    elif settings.init_from:
        base = load_base_unet(settings.init_from)
        check_base_classes(base.config, settings.num_classes, settings.init_from)  # nodes too
        model = attach_adapter(base, settings.adapter_spec())
    elif weights is None:
        return _fresh(settings, channels)
    else:
        with torch.device("meta"):
            model = _fresh(settings, channels)
        load_trainable(model, weights, assign=True)
        return model
    if weights is not None:
        load_trainable(model, weights)
    return model


def model_family(settings: Settings, data: ImageSet | None = None) -> DiffusionFamily:
    """The run's model family: Stable Diffusion's text-conditional latent family for a
    ``StableDiffusionPipeline`` base (prompts: the first caption of each of ``data``'s training
    images, when given; guidance ``guidance-scale``; images of ``image-size``), Ambient Diffusion
    with ``ambient``, else the pixel DDPM."""
    if settings.text_conditional:
        family = _text_checkpoint(settings.init_from).family
        prompts = first_captions(data) if data is not None and data.captions is not None else ()
        return dataclasses.replace(
            family, prompts=prompts, guidance_scale=settings.guidance_scale, resolution=settings.image_size
        )
    if settings.ambient:
        return AmbientFamily(settings.ambient_p, settings.ambient_delta, settings.ambient_max_snr)
    return PIXEL_DDPM


def base_fingerprint(settings: Settings, model: torch.nn.Module) -> str:
    """What proves a node's base equal to the server's (``ddpm.base.model_fingerprint`` of the
    initial model); a Stable Diffusion base adds its frozen parts (VAE, text encoder, tokenizer,
    scheduler): they shape every loss though they never travel."""
    mine = model_fingerprint(model)
    return f"{mine}+{_text_checkpoint(settings.init_from).frozen}" if settings.text_conditional else mine


@dataclasses.dataclass(frozen=True, eq=False)
class TextCheckpoint:
    """A loaded Stable Diffusion checkpoint: its UNet as saved (copied for each model), the family
    of its frozen parts and their fingerprint."""

    unet: UNet2DConditionModel
    family: TextLatentDiffusion
    frozen: str


def _text_checkpoint(init_from: str) -> TextCheckpoint:
    """The checkpoint of ``init-from``, loaded once per process and file state: a deployment starts
    a process per message, a simulation's actor trains many with one load."""
    return _load_text(init_from, _stamp(init_from))


def _stamp(init_from: str) -> tuple:
    """The files of a pipeline folder (name, time, size): an edited checkpoint is loaded again."""
    if is_hub_id(init_from):
        return ()
    folder = Path(init_from).expanduser()
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return tuple((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


@functools.lru_cache(maxsize=2)
def _load_text(init_from: str, stamp: tuple) -> TextCheckpoint:
    unet, family = load_text_family(init_from)
    return TextCheckpoint(unet.eval(), family, frozen_fingerprint(family))
