"""The quality figure's uncertainty: batched Fréchet distances, the bootstrap interval, the floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from ddpm.data import load_dataset
from evaluation import digit_fd as dfd
from evaluation.bootstrap import frechet_distance_batch, frechet_interval, score_features
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


def test_interval_is_the_shifted_percentile_of_resampled_distances():
    x, ref = _gaussian(60, 4, 1, shift=0.3), _gaussian(500, 4, 2)
    mu_r, s_r = in_memory_statistics(ref)
    got = frechet_interval(x, mu_r, s_r, resamples=50, seed=7)
    # the same resamples, one at a time, with pytorch-fid's distance
    idx = torch.randint(0, 60, (50, 60), generator=torch.Generator().manual_seed(7))
    dist = np.array([calculate_frechet_distance(*in_memory_statistics(x[i]), mu_r, s_r) for i in idx])
    own = calculate_frechet_distance(*in_memory_statistics(x), mu_r, s_r)
    bias = dist.mean() - own
    assert got.bias == pytest.approx(bias, rel=1e-6) and bias > 0  # repeated rows look farther away
    lo, hi = np.quantile(dist, [0.025, 0.975])
    assert (got.lo, got.hi) == pytest.approx((max(0.0, lo - bias), hi - bias), rel=1e-6)
    assert got.lo <= own <= got.hi
    assert frechet_interval(x, mu_r, s_r, resamples=50, seed=7) == got  # repeatable from the seed


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
