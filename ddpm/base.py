"""The pretrained base a run fine-tunes (``init-from``): a DDPMPipeline folder or a Hub id.

The UNet's architecture and weights come from the checkpoint; the run's settings must agree with
it (``base_config`` lets the settings check compare before training). Every node loads the same
base itself and proves it by ``model_fingerprint``, as it proves its copy of the data set.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
HUB_FILES = ["*.json", "*.safetensors", "*.bin"]  # configs and weights, in either format


def is_hub_id(init_from: str) -> bool:
    """``owner/name`` that is not a folder on this machine: a Hugging Face Hub model id."""
    return bool(HUB_ID.fullmatch(init_from)) and not Path(init_from).expanduser().exists()


def _local_folder(init_from: str) -> Path:
    """The folder holding the pipeline: the given one, or the Hub snapshot (downloaded when online)."""
    if not is_hub_id(init_from):
        folder = Path(init_from).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"init-from: must be a DDPMPipeline or StableDiffusionPipeline folder or a Hub id (owner/name), "
                f"got {init_from!r} "
                "(no such directory)"
            )
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(init_from, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 - offline, unknown id, no access: all end the run here, named
        raise ValueError(
            f"init-from: cannot download {init_from!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); without network access give a local "
            "DDPMPipeline folder (e.g. one saved with DDPMPipeline.save_pretrained) instead"
        ) from None


def _unet_folder(init_from: str) -> Path:
    """``unet/`` of a pipeline folder, or the folder itself when it holds a bare UNet config."""
    folder = _local_folder(init_from)
    for candidate in (folder / "unet", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"init-from: {init_from!r} holds no UNet (neither unet/config.json nor config.json in {folder})")


def base_config(init_from: str) -> dict[str, Any]:
    """The base UNet's config (architecture, ``sample_size``, ``in_channels``), read without weights."""
    folder = _unet_folder(init_from)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"init-from: unreadable {folder / 'config.json'} ({err})") from None
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"init-from: {init_from!r} holds a {config['_class_name']}, not a UNet2DModel")
    return config


def check_base_classes(config: Mapping[str, Any], num_classes: int | None, init_from: str) -> None:
    """Refuse a base whose class embedding is not the run's, naming ``class-conditional``.

    ``num_classes`` is the run's (None: unconditional). An unconditional base cannot be trained
    with labels (it has no class embedding to learn them), a conditional one cannot run without
    them; a conditional base must have exactly the data set's classes (a label is a class of this
    data set; another label space would map its classes onto unrelated ones) and diffusers'
    embedding table (``class_embed_type`` None), the only kind that takes integer labels.
    """
    embeds, kind = config.get("num_class_embeds"), config.get("class_embed_type")
    where = f"the base model of init-from {init_from!r}"
    if kind is not None:
        raise ValueError(
            f"class-conditional: {where} has class_embed_type {kind!r}; only a table of class embeddings "
            "(num_class_embeds, class_embed_type None) takes integer labels"
        )
    if num_classes is None and embeds is not None:
        raise ValueError(
            f"class-conditional: {where} is class-conditional ({embeds} classes) and needs labels; "
            "set class-conditional = true"
        )
    if num_classes is not None and embeds is None:
        raise ValueError(
            f"class-conditional: {where} is unconditional (no class embedding to learn labels with); "
            "set class-conditional = false to fine-tune it, or train a conditional model from scratch"
        )
    if embeds != num_classes:
        raise ValueError(
            f"class-conditional: {where} has {embeds} class embeddings, the data set {num_classes} classes"
        )


def _stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))


@functools.lru_cache(maxsize=2)
def _load(folder: str, stamp: tuple) -> UNet2DModel:
    return UNet2DModel.from_pretrained(folder).eval()


def load_base_unet(init_from: str) -> UNet2DModel:
    """A fresh copy of the base UNet (cached per process and file state: every message reuses one load)."""
    folder = _unet_folder(init_from)
    base_config(init_from)  # the class check
    try:
        base = _load(str(folder), _stamp(folder))
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"init-from: cannot load the UNet in {folder} ({type(err).__name__}: {err})") from None
    return copy.deepcopy(base)


def model_fingerprint(model: torch.nn.Module) -> str:
    """``<parameters>-<sha256 prefix>`` over the model's config and every tensor of its state.

    Taken of the initial model (the base with its adapter attached and seeded): two nodes that
    agree on it train from the same frozen weights and the same LoRA A matrices.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", {})
    h.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True).encode())
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    size = sum(t.numel() for t in state.values())
    return f"{size}-{h.hexdigest()[:16]}"
