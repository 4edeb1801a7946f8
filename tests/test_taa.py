import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from clients.taa import (
    _APPLY,
    GATED_OPS,
    GEOMETRIC,
    OPS,
    RandAugmentPolicy,
    _geometry,
    in_augment_range,
    op_fraction,
    strength,
    torchvision_magnitude,
)
from ddpm.data import load_dataset, to_model_range

RHOS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def digits():
    images = load_dataset("digits", image_size=8, train_size=400).images[:256]
    return (to_model_range(images) + 1) / 2  # [0, 1], as the trainer hands them over


def test_augment_range_is_eq8_middle_case():
    r = torch.tensor([0.3, 0.5, 0.7, 0.85, 0.86, 5.0, math.inf])
    keep = r >= 0.5
    got = in_augment_range(r, keep, threshold=0.5, aug_range=1.7)
    assert got.tolist() == [False, True, True, False, False, False, False]
    inf = in_augment_range(r, keep, threshold=0.5, aug_range=math.inf)
    assert inf.tolist() == [False, True, True, True, True, True, False]  # never on an empty bank


def test_strength_is_eq7_and_scales_the_magnitude_continuously():
    r = torch.tensor([0.5, 0.6, 0.85], dtype=torch.float64)
    rho = strength(r, threshold=0.5, sharpness=5.0)
    expect = [math.exp(-5 * abs(x - 0.5) / 0.5) for x in (0.5, 0.6, 0.85)]
    assert rho.tolist() == pytest.approx(expect, rel=1e-12)
    assert op_fraction(rho, 5).tolist() == pytest.approx([e * 5 / 30 for e in expect], rel=1e-12)


def test_op_list_is_torchvisions_randaugment():
    assert set(OPS) == set(v2.RandAugment._AUGMENTATION_SPACE) and len(OPS) == 14
    assert GATED_OPS == {"Solarize", "AutoContrast", "Equalize"}
    assert GEOMETRIC == ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")  # _geometry's indices


def test_policy_keeps_shape_and_range_and_rho_zero_is_exact_identity():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 16, 16)
    rho = torch.linspace(0.0, 1.0, 64)
    rho[::4] = 0.0
    out = RandAugmentPolicy(max_magnitude=5)(images, rho)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[rho == 0], images[rho == 0])
    assert torch.equal(RandAugmentPolicy(30, 14)(images, torch.zeros(64)), images)
    assert RandAugmentPolicy(3)(torch.rand(0, 1, 8, 8), torch.zeros(0)).shape == (0, 1, 8, 8)


@pytest.mark.parametrize("magnitude", [3, 5])
@pytest.mark.parametrize("kind", ["digits", "rgb"])
def test_mean_change_grows_monotonically_with_rho(digits, kind, magnitude):
    torch.manual_seed(0)
    images = digits if kind == "digits" else torch.rand(256, 3, 32, 32)
    policy = RandAugmentPolicy(magnitude, 2)
    means = []
    for rho in RHOS:
        changes = []
        for seed in range(4):
            torch.manual_seed(seed)
            changes.append((policy(images, torch.full((images.shape[0],), rho)) - images).abs().mean())
        means.append(float(torch.stack(changes).mean()))
    assert means[0] == 0.0
    assert all(b > a for a, b in zip(means[:-1], means[1:], strict=True)), means
    assert means[1] < 0.2 * means[-1]  # rho = 0.05: a small fraction of the full change


def test_no_full_strength_operation_near_rho_zero(digits):
    """At rho -> 0 nothing acts at full effect: magnitude-free ops are gated by rho, the others
    shrink with it (digits have many saturated pixels: an ungated Solarize would flip them)."""
    torch.manual_seed(0)
    images = digits.repeat(4, 1, 1, 1)
    rho = 0.02
    out = RandAugmentPolicy(5, 2)(images, torch.full((images.shape[0],), rho))
    big = ((out - images).abs().flatten(1).amax(1) > 0.25).float().mean()
    assert big <= 2 * 2 * len(GATED_OPS) / len(OPS) * rho  # ~ num_ops * P(gated op) * rho, x2 slack


