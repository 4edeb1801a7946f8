"""Threshold-Aware Augmentation (eq. 5-8): augment kept samples just above the skip line.

Strength rho = exp(-A * |r - lambda| / lambda) grows as the ratio r approaches lambda. We read
the paper's "RandAugment parameter" M as a RandAugment magnitude on torchvision's 31-bin scale
(0..30) and let rho scale it continuously: a copy's operations act at the fraction
``s = rho * M / 30`` of their full range (rho = 1 is torchvision's RandAugment at magnitude M, but
for the resampling details named below).

``RandAugmentPolicy`` is RandAugment rewritten for batched float tensors: every sample draws its
own ``num_ops`` operations, signs and gates; the work is grouped by operation (per slot, the five
geometric ops share one ``grid_sample`` call and each other op is one group: at most 9 groups per
slot, never a per-sample loop) with per-sample strength tensors. Operations and their
strength at fraction s (sign +-1 drawn per sample, as torchvision's "signed" operations):

=============  =========================================================================
Identity       none
ShearX/Y       shear factor +-0.3 s (about the image centre)
TranslateX/Y   +-(150/331) s of the width/height, in pixels (sub-pixel, bilinear)
Rotate         +-30 s degrees (about the centre, bilinear)
Brightness     blend with black, factor 1 +- 0.9 s
Color          blend with the grayscale image, factor 1 +- 0.9 s (1-channel images: none)
Contrast       blend with the image's mean gray, factor 1 +- 0.9 s
Sharpness      blend with torchvision's 3x3 smoothed image, factor 1 +- 0.9 s
Posterize      keep 8 - 4 s bits: 0..255 levels floored to multiples of 2 ** (4 s)
Solarize       invert pixels above 1 - s; applied with probability rho
AutoContrast   torchvision's, full effect; applied with probability rho
Equalize       torchvision's, full effect; applied with probability rho
=============  =========================================================================

Affine ops fill with black (torchvision's default fill). The last three have no strength that
shrinks to nothing (Solarize inverts a saturated pixel fully at any threshold below 1), so rho
is their probability: the expected change still grows continuously with rho and vanishes at 0.
A sample with rho = 0 comes back unchanged (bit-exact).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as tvf

NUM_MAGNITUDE_BINS = 31  # torchvision's RandAugment scale: magnitudes 0..30

OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
GATED_OPS: frozenset[str] = frozenset({"Solarize", "AutoContrast", "Equalize"})  # applied with probability rho
GEOMETRIC: tuple[str, ...] = OPS[1:6]  # ShearX .. Rotate: resampled together, one call per slot
TAA_INTERPOLATIONS: tuple[str, ...] = ("bilinear", "nearest")  # nearest: torchvision's RandAugment


def in_augment_range(ratio: torch.Tensor, keep: torch.Tensor, threshold: float, aug_range: float) -> torch.Tensor:
    """Eq. 8's middle case: kept and lambda <= r < R * lambda (R = inf: every finite r)."""
    upper = ratio < aug_range * threshold if math.isfinite(aug_range) else torch.isfinite(ratio)
    return keep & (ratio >= threshold) & upper


def strength(ratio: torch.Tensor, threshold: float, sharpness: float) -> torch.Tensor:
    """Eq. 6-7: rho = exp(-A * |r - lambda| / lambda), in (0, 1]."""
    return torch.exp(-sharpness * (ratio - threshold).abs() / threshold)


def op_fraction(rho: torch.Tensor, max_magnitude: int) -> torch.Tensor:
    """Fraction of each operation's full range a copy gets: s = rho * M / 30 (continuous, no rounding)."""
    return rho.clamp(0, 1) * (max_magnitude / (NUM_MAGNITUDE_BINS - 1))


class AugmentPolicy(Protocol):
    """Turns images in [0, 1] plus their strengths rho into augmented copies of the same shape."""

    def __call__(self, images: torch.Tensor, rho: torch.Tensor) -> torch.Tensor: ...


