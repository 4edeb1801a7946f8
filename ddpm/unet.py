"""UNet factory over diffusers' ``UNet2DModel`` with named sizes (the paper's and a CPU one).

Attention is single-head over all channels, as in Ho et al.'s DDPM and the authors' ``model.py``
``AttnBlock`` (GroupNorm, 1x1 q/k/v/out projections, softmax(q k^T / sqrt(C)), residual):
``attention_head_dim=None`` makes diffusers give every attention block (down, mid, up) a head
dimension equal to that block's channel count, i.e. one head.
"""

from __future__ import annotations

from diffusers import UNet2DModel

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
    size: str, image_size: int, channels: int, num_classes: int | None = None, in_channels: int | None = None
) -> UNet2DModel:
    """Return a freshly initialised UNet of a named size, ``channels`` out (and in).

    ``in_channels``: other inputs than outputs (Ambient Diffusion: 2C, the masked image and its mask).

    ``num_classes``: class-conditional with diffusers' class embedding (``num_class_embeds``: one
    learned vector per class added to the timestep embedding); None: unconditional.
    """
    if size not in _SIZES:
        raise ValueError(f"model: unknown size {size!r}; allowed: {', '.join(MODEL_SIZES)}")
    spec = _SIZES[size]
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels or channels,
        out_channels=channels,
        attention_head_dim=None,  # one head per attention block (see the module docstring)
        num_class_embeds=num_classes,
        **spec,
    )


def num_parameters(model) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
