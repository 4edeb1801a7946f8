"""UNet factory over diffusers' ``UNet2DModel`` with named sizes (the paper's and a CPU one).

Attention is single-head over all channels, as in Ho et al.'s DDPM and the authors' ``model.py``
``AttnBlock`` (GroupNorm, 1x1 q/k/v/out projections, softmax(q k^T / sqrt(C)), residual):
``attention_head_dim=None`` makes diffusers give every attention block (down, mid, up) a head
dimension equal to that block's channel count, i.e. one head.
"""

from __future__ import annotations

from diffusers import UNet2DModel

from .class_embedding import CLASS_EMBEDDINGS, PerBlockClassUNet2DModel, per_block_config
from .initialisation import initialise

# name -> (block_out_channels, down block types, layers per block, dropout, norm groups)
_SIZES: dict[str, dict] = {
    # CPU default: ~0.65M parameters, attention at the lowest resolution only.
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        dropout=0.0,
        norm_num_groups=8,
    ),
    # The paper's CIFAR model (DDPM, Ho et al.): 128 channels, (1,2,2,2), attention at level 1 = 16x16,
    # 2 residual blocks per level, dropout 0.1; ~35.7M parameters.
    "cifar": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        dropout=0.1,
        norm_num_groups=32,
    ),
    # AFHQ-DOG at 64x64: multipliers (1,2,2,2,4), attention at level 1 = 32x32 (the authors'
    # config/Afhq_dog_fed.txt: --attn=1); the up path lists the levels in reverse.
    "afhq64": dict(
        block_out_channels=(128, 256, 256, 256, 512),
        down_block_types=(
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        dropout=0.1,
        norm_num_groups=32,
    ),
}

MODEL_SIZES: tuple[str, ...] = tuple(_SIZES)


def build_unet(
    size: str,
    image_size: int,
    channels: int,
    num_classes: int | None = None,
    *,
    class_embedding: str = "added",
    init: str = "diffusers",
    in_channels: int | None = None,
) -> UNet2DModel:
    """Return a freshly initialised UNet of a named size, ``channels`` out (and in).

    ``in_channels``: other inputs than outputs (Ambient Diffusion: 2C, the masked image and its mask).

    ``num_classes``: class-conditional (None: unconditional), the label taken as
    ``class_embedding`` says (``ddpm.class_embedding``: ``added``, diffusers' table added to the
    timestep embedding; ``per-block``, the authors' conditioning network and per-block
    projections). ``init``: ``diffusers`` (its default draw) or ``authors`` (their xavier-uniform
    draw with gain 1e-5 on each residual block's last convolution and the output convolution,
    ``ddpm.initialisation``).
    """
    if size not in _SIZES:
        raise ValueError(f"model: unknown size {size!r}; allowed: {', '.join(MODEL_SIZES)}")
    if class_embedding not in CLASS_EMBEDDINGS:
        raise ValueError(f"class-embedding: must be one of {', '.join(CLASS_EMBEDDINGS)}, got {class_embedding!r}")
    spec = _SIZES[size]
    common = dict(
        sample_size=image_size, in_channels=in_channels or channels, out_channels=channels, attention_head_dim=None
    )
    # attention_head_dim None: one head per attention block (see the module docstring)
    if num_classes is not None and class_embedding == "per-block":
        model: UNet2DModel = PerBlockClassUNet2DModel(**common, **per_block_config(spec, num_classes))
    else:
        model = UNet2DModel(**common, num_class_embeds=num_classes, **spec)
    return initialise(model, init)


UNET_CLASSES: dict[str, type[UNet2DModel]] = {cls.__name__: cls for cls in (UNet2DModel, PerBlockClassUNet2DModel)}


def unet_class(config: dict) -> type[UNet2DModel]:
    """The class a saved UNet config names (``_class_name``): a ValueError for any other."""
    name = config.get("_class_name", "UNet2DModel")
    if name not in UNET_CLASSES:
        raise ValueError(f"a {name}, not a UNet2DModel (or {', '.join(n for n in UNET_CLASSES if n != 'UNet2DModel')})")
    return UNET_CLASSES[name]


def num_parameters(model) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