# ---- the operations: x (G, C, H, W) in [0, 1], s (G,) fraction of the range, sign (G,) +-1 ----


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _affine(x: torch.Tensor, mat: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Resample x with output pixel p (pixels, origin at the centre) read at mat @ p + shift."""
    h, w = x.shape[-2:]
    # normalised coordinates (align_corners=False): u = 2 p_x / w, v = 2 p_y / h
    scale = x.new_tensor([w / 2, h / 2])
    theta = torch.empty(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, :, :2] = mat / scale.view(1, 2, 1) * scale.view(1, 1, 2)
    theta[:, :, 2] = shift / scale
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometry(x, s, sign, op, interpolation="bilinear"):
    """The geometric ops at once, each sample its own: ``op`` (G,) indexes :data:`GEOMETRIC`.

    ``bilinear``: translations by fractions of a pixel, shears about the centre, bilinear
    resampling. ``nearest``: torchvision's RandAugment (:func:`_geometry_torchvision`).
    """
    if interpolation == "nearest":
        return _geometry_torchvision(x, s, sign, op)
    zero = torch.zeros_like(s)
    shear = -sign * 0.3 * s
    angle = torch.deg2rad(torch.where(op == 4, sign * 30.0 * s, zero))
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = torch.where(op == 0, shear, zero), torch.where(op == 1, shear, zero)
    # rotation @ shear; at most one of the two is not the identity for a sample
    mat = torch.stack(
        [torch.stack([cos - sin * sy, cos * sx - sin], 1), torch.stack([sin + cos * sy, sin * sx + cos], 1)], 1
    )
    move = -sign * (150 / 331) * s
    shift = torch.stack(
        [torch.where(op == 2, move * x.shape[-1], zero), torch.where(op == 3, move * x.shape[-2], zero)], 1
    )
    return _affine(x, mat, shift)


def torchvision_magnitude(s: torch.Tensor, sign: torch.Tensor, op: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The signed magnitude torchvision's RandAugment op ``GEOMETRIC[op]`` gets at fraction ``s``,
    in float64: shear factor -+0.3 s, translation +-(150/331) s of the side in pixels, rotation
    +-30 s degrees (``size``: the image's (height, width))."""
    s, sign = s.double(), sign.double()
    side = torch.where(op == 2, float(size[1]), float(size[0]))
    return torch.where(op <= 1, -sign * 0.3 * s, torch.where(op <= 3, sign * (150 / 331) * s * side, sign * 30.0 * s))


def _geometry_torchvision(x, s, sign, op):
    """torchvision's RandAugment geometric ops (``F.affine``/``F.rotate``, nearest, black fill),
    batched: its inverse matrices (built in float64, as its ``_get_inverse_affine_matrix`` does in
    Python floats), its sampling grid (``_affine_grid``: pixel centres times the matrix, then
    normalised) and nearest ``grid_sample``. Translations move ``int(magnitude)`` whole pixels;
    shears act about the top left corner (its ``center=[0, 0]``), rotations about the centre."""
    g, (h, w) = x.shape[0], x.shape[-2:]
    mag = torchvision_magnitude(s, sign, op, (h, w))
    one, zero = torch.ones_like(mag), torch.zeros_like(mag)
    shear_x, shear_y = torch.where(op == 0, mag, zero), torch.where(op == 1, mag, zero)
    rot = torch.deg2rad(-torch.where(op == 4, mag, zero))  # F.rotate passes -angle to the matrix
    cos, sin = torch.where(op == 4, torch.cos(rot), one), torch.where(op == 4, torch.sin(rot), zero)
    move = torch.trunc(mag)  # int(magnitude)
    tx, ty = torch.where(op == 2, move, zero), torch.where(op == 3, move, zero)
    # inverse of (translate) (shear about the corner (-w/2, -h/2) or rotate about the centre): read at
    # [[a, b], [c, d]] p + (e, f), p the output pixel centre relative to the image centre
    a, b = cos + zero, sin + shear_x
    c, d = -sin + shear_y, cos + zero
    e = -tx + shear_x * (h / 2)
    f = -ty + shear_y * (w / 2)
    theta = torch.stack([torch.stack([a, b, e], 1), torch.stack([c, d, f], 1)], 1).to(x.dtype)
    base = torch.empty(1, h, w, 3, dtype=x.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype, device=x.device)
    grid = base.view(1, h * w, 3).expand(g, -1, -1).bmm(theta.transpose(1, 2).div(scale)).view(g, h, w, 2)
    return nnf.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _blend(x, degenerate, factor):
    return (degenerate + _col(factor) * (x - degenerate)).clamp(0, 1)


def _gray(x):
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _brightness(x, s, sign):
    return _blend(x, torch.zeros_like(x), 1 + sign * 0.9 * s)


def _color(x, s, sign):
    if x.shape[1] == 1:  # torchvision: saturation leaves 1-channel images unchanged
        return x
    return _blend(x, _gray(x), 1 + sign * 0.9 * s)


def _contrast(x, s, sign):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1 + sign * 0.9 * s)


