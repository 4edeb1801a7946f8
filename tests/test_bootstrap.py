"""The quality figure's uncertainty: batched Fréchet distances, the split-sample interval, the floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from ddpm.data import load_dataset
from evaluation import digit_fd as dfd
from evaluation.bootstrap import (
    extrapolated_variance,
    frechet_distance_batch,
    frechet_interval,
    score_features,
    split_variances,
)
from evaluation.fid import fid_score
from evaluation.frechet import frechet_distance_stats, in_memory_statistics, streamed_statistics

pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # pytorch-fid 0.3 on scipy


def _gaussian(n: int, f: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(f, f, generator=gen, dtype=torch.float64) / f**0.5
    return torch.randn(n, f, generator=gen, dtype=torch.float64) @ mix + shift


def test_batched_distance_equals_pytorch_fid():
    ref = _gaussian(400, 6, 0)
    mu_r, s_r = in_memory_statistics(ref)
    others = [in_memory_statistics(_gaussian(300, 6, s, shift=0.1 * s)) for s in range(1, 5)]
    got = frechet_distance_batch(
        torch.tensor(np.stack([m for m, _ in others])),
        torch.tensor(np.stack([s for _, s in others])),
        torch.tensor(mu_r),
        torch.tensor(s_r),
    )
    want = [calculate_frechet_distance(m, s, mu_r, s_r) for m, s in others]
    assert got.tolist() == pytest.approx(want, rel=1e-7, abs=1e-9)


def test_split_variances_are_the_quarters_and_halves_spread():
    """Each split: a seeded permutation cut into 4 quarters; Var(FD_{N/4}) is the quarters' FD
    variance (ddof 1), Var(FD_{N/2}) the mean of (FD_a - FD_b)^2 / 2 over the 3 pairings of
    quarters into halves; both averaged over the splits. Recomputed here with pytorch-fid."""
    x, ref = _gaussian(22, 3, 1, shift=0.3), _gaussian(500, 3, 2)
    mu_r, s_r = in_memory_statistics(ref)
    half, quarter = split_variances(x, torch.tensor(mu_r), torch.tensor(s_r), splits=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    cut = [0, 5, 11, 16, 22]  # 22 * q // 4
    want_half, want_quarter = [], []
    for _ in range(3):
        order = torch.randperm(22, generator=gen)
        parts = [order[a:b] for a, b in zip(cut[:-1], cut[1:], strict=True)]
        fd = lambda idx: calculate_frechet_distance(*in_memory_statistics(x[idx]), mu_r, s_r)  # noqa: E731
        q = [fd(p) for p in parts]
        want_quarter.append(np.var(q, ddof=1))
        for a, b, c, d in ((0, 1, 2, 3), (0, 2, 1, 3), (0, 3, 1, 2)):
            pair = fd(torch.cat([parts[a], parts[b]])) - fd(torch.cat([parts[c], parts[d]]))
            want_half.append(pair**2 / 2)
    assert (half, quarter) == pytest.approx((np.mean(want_half), np.mean(want_quarter)), rel=1e-6)


def test_variance_extrapolates_from_half_and_quarter_sizes():
    """Var(FD_m) = a/m + b/m^2 fitted at N/2 and N/4, read at N; kept between the two pure cases."""
    u, v = 0.3, 0.7  # a/N and b/N^2
    assert extrapolated_variance(2 * u + 4 * v, 4 * u + 16 * v) == pytest.approx(u + v)
    assert extrapolated_variance(2 * u, 4 * u) == pytest.approx(u)  # linear only: half / 2
    assert extrapolated_variance(4 * v, 16 * v) == pytest.approx(v)  # quadratic only: half / 4
    assert extrapolated_variance(1.0, 0.5) == 0.5  # noise beyond the model: at most half / 2
    assert extrapolated_variance(1.0, 9.0) == 0.25  # and at least half / 4


def test_interval_is_the_figure_plus_minus_z_sd():
    x, ref = _gaussian(60, 4, 1, shift=0.3), _gaussian(500, 4, 2)
    mu_r, s_r = in_memory_statistics(ref)
    got = frechet_interval(x, mu_r, s_r, resamples=10, seed=7)
    half, quarter = split_variances(torch.as_tensor(x), torch.tensor(mu_r), torch.tensor(s_r), splits=10, seed=7)
    sd = extrapolated_variance(half, quarter) ** 0.5
    own = calculate_frechet_distance(*in_memory_statistics(x), mu_r, s_r)
    assert got.sd == pytest.approx(sd, rel=1e-9) and sd > 0
    assert (got.lo, got.hi) == pytest.approx((max(0.0, own - 1.959964 * sd), own + 1.959964 * sd), rel=1e-6)
    assert frechet_interval(x, mu_r, s_r, resamples=10, seed=7) == got  # repeatable from the seed
    assert frechet_interval(x, mu_r, s_r, resamples=10, seed=8) != got
    few = frechet_interval(x[:7], mu_r, s_r, resamples=10)  # no quarter with a covariance
    assert np.isnan([few.lo, few.hi, few.sd]).all()


def test_interval_holds_the_expected_figure_95_percent_of_runs():
    """Coverage by simulation (fixed seeds): 16-d Gaussian features, N = 200, a model off the
    reference. E[FD_N] and the real sd(FD_N) from 400 independent sample sets; over 80 more the
    interval holds E[FD_N] in at least 70 (95 % is 76, binomial sd 2) and is as wide as 2 z sd(FD_N) to
    20 % (scripts/fd_interval_coverage.py: the 64-d table in docs/results.md)."""
    f, n = 16, 200
    mu_r, s_r = in_memory_statistics(_gaussian(20_000, f, 0))
    gen = torch.Generator().manual_seed(3)
    draw = lambda: torch.randn(n, f, generator=gen, dtype=torch.float64) * 1.1 + 0.05  # noqa: E731
    fds = torch.tensor([frechet_distance_stats(*in_memory_statistics(draw()), mu_r, s_r) for _ in range(400)])
    expected, real = float(fds.mean()), 2 * 1.959964 * float(fds.std())
    intervals = [frechet_interval(draw(), mu_r, s_r, seed=i) for i in range(80)]
    held = sum(i.lo <= expected <= i.hi for i in intervals)
    assert held >= 70, held  # an interval too wide holds it always: the width bound below catches that
    assert 0.8 < np.mean([i.width for i in intervals]) / real < 1.2


def test_interval_narrows_with_more_samples():
    mu_r, s_r = in_memory_statistics(_gaussian(4000, 4, 3))
    small = frechet_interval(_gaussian(100, 4, 4, 0.2), mu_r, s_r, resamples=200)
    large = frechet_interval(_gaussian(1600, 4, 4, 0.2), mu_r, s_r, resamples=200)
    assert large.width < small.width / 2  # ~1/sqrt(16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"features": torch.zeros(1, 3)}, "features: need a"), ({"resamples": 1}, "resamples"), ({"level": 1.0}, "level")],
)
def test_interval_refuses_bad_arguments(kwargs, message):
    args = {"features": torch.zeros(5, 3), "resamples": 10, "level": 0.9, **kwargs}
    with pytest.raises(ValueError, match=message):
        frechet_interval(args.pop("features"), np.zeros(3), np.eye(3), **args)


def test_floor_scores_as_many_held_out_rows():
    gen, floor = _gaussian(30, 3, 5, 1.0), _gaussian(80, 3, 6)
    mu_r, s_r = in_memory_statistics(_gaussian(500, 3, 7))
    score = score_features(gen, mu_r, s_r, floor, resamples=20)
    assert score.floor_n == 30
    assert score.floor == pytest.approx(calculate_frechet_distance(*in_memory_statistics(floor[:30]), mu_r, s_r))
    assert score.floor < score.value  # the shifted sample is farther than real rows
    assert set(score.columns("q")) == {"q", "q_lo", "q_hi", "q_floor"}
    assert score_features(gen, mu_r, s_r, floor[:10], resamples=20).floor_n == 10  # fewer held out than generated
    assert score_features(gen, mu_r, s_r, None, resamples=20).floor is None


def test_digit_fd_floor_uses_held_out_digits_the_classifier_never_saw(tmp_path):
    digits = load_dataset("digits", image_size=8, train_size=400, seed=0)
    scorer = dfd.load_digit_fd(digits.images, digits.labels, digits.holdout, digits.holdout_labels, tmp_path)
    held = {bytes(x) for x in digits.holdout.numpy()}
    floor = {bytes(x) for x in scorer.floor_images.numpy()}
    assert floor <= held and len(scorer.floor_images) == len(digits.holdout) - len(digits.holdout) // 3
    real = scorer.score(scorer.floor_images[:300])
    noise = scorer.score(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert real.floor == pytest.approx(real.value)  # the floor is exactly these images
    assert real.lo <= real.value <= real.hi and noise.lo <= noise.value <= noise.hi
    assert real.hi < noise.lo  # the interval separates real digits from noise


def test_fid_score_has_the_fid_its_interval_and_floor():
    """The FID path with a stand-in feature network (no Inception weights offline)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    digits = load_dataset("digits", image_size=8, train_size=300, seed=0)
    generated = torch.rand(80, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    score = fid_score(generated, digits.images, model=net, floor01=digits.holdout, resamples=30)
    ref = streamed_statistics(digits.images, net)
    point = lambda x: frechet_distance_stats(*streamed_statistics(x, net), *ref)  # noqa: E731
    assert score.value == pytest.approx(point(generated))
    assert score.floor == pytest.approx(point(digits.holdout[:80])) and score.floor_n == 80
    assert score.lo <= score.value <= score.hi and score.floor < score.lo
