"""The evaluator: metrics with planted copies, pictures and report on disk, FID reasons, digit_fd."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ddpm.data import ImageSet, load_dataset
from ddpm.unet import build_unet
from evaluation import digit_fd as dfd
from evaluation.config import EvalConfig
from evaluation.evaluator import MemorizationEvaluator
from evaluation.plots import plot_skip_histogram


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8, train_size=400, seed=0)


def _settings(cache, **kw) -> EvalConfig:
    base = dict(fid=False, fid_cache_dir=str(cache), mq_neighbours=10, eval_num_images=24, sample_steps=2)
    return EvalConfig(**{**base, **kw})


def test_planted_copies_raise_mq_and_copy_scores(tmp_path, cache, digits):
    gen = torch.Generator().manual_seed(0)
    copies = digits.images[:30].float() / 255
    images = torch.cat([copies, torch.rand(70, 1, 8, 8, generator=gen)])
    ev = MemorizationEvaluator(_settings(cache), digits, tmp_path, torch.device("cpu"))
    result = ev.evaluate_images(images, "round004", "round 4")
    m = result.metrics
    quality = {f"{q}{c}" for q in ("fid", "digit_fd") for c in ("", "_lo", "_hi", "_floor")}
    assert set(m) == {"mq_0.4", "mq_0.5", "mq_0.6", "copy_1", "copy_5"} | quality
    assert m["digit_fd_lo"] <= m["digit_fd"] <= m["digit_fd_hi"] and m["digit_fd_floor"] < m["digit_fd"]
    assert m["mq_0.4"] == 30  # exact copies have ratio 0; uniform noise is far from every digit
    assert m["copy_1"] == pytest.approx(0.30) and m["copy_5"] == pytest.approx(0.30)
    assert m["fid"] is None and ev.fid_reason == "disabled by setting fid = false"
    assert result.images is images and torch.equal(result.neighbours.nearest[:30], torch.arange(30))
    assert result.labels is None and set(result.scores) == {"digit_fd"}  # FID is off
    assert result.report == tmp_path / "eval_round004.md"
    for name in ("samples_round004.png", "pairs_round004.png", "ratios_round004.png", "eval_round004.md"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "eval_round004.md").read_text()
    texts = ("| 0.4 | 30 | 30.00% |", "`copy_1` = 0.3000", "FID: unavailable (disabled", "digit_fd: ", "not FID")
    for text in (*texts, "95% interval", "with 100 held-out images", "split-sample interval over the generated images"):
        assert text in report, text
    assert "![pairs](pairs_round004.png)" in report and "| 1 | 0 | 0 | 0.0000 | 0 |" in report
    assert m["digit_fd"] > ev.evaluate_images(digits.images[200:].float() / 255, "real").metrics["digit_fd"]


def test_call_samples_the_model_and_reports_fid_reason(tmp_path, cache, digits):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    settings = _settings(cache, fid=True, fid_weights=str(bad))
    torch.manual_seed(0)
    ev = MemorizationEvaluator(settings, digits, tmp_path, torch.device("cpu"))
    result = ev(3, build_unet("tiny", 8, 1))
    m, images = result.metrics, result.images
    assert images.shape == (24, 1, 8, 8) and 0 <= images.min() <= images.max() <= 1 and result.labels is None
    assert m["fid"] is None and "fid-weights file" in ev.fid_reason
    assert f"FID: unavailable ({ev.fid_reason})" in (tmp_path / "eval_round003.md").read_text()
    with pytest.raises(dataclasses.FrozenInstanceError):  # a value, not state of the evaluator
        result.images = None
    assert not any(name.startswith("last_") for name in vars(ev))
    assert 0 <= m["copy_1"] <= m["copy_5"] <= 1 and isinstance(m["digit_fd"], float)


def test_without_holdout_no_copy_scores(tmp_path, cache):
    gen = torch.Generator().manual_seed(1)
    data = ImageSet(
        "imagefolder",
        torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=gen),
        None,
        torch.empty((0, 3, 4, 4), dtype=torch.uint8),
    )
    ev = MemorizationEvaluator(_settings(cache, thresholds=(0.3, 0.9)), data, tmp_path, torch.device("cpu"))
    m = ev.evaluate_images(torch.rand(12, 3, 4, 4, generator=gen), "final").metrics
    assert set(m) == {"mq_0.3", "mq_0.9", "fid", "fid_lo", "fid_hi", "fid_floor"}
    assert "copy_1" not in (tmp_path / "eval_final.md").read_text().split("No held-out")[0]


def test_digit_classifier_is_deterministic_and_cached(tmp_path, digits, monkeypatch):
    labels = digits.holdout_labels
    from sklearn.datasets import load_digits

    order = np.random.default_rng(0).permutation(1797)
    assert labels.tolist() == load_digits().target[order[400:]].tolist()
    a = dfd.train_digit_net(digits.holdout, labels, seed=0, steps=15)
    b = dfd.train_digit_net(digits.holdout, labels, seed=0, steps=15)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    first = dfd.load_digit_fd(digits.images, digits.labels, digits.holdout, labels, tmp_path)
    assert first.accuracy > 0.9  # on the training split, which it never saw
    assert len(list((tmp_path / "digit_fd").glob("*.pt"))) == 1
    monkeypatch.setattr(dfd, "train_digit_net", lambda *a, **k: pytest.fail("retrained despite the cache"))
    again = dfd.load_digit_fd(digits.images, digits.labels, digits.holdout, labels, tmp_path)
    assert again(digits.images) == pytest.approx(0.0, abs=1e-6)  # training images against themselves
    assert again(digits.holdout) < again(torch.rand(300, 1, 8, 8))


def test_skip_histogram(tmp_path):
    path = plot_skip_histogram(np.array([0, 0, 1, 3, 3, 3, 7]), tmp_path / "skips.png")
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="non-negative"):
        plot_skip_histogram(np.array([1, -1]), tmp_path / "bad.png")


def test_the_app_settings_give_the_evaluation_config_and_its_defaults_are_the_settings():
    from fl_app.config import eval_config
    from fl_app.settings import Settings

    assert eval_config(Settings()) == EvalConfig()
    got = eval_config(Settings(mq_thresholds="0.3,0.7", eval_num_images=40, fid=False))
    assert (got.thresholds, got.eval_num_images, got.fid) == ((0.3, 0.7), 40, False)