def _sharpness(x, s, sign):
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:  # torchvision: too small to smooth
        return x
    # torchvision's kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as a sum of shifted views: on the CPU a
    # convolution or pooling call costs far more for small groups (kernel set-up, threads)
    h, w = x.shape[-2:]
    total = 4 * x[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[..., dy : h - 2 + dy, dx : w - 2 + dx]
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = total / 13  # borders stay as they are
    return _blend(x, smooth, 1 + sign * 0.9 * s)


def _posterize(x, s, sign):
    step = _col(torch.exp2(4.0 * s))  # on the 0..255 scale: 1 (8 bits, no change) .. 16 (4 bits)
    levels = torch.floor(x * 255.0 / step + 1e-3) * step  # +1e-3: k/255 * 255 may land just below k
    return (levels / 255.0).clamp(0, 1)


def _solarize(x, s, sign):
    return torch.where(x > 1 - _col(s), 1 - x, x)


def _autocontrast(x, s, sign):
    return tvf.autocontrast(x)


def _equalize(x, s, sign):
    return tvf.equalize(x)


_APPLY = {
    **{
        name: lambda x, s, sign, i=i: _geometry(x, s, sign, torch.full_like(s, i, dtype=torch.long))
        for i, name in enumerate(GEOMETRIC)
    },
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}


class RandAugmentPolicy:
    """RandAugment whose strength grows continuously with rho, one independent draw per sample.

    Each sample draws ``num_ops`` operations uniformly from :data:`OPS` (with repetition, as
    torchvision), a sign per operation, and for the ops in :data:`GATED_OPS` a gate that lets them
    act with probability rho. Samples are grouped by the operation they drew in each slot; the
    randomness comes from torch's global generator, so a seeded run repeats.
    """

    def __init__(self, max_magnitude: int, num_ops: int = 2, interpolation: str = "bilinear") -> None:
        if not 0 <= max_magnitude < NUM_MAGNITUDE_BINS:
            raise ValueError(f"randaugment-magnitude: {max_magnitude} not in [0, {NUM_MAGNITUDE_BINS - 1}]")
        if num_ops < 1:
            raise ValueError(f"randaugment-ops: {num_ops} must be at least 1")
        if interpolation not in TAA_INTERPOLATIONS:
            raise ValueError(
                f"taa-interpolation: must be one of {', '.join(TAA_INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.interpolation = interpolation
        self.max_magnitude = max_magnitude
        self.num_ops = num_ops
        self._gated = torch.tensor([op in GATED_OPS for op in OPS])

    def __call__(self, images: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        n, device = images.shape[0], images.device
        if n == 0:
            return images.clone()
        rho = rho.to(device=device, dtype=images.dtype).reshape(n)
        s = op_fraction(rho, self.max_magnitude)
        k = len(OPS)
        ops = torch.randint(0, k, (n, self.num_ops), device=device)
        sign = torch.randint(0, 2, (n, self.num_ops), device=device).to(images.dtype) * 2 - 1
        gate = torch.rand(n, self.num_ops, device=device) < rho.unsqueeze(1)
        # rho = 0: nothing acts; a gated op acts with probability rho; the others act where s > 0
        # (M = 0 leaves only AutoContrast and Equalize, as torchvision's magnitude 0)
        active = (rho > 0).unsqueeze(1) & torch.where(self._gated.to(device)[ops], gate, (s > 0).unsqueeze(1))
        ops = torch.where(active, ops, torch.zeros_like(ops))
        # one host sync for the whole batch: group sizes per (slot, op)
        slot = torch.arange(self.num_ops, device=device)
        counts = torch.bincount((slot * k + ops).flatten(), minlength=self.num_ops * k).tolist()
        order = torch.argsort(ops, dim=0, stable=True)  # (n, num_ops): sample indices sorted by op, per slot
        geometric = len(GEOMETRIC)
        out = images.clone()
        for j in range(self.num_ops):
            start = counts[j * k]  # Identity's group comes first and is skipped
            # the geometric ops follow Identity in OPS: one group, one resampling call
            size = sum(counts[j * k + 1 : j * k + 1 + geometric])
            groups = [(size, None)] + [(counts[j * k + op], OPS[op]) for op in range(1 + geometric, k)]
            for size, name in groups:
                if size:
                    idx = order[start : start + size, j]
                    start += size
                    x, si, sg = out[idx], s[idx], sign[idx, j]
                    if name is None:
                        done = _geometry(x, si, sg, ops[idx, j] - 1, self.interpolation)
                    else:
                        done = _APPLY[name](x, si, sg)
                    out.index_copy_(0, idx, done.to(out.dtype))
        return out
