"""Capacity control on a pretrained UNet: which tensors train (and travel), and merging them back.

- ``none``: every parameter trains (full fine-tuning).
- ``lora``: peft LoRA layers injected by diffusers' ``add_adapter`` on the attention projections
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; with ``attention+conv`` also every ResNet block's
  ``conv1``/``conv2``); only the A and B matrices train (only B with ``freeze_a``). A is drawn
  from ``seed`` (peft's Kaiming-uniform init), B starts at 0, so the adapted model starts equal
  to the base.
- ``difffit`` (Xie et al., 2023): biases, normalisation parameters and a learnable scale per block
  train, the rest is frozen. The scale gamma (one value per output channel, initialised to 1)
  multiplies each block's residual branch before it joins the skip path: the output of every
  ResNet block's ``conv2`` and of every attention block's output projection ``to_out.0``, as
  DiffFit scales the attention and MLP branches of a DiT block. Scales merge exactly into those
  layers' weights and biases.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

ADAPTERS = ("none", "lora", "difffit")
LORA_TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+conv": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
}
SCALE = "difffit_scale"  # the parameter name of a DiffFit scale on the layer it scales


class AdaptableUNet2DModel(UNet2DModel, PeftAdapterMixin):
    """``UNet2DModel`` with diffusers' peft integration (``add_adapter``, ``fuse_lora``), which
    diffusers 0.42 mixes into its other model classes but not this one."""


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter's settings (``adapter``, ``lora-*`` and the run's seed for the LoRA A draw)."""

    kind: str = "none"
    rank: int = 8
    alpha: float = 8.0
    targets: str = "attention"
    freeze_a: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ADAPTERS:
            raise ValueError(f"adapter: must be one of {', '.join(ADAPTERS)}, got {self.kind!r}")
        if self.targets not in LORA_TARGETS:
            raise ValueError(f"lora-targets: must be one of {', '.join(LORA_TARGETS)}, got {self.targets!r}")


def _scale_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    scale = getattr(module, SCALE)
    return output * (scale.view(-1, 1, 1) if output.dim() == 4 else scale)


def _difffit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The last layer of every residual branch: ResNet ``conv2`` and attention ``to_out[0]``."""
    layers = []
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            layers.append(module.conv2)
        elif isinstance(module, Attention):
            layers.append(module.to_out[0])
    return layers


def attach_adapter(base: torch.nn.Module, spec: AdapterSpec) -> torch.nn.Module:
    """The model to train: ``base`` itself (``none``, ``difffit``, and ``lora`` on a model whose
    class has diffusers' peft mixin, e.g. Stable Diffusion's ``UNet2DConditionModel``) or, for
    ``lora`` on a ``UNet2DModel``, an adaptable copy, with exactly the adapter's tensors trainable.
    The global RNG is left as it was."""
    if spec.kind == "none":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.kind == "lora":
            from peft import LoraConfig

            if isinstance(base, PeftAdapterMixin):  # diffusers' conditional UNets have it already
                model = base
            else:
                model = AdaptableUNet2DModel.from_config(base.config)
                model.load_state_dict(base.state_dict())
            config = LoraConfig(
                r=spec.rank,
                lora_alpha=spec.alpha,
                target_modules=list(LORA_TARGETS[spec.targets]),
                init_lora_weights=True,
                lora_dropout=0.0,
            )
            try:
                model.add_adapter(config)
            except ValueError as err:  # peft: none of the target modules is in this model
                raise ValueError(
                    f"lora-targets: {spec.targets!r} ({', '.join(LORA_TARGETS[spec.targets])}) matches no layer "
                    f"of the base model ({str(err).splitlines()[0]})"
                ) from None
            for name, p in model.named_parameters():
                p.requires_grad_(".lora_B." in name or (".lora_A." in name and not spec.freeze_a))
            return model
    model = base
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in _difffit_layers(model):
        channels = layer.weight.shape[0]
        layer.register_parameter(SCALE, torch.nn.Parameter(torch.ones(channels, dtype=layer.weight.dtype)))
        layer.register_forward_hook(_scale_hook)
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name.endswith(SCALE):
            p.requires_grad_(True)
    return model


def trainable_state(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The tensors that train, and so travel between server and nodes, by state-dict key.

    Detached CPU tensors: views of a CPU model's parameters (an ArrayRecord copies them)."""
    return OrderedDict((n, p.detach().cpu()) for n, p in model.named_parameters() if p.requires_grad)


def load_trainable(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
    """Copy ``state`` into the model's trainable tensors; its keys must be exactly those tensors.

    ``assign``: the model (every tensor trainable, e.g. laid out on the meta device) takes the
    given tensors as its parameters instead of copying them.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"weights do not match the model's trainable tensors: {len(missing)} missing "
            f"({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}), {len(extra)} unexpected "
            f"({', '.join(extra[:3])}{'...' if len(extra) > 3 else ''}); is the adapter setting the same?"
        )
    if assign:
        model.load_state_dict(dict(state), strict=True, assign=True)
        return
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def adapter_state(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The adapter's own tensors, frozen ones included (LoRA A with ``freeze_a``): the adapter alone."""
    return OrderedDict(
        (n, p.detach().cpu())
        for n, p in model.named_parameters()
        if p.requires_grad or ".lora_A." in n or ".lora_B." in n or n.endswith(SCALE)
    )


def merged_unet(model: torch.nn.Module) -> torch.nn.Module:
    """A plain ``UNet2DModel`` (or, for another class such as ``UNet2DConditionModel``, a plain one
    of that class) computing what ``model`` computes, adapters folded into its weights."""
    scaled = any(n.endswith(SCALE) for n, _ in model.named_parameters())
    peft = isinstance(model, PeftAdapterMixin) and getattr(model, "_hf_peft_config_loaded", False)
    if type(model) is UNet2DModel and not scaled:
        return model
    if not isinstance(model, UNet2DModel) and not (scaled or peft):  # no adapter on a conditional UNet
        return model
    if peft:
        fused = copy.deepcopy(model).cpu()
        fused.fuse_lora()
        state = {k.replace(".base_layer.", "."): v for k, v in fused.state_dict().items() if ".lora_" not in k}
    else:
        state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items() if not k.endswith(SCALE)}
        for name, p in model.named_parameters():
            if name.endswith("." + SCALE):
                layer = name[: -len(SCALE) - 1]
                gamma = p.detach().cpu()
                weight = state[f"{layer}.weight"]
                state[f"{layer}.weight"] = weight * gamma.view(-1, *([1] * (weight.dim() - 1)))
                if f"{layer}.bias" in state:
                    state[f"{layer}.bias"] = state[f"{layer}.bias"] * gamma
    plain_class = UNet2DModel if isinstance(model, UNet2DModel) else type(model)
    with torch.random.fork_rng(devices=[]):
        plain = plain_class.from_config(dict(model.config))
    plain.load_state_dict(state)
    return plain.eval()