def test_identical_inputs_get_independent_draws():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16).expand(32, -1, -1, -1).contiguous()
    out = RandAugmentPolicy(5, 2)(image, torch.ones(32))
    distinct = torch.unique(out.flatten(1), dim=0).shape[0]
    assert distinct >= 24, distinct


def test_repeatable_from_the_seed():
    images, rho = torch.rand(48, 3, 16, 16), torch.rand(48)
    policy = RandAugmentPolicy(5, 2)
    torch.manual_seed(7)
    a = policy(images, rho)
    torch.manual_seed(7)
    b = policy(images, rho)
    torch.manual_seed(8)
    c = policy(images, rho)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_full_strength_colour_ops_match_torchvision():
    """At s = 1 (rho = 1, M = 30) with sign +1 the colour ops are torchvision's at magnitude 30."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 12, 12)
    u8 = (x * 255).round().to(torch.uint8)
    x8 = u8.float() / 255
    one, ones = torch.ones(6), torch.ones(6)
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(_APPLY["Brightness"](x, one, ones), tvf.adjust_brightness(x, 1.9), **close)
    torch.testing.assert_close(_APPLY["Color"](x, one, ones), tvf.adjust_saturation(x, 1.9), **close)
    torch.testing.assert_close(_APPLY["Contrast"](x, one, ones), tvf.adjust_contrast(x, 1.9), **close)
    torch.testing.assert_close(_APPLY["Sharpness"](x, one, ones), tvf.adjust_sharpness(x, 1.9), **close)
    torch.testing.assert_close(_APPLY["Brightness"](x, one, -ones), tvf.adjust_brightness(x, 0.1), **close)
    torch.testing.assert_close(_APPLY["Solarize"](x, one * 0.3, ones), tvf.solarize(x, 0.7), **close)
    posterized = tvf.posterize(u8, 4).float() / 255  # 8 - 4 bits at magnitude 30
    torch.testing.assert_close(_APPLY["Posterize"](x8, one, ones), posterized, **close)
    # 8 bits (s = 0) leaves 8-bit images as they are, as torchvision's posterize at magnitude 0
    torch.testing.assert_close(_APPLY["Posterize"](x8, one * 0, ones), x8, rtol=0, atol=0)


def test_geometric_ops_move_by_their_fraction_of_the_range():
    x = torch.rand(2, 1, 16, 16)
    s = torch.full((2,), 3 / ((150 / 331) * 16))  # exactly 3 pixels
    sign = torch.tensor([1.0, -1.0])
    moved = _APPLY["TranslateX"](x, s, sign)
    torch.testing.assert_close(moved[0, :, :, 3:], x[0, :, :, :-3], rtol=0, atol=1e-5)
    torch.testing.assert_close(moved[1, :, :, :-3], x[1, :, :, 3:], rtol=0, atol=1e-5)
    assert moved[0, :, :, :3].abs().max() == 0  # black fill, as torchvision's default
    quarter = torch.full((2,), 3.0)  # 90 degrees = 30 * s: the grid maps onto itself
    turned = _APPLY["Rotate"](x, quarter, torch.ones(2))
    candidates = [torch.rot90(x, 1, (-2, -1)), torch.rot90(x, -1, (-2, -1))]
    assert min(float((turned - c).abs().max()) for c in candidates) < 1e-5


def test_geometric_ops_resampled_together_equal_each_alone():
    torch.manual_seed(0)
    x, s, sign = torch.rand(10, 3, 16, 16), torch.rand(10) * 0.5, torch.randint(0, 2, (10,)) * 2.0 - 1
    op = torch.arange(10) % len(GEOMETRIC)
    together = _geometry(x, s, sign, op)
    for i in range(10):
        alone = _APPLY[GEOMETRIC[op[i]]](x[i : i + 1], s[i : i + 1], sign[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-6)


# ---- taa-interpolation: nearest is torchvision's RandAugment ------------------------------------
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 16, 24)])
def test_nearest_geometric_ops_are_torchvisions_randaugment_ops(shape):
    """Every geometric op at 31 fractions and both signs, batched in one call, equals torchvision's
    RandAugment op (its own ``_apply_image_or_video_transform``, nearest) at the same signed
    magnitude, bit for bit: whole-pixel translations, shears about the top left corner (ties at
    half pixels fall as torchvision's do)."""
    torch.manual_seed(0)
    fractions = torch.linspace(0.0, 1.0, 31)
    s = fractions.repeat(2 * len(GEOMETRIC))
    sign = torch.tensor([1.0, -1.0]).repeat_interleave(31).repeat(len(GEOMETRIC))
    op = torch.arange(len(GEOMETRIC)).repeat_interleave(62)
    x = torch.rand(len(s), *shape)
    got = _geometry(x, s, sign, op, "nearest")
    magnitude = torchvision_magnitude(s, sign, op, shape[1:])
    policy = v2.RandAugment()
    for i in range(len(s)):
        want = policy._apply_image_or_video_transform(
            x[i], GEOMETRIC[op[i]], float(magnitude[i]), v2.InterpolationMode.NEAREST, policy._fill
        )
        assert torch.equal(got[i], want), (GEOMETRIC[op[i]], float(s[i]), float(sign[i]))
    # at full strength the magnitudes are torchvision's bins at M = 30: 0.3, 150/331 of the side, 30 degrees
    top = torchvision_magnitude(torch.ones(5), torch.ones(5), torch.arange(5), shape[1:])
    assert top.tolist() == pytest.approx([-0.3, -0.3, 150 / 331 * shape[2], 150 / 331 * shape[1], 30.0])


def test_nearest_moves_no_digit_pixel_at_m3_where_bilinear_does(digits):
    """On 8x8 digits at M = 3 (0.3 px translations, 0.03 shear, 3 degrees) torchvision's nearest
    ops leave every pixel where it is; bilinear resampling changes every digit."""
    n = digits.shape[0]
    s = op_fraction(torch.ones(n), 3)
    for op in range(len(GEOMETRIC)):
        for sign in (1.0, -1.0):
            args = (digits, s, torch.full((n,), sign), torch.full((n,), op))
            assert torch.equal(_geometry(*args, "nearest"), digits)
            assert ((_geometry(*args, "bilinear") - digits).abs().flatten(1).amax(1) > 0).all()


def test_nearest_copy_changes_digits_as_torchvision_randaugment(digits):
    """Mean absolute change of a copy at rho = 1, M = 3, two ops: nearest within 10 % of
    torchvision's RandAugment (0.025; scripts/taa_change.py), bilinear about twice that."""
    n = digits.shape[0]
    change = {}
    for mode in ("nearest", "bilinear"):
        torch.manual_seed(0)
        change[mode] = float((RandAugmentPolicy(3, 2, mode)(digits, torch.ones(n)) - digits).abs().mean())
    torch.manual_seed(0)
    ra = v2.RandAugment(num_ops=2, magnitude=3)
    theirs = float(torch.stack([(ra(x) - x).abs().mean() for x in digits.repeat(4, 1, 1, 1)]).mean())
    assert change["nearest"] == pytest.approx(theirs, rel=0.1)
    assert change["bilinear"] > 1.6 * theirs


def test_bilinear_is_the_default_and_an_unknown_interpolation_is_refused():
    assert RandAugmentPolicy(3).interpolation == "bilinear"
    with pytest.raises(ValueError, match="^taa-interpolation: must be one of bilinear, nearest, got 'cubic'$"):
        RandAugmentPolicy(3, 2, "cubic")
