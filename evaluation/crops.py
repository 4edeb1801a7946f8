"""The crops the text-to-image metrics see: torchvision's ``Resize(short side)`` then ``CenterCrop``.

DCR's ``diff_retrieval.py`` (somepago/DCR, copied unchanged into liuxiao-guan/IET-AGC_SD) feeds SSCD
and CLIP the same tensors, ``Resize(256), CenterCrop(224), ToTensor(), Normalize([0.5], [0.5])``;
its ``metrics/fid.py`` feeds Inception ``Resize(299), CenterCrop(299)`` and the same normalisation.
Here the transforms run batched on tensors (uint8 or [0, 1]; grey repeated to RGB) with
torchvision's own functional resize (bilinear, antialiased, as PIL's), so sizes and rounding of the
crop box are torchvision's; DCR resized PIL images, whose uint8 rounding is not reproduced.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF

from ddpm.data import to_unit_range

DCR_RESIZE, DCR_CROP = 256, 224  # diff_retrieval.py's ret_transform (Sim Score and CLIP score)


def rgb_unit(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 or [0, 1] images as float RGB in [0, 1] (grey repeated to 3 channels)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = to_unit_range(images)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_center_crop(images01: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """torchvision's ``Resize(resize)`` (the short side to ``resize``, aspect kept) then
    ``CenterCrop(crop)``, on a batch of float images; a side already at ``resize`` is left as is."""
    h, w = images01.shape[-2:]
    x = images01 if min(h, w) == resize else TF.resize(images01, [resize], antialias=True)
    return TF.center_crop(x, [crop, crop])


def normalize_half(x01: torch.Tensor) -> torch.Tensor:
    """``Normalize(0.5, 0.5)``: [0, 1] -> [-1, 1], as DCR's transforms end."""
    return (x01 - 0.5) / 0.5


def dcr_crops(images: torch.Tensor, resize: int = DCR_RESIZE, crop: int = DCR_CROP) -> torch.Tensor:
    """DCR's retrieval transform on a batch: Resize(256), CenterCrop(224), Normalize(0.5, 0.5).

    The tensors DCR's (and the authors') Sim Score and CLIP score are computed on, in [-1, 1].
    """
    return normalize_half(resize_center_crop(rgb_unit(images), resize, crop))
