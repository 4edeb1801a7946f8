import math

import pytest
import torch

from clients.taa import RandAugmentPolicy, in_augment_range, magnitudes, strength


def test_augment_range_is_eq8_middle_case():
    r = torch.tensor([0.3, 0.5, 0.7, 0.85, 0.86, 5.0, math.inf])
    keep = r >= 0.5
    got = in_augment_range(r, keep, threshold=0.5, aug_range=1.7)
    assert got.tolist() == [False, True, True, False, False, False, False]
    inf = in_augment_range(r, keep, threshold=0.5, aug_range=math.inf)
    assert inf.tolist() == [False, True, True, True, True, True, False]  # never on an empty bank


def test_strength_is_eq7():
    r = torch.tensor([0.5, 0.6, 0.85], dtype=torch.float64)
    rho = strength(r, threshold=0.5, sharpness=5.0)
    expect = [math.exp(-5 * abs(x - 0.5) / 0.5) for x in (0.5, 0.6, 0.85)]
    assert rho.tolist() == pytest.approx(expect, rel=1e-12)
    assert magnitudes(rho, 5).tolist() == [round(e * 5) for e in expect]


def test_randaugment_policy_keeps_shape_range_and_identity_at_zero_strength():
    torch.manual_seed(0)
    images = torch.rand(12, 1, 8, 8)
    out = RandAugmentPolicy(max_magnitude=5)(images, torch.linspace(0.0, 1.0, 12))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    rgb = RandAugmentPolicy(max_magnitude=3)(torch.rand(5, 3, 16, 16), torch.ones(5))
    assert rgb.shape == (5, 3, 16, 16)
