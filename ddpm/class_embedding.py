"""How a class-conditional UNet takes its label: diffusers' table, or the authors' per-block path.

``added`` (diffusers' ``num_class_embeds``): one learned vector per class, added to the timestep
embedding; every residual block then projects the sum (``Embedding(C, 4 ch)``: 51,200
parameters for CIFAR-100's 100 classes at ch = 128).

``per-block`` (the authors' ``model.py``, ``ConditionalEmbedding`` and each ``ResBlock``'s
``cemb_proj``): a conditioning network, ``Embedding(C, ch) -> Linear(ch, 4 ch) -> SiLU ->
Linear(4 ch, 4 ch)``, and in every residual block a projection of its own, added to the block's
features beside the timestep's: ``h += W_t SiLU(temb) + W_c SiLU(cemb) + b``. Built on diffusers'
``UNet2DModel`` unchanged: the timestep and class embeddings fill the two halves of a
double-width embedding (``time_embedding_dim = 8 ch``), so diffusers' sum of the two is their
concatenation and each block's ``time_emb_proj`` (``Linear(8 ch, out)``) holds ``[W_t, W_c]``;
SiLU acts element-wise, so this is the authors' arithmetic exactly. Against their 2,902,528
parameters (CIFAR-100, ch = 128) this path has 5,120 fewer: one bias per block instead of their
two (b_t + b_c is one free vector; 4,992) and no row 0 in the table (their ``Embedding(C + 1,
ch, padding_idx=0)`` keeps a frozen zero row; they train on labels 0..C-1, so class 0 is that
zero row and never learns, and sample labels 1..C, so class C is never trained: neither is
copied here; 128).
"""

from __future__ import annotations

import functools

import torch.nn.functional as nnf
from diffusers import ModelMixin, UNet2DModel  # ModelMixin: diffusers' pipeline loader looks for it here
from diffusers.models.embeddings import TimestepEmbedding
from torch import Tensor, nn

__all__ = ["CLASS_EMBEDDINGS", "ModelMixin", "PerBlockClassUNet2DModel", "Slot", "per_block_config"]

CLASS_EMBEDDINGS: tuple[str, ...] = ("added", "per-block")
PER_BLOCK = "per-block"  # the config's ``class_embed_type`` of a PerBlockClassUNet2DModel


class Slot(nn.Module):
    """``inner``'s output in part ``index`` of a vector of ``parts`` equal parts, zeros elsewhere:
    two of them in other parts, added, are their concatenation."""

    def __init__(self, inner: nn.Module, width: int, index: int, parts: int = 2) -> None:
        super().__init__()
        self.inner, self.width, self.index, self.parts = inner, width, index, parts

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return nnf.pad(out, (self.index * self.width, (self.parts - 1 - self.index) * self.width))


class PerBlockClassUNet2DModel(UNet2DModel):
    """diffusers' ``UNet2DModel`` conditioned the authors' way (module docstring): build it with
    ``class_embed_type = "per-block"``, ``num_class_embeds = C`` and ``time_embedding_dim`` twice
    the timestep embedding's width; it saves and loads as any diffusers model (``from_pretrained``
    of this class, or of a ``DDPMPipeline`` where this package is installed)."""

    @functools.wraps(UNet2DModel.__init__)  # the same config keys: diffusers reads the signature
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.class_embed_type != PER_BLOCK or cfg.num_class_embeds is None or not cfg.time_embedding_dim:
            raise ValueError(
                "class-embedding: a PerBlockClassUNet2DModel needs class_embed_type 'per-block', "
                f"num_class_embeds and time_embedding_dim, got {cfg.class_embed_type!r}, "
                f"{cfg.num_class_embeds!r}, {cfg.time_embedding_dim!r}"
            )
        width, ch = cfg.time_embedding_dim // 2, cfg.block_out_channels[0]
        self.time_embedding = Slot(TimestepEmbedding(ch, width), width, 0)
        self.class_embedding = Slot(
            nn.Sequential(nn.Embedding(cfg.num_class_embeds, ch), TimestepEmbedding(ch, width)), width, 1
        )


def per_block_config(spec: dict, num_classes: int) -> dict:
    """The ``UNet2DModel`` keys that make a size's spec condition per block on ``num_classes``."""
    width = spec["block_out_channels"][0] * 4  # the timestep embedding's width, as diffusers' default
    return dict(spec, class_embed_type=PER_BLOCK, num_class_embeds=num_classes, time_embedding_dim=2 * width)
