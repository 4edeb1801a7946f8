"""MQ (eq. 12-13) and the calibrated copy score: exact against a direct loop, the same for any chunking."""

from __future__ import annotations

import pytest
import torch

from evaluation.mq import Neighbours, copy_scores, holdout_quantiles, mq_counts, nearest_neighbours


def _direct(generated: torch.Tensor, train: torch.Tensor, n: int):
    """The reference rule, one generated image at a time, in float64."""
    t = train.double().reshape(len(train), -1)
    dists, ids, ratios = [], [], []
    for g in generated.double().reshape(len(generated), -1):
        d = ((t - g) ** 2).sum(1)
        d_sorted, order = d.sort()
        dists.append(d_sorted[:n])
        ids.append(order[:n])
        ratios.append(d_sorted[0] / d_sorted[:n].mean())
    return torch.stack(dists), torch.stack(ids), torch.stack(ratios)


@pytest.fixture
def planted():
    """200 random training images; 40 generated, of which 6 are near-copies and 1 an exact copy."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(200, 3, 4, 4, generator=gen)
    generated = torch.rand(40, 3, 4, 4, generator=gen)
    sources = torch.tensor([3, 17, 42, 99, 150, 199])
    noise = 0.02 * torch.randn(6, 3, 4, 4, generator=gen)
    generated[:6] = (train[sources] + noise).clamp(0, 1)
    generated[6] = train[77]
    return generated, train, torch.cat([sources, torch.tensor([77])])


def test_matches_direct_loop_with_planted_copies(planted):
    generated, train, sources = planted
    n = 20
    nb = nearest_neighbours(generated, train, n, gen_chunk=7, train_chunk=33)
    d, ids, ratio = _direct(generated, train, n)
    torch.testing.assert_close(nb.dist.double(), d, rtol=1e-5, atol=1e-6)
    # float32 against float64: the nearest and the set of n nearest (all the ratio reads) are the
    # same; inner ranks closer than float32 rounding (5e-6 relative here) may swap
    assert torch.equal(nb.index[:, 0], ids[:, 0]) and torch.equal(nb.index.sort(1).values, ids.sort(1).values)
    torch.testing.assert_close(nb.ratio.double(), ratio, rtol=1e-5, atol=1e-7)
    assert torch.equal(nb.nearest[:7], sources)
    assert nb.dist[6, 0] == 0 and nb.ratio[6] == 0  # an exact copy scores exactly 0
    for t in (0.05, 0.4, 0.5, 0.6):
        assert mq_counts(nb.ratio, (t,))[f"mq_{t:g}"] == int((ratio < t).sum())
    assert mq_counts(nb.ratio, (0.4,))["mq_0.4"] >= 7  # every planted copy is counted


@pytest.mark.parametrize(("gen_chunk", "train_chunk"), [(1, 20), (7, 33), (3, 199), (1000, 100000)])
def test_the_same_neighbours_for_any_chunk_sizes(planted, gen_chunk, train_chunk):
    """Chunking changes only the shapes in which the winners' distances are recomputed (48-term
    float32 sums: relative rounding at most 47 u ~ 2.8e-6, u = 2^-24), so distances and ratios
    agree to that. The ratio needs only the nearest and the set of n nearest, which are the same
    wherever the 1st/2nd and n-th/(n+1)-th distances differ by more than rounding on both sides,
    as they do in the planted data (checked in float64); inner ranks may swap at a near-tie."""
    generated, train, _ = planted
    ref = nearest_neighbours(generated, train, 20)
    nb = nearest_neighbours(generated, train, 20, gen_chunk=gen_chunk, train_chunk=train_chunk)
    torch.testing.assert_close(nb.dist, ref.dist, rtol=3e-6, atol=0.0)
    torch.testing.assert_close(nb.ratio, ref.ratio, rtol=6e-6, atol=0.0)
    assert nb.ratio[6] == 0  # the exact copy: 0 in any chunking
    d, _, _ = _direct(generated, train, 21)
    gap = (d[:, 1:] - d[:, :-1]) / d[:, 1:]
    assert gap[:, 0].min() > 2 * 47 * 2**-24 and gap[:, 19].min() > 2 * 47 * 2**-24
    assert torch.equal(nb.index[:, 0], ref.index[:, 0])
    assert torch.equal(nb.index.sort(1).values, ref.index.sort(1).values)


def test_uint8_equals_float_in_unit_range():
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=gen)
    generated = torch.randint(0, 256, (9, 1, 8, 8), dtype=torch.uint8, generator=gen)
    a = nearest_neighbours(generated, train, 5)
    b = nearest_neighbours(generated.float() / 255, train.float() / 255, 5)
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.ratio, b.ratio)


def test_ratio_and_strict_threshold_on_hand_values():
    dist = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    nb = Neighbours(dist, torch.zeros(3, 3, dtype=torch.long))
    assert nb.ratio.tolist() == [0.5, 0.0, 0.0]  # 1 / mean(1, 2, 3); all-zero rows are copies
    counts = mq_counts(torch.tensor([0.4, 0.39999, 0.5, 0.7]), (0.4, 0.5, 0.6))
    assert counts == {"mq_0.4": 1, "mq_0.5": 2, "mq_0.6": 3}  # strictly below delta


@pytest.mark.parametrize(
    ("generated", "train", "n", "match"),
    [
        (torch.rand(2, 3, 4, 4), torch.rand(20, 3, 8, 8), 5, "training resolution"),
        (torch.rand(2, 1, 4, 4), torch.rand(4, 1, 4, 4), 5, "at least n=5"),
        (torch.full((2, 1, 4, 4), float("nan")), torch.rand(9, 1, 4, 4), 5, "NaN"),
        (torch.rand(2, 1, 4, 4) * 2 - 1, torch.rand(9, 1, 4, 4), 5, r"\[0, 1\]"),
        (torch.ones(2, 1, 4, 4, dtype=torch.int64), torch.rand(9, 1, 4, 4), 5, "uint8"),
        (torch.rand(2, 1, 4, 4), torch.rand(9, 1, 4, 4), 0, "n: must be >= 1"),
    ],
)
def test_bad_inputs_raise(generated, train, n, match):
    with pytest.raises(ValueError, match=match):
        nearest_neighbours(generated, train, n)


def test_copy_scores_on_hand_values():
    holdout = torch.linspace(0, 1, 101)  # 1 % quantile 0.01, 5 % quantile 0.05
    q = holdout_quantiles(holdout)
    assert q == pytest.approx({0.01: 0.01, 0.05: 0.05})
    scores = copy_scores(torch.tensor([0.0, 0.005, 0.03, 0.5]), holdout)
    assert scores == pytest.approx({"copy_1": 0.5, "copy_5": 0.75})


def test_copy_scores_floor_is_the_level_for_unseen_like_images():
    ratio = torch.randperm(1000).double() / 1000  # 1000 distinct values
    assert copy_scores(ratio, ratio) == pytest.approx({"copy_1": 0.01, "copy_5": 0.05})
    with pytest.raises(ValueError, match="held-out"):
        copy_scores(ratio, torch.empty(0))
