"""How much a TAA copy changes an image: our two resamplings against torchvision's RandAugment.

    python scripts/taa_change.py [--magnitude 3] [--ops 2] [--rho 1] [--seeds 8] [--images 256]

For digits (8x8, in [0, 1]) and uniform random 3x32x32 images: the mean absolute change of a copy,
``RandAugmentPolicy`` with ``taa-interpolation`` bilinear and nearest at strength ``rho``, and
torchvision's ``RandAugment(num_ops, magnitude)`` (one draw per image, a loop: a script, not a
training step) at rho = 1 with each interpolation. Mean over seeds, and the share of geometric-only
copies that differ at all. A Markdown table on stdout; docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.transforms.v2 import InterpolationMode, RandAugment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.taa import GEOMETRIC, RandAugmentPolicy, op_fraction  # noqa: E402
from ddpm.data import load_dataset, to_unit_range  # noqa: E402


def image_sets(n: int) -> dict[str, torch.Tensor]:
    digits = to_unit_range(load_dataset("digits", image_size=8, train_size=n, seed=0).images)
    rgb = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"digits 1x8x8": digits, "random 3x32x32": rgb}


def ours(x: torch.Tensor, magnitude: int, ops: int, rho: float, interpolation: str, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return RandAugmentPolicy(magnitude, ops, interpolation)(x, torch.full((x.shape[0],), rho))


def theirs(x: torch.Tensor, magnitude: int, ops: int, interpolation: str, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    mode = InterpolationMode.NEAREST if interpolation == "nearest" else InterpolationMode.BILINEAR
    aug = RandAugment(num_ops=ops, magnitude=magnitude, interpolation=mode)
    return torch.stack([aug(img) for img in x])


def geometric_moved(x: torch.Tensor, magnitude: int, rho: float, interpolation: str) -> float:
    """Share of (image, geometric op) pairs, each op at fraction rho * M / 30 and both signs, that
    change the image at all."""
    from clients.taa import _geometry

    n = x.shape[0]
    s = op_fraction(torch.full((n,), rho), magnitude)
    moved = []
    for op in range(len(GEOMETRIC)):
        for sign in (1.0, -1.0):
            out = _geometry(x, s, torch.full((n,), sign), torch.full((n,), op), interpolation)
            moved.append((out != x).flatten(1).any(1).float())
    return torch.cat(moved).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--magnitude", type=int, default=3)
    ap.add_argument("--ops", type=int, default=2)
    ap.add_argument("--rho", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m, k, rho = args.magnitude, args.ops, args.rho
    print(f"M = {m}, {k} operations, rho = {rho} (torchvision: rho = 1), {args.images} images, {args.seeds} seeds\n")
    print(
        "| images | ours, bilinear | ours, nearest | torchvision, nearest (default) | torchvision, bilinear |"
        " geometric ops that move pixels: bilinear / nearest |"
    )
    print("|---|---|---|---|---|---|")
    for name, x in image_sets(args.images).items():
        runs = {
            "ours bilinear": lambda seed, x=x: ours(x, m, k, rho, "bilinear", seed),
            "ours nearest": lambda seed, x=x: ours(x, m, k, rho, "nearest", seed),
            "torchvision nearest": lambda seed, x=x: theirs(x, m, k, "nearest", seed),
            "torchvision bilinear": lambda seed, x=x: theirs(x, m, k, "bilinear", seed),
        }
        row = [
            sum((run(seed) - x).abs().mean().item() for seed in range(args.seeds)) / args.seeds for run in runs.values()
        ]
        moved = f"{geometric_moved(x, m, rho, 'bilinear'):.2f} / {geometric_moved(x, m, rho, 'nearest'):.2f}"
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + f" | {moved} |")


if __name__ == "__main__":
    main()
