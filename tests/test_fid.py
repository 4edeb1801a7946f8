"""FID: pytorch-fid's formula against closed forms, streaming statistics, the on-disk cache, weights."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from evaluation import fid as fidmod
from evaluation.fid import (
    FIDUnavailable,
    cached_statistics,
    feature_statistics,
    fid,
    frechet_distance_stats,
    inception,
    inception_features,
)


class Flatten(torch.nn.Module):
    """A feature extractor whose features are the input values: (N, F, 1, 1) -> (N, F)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1)


def _spd(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T + dim * np.eye(dim)


def test_frechet_distance_closed_forms():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    # diagonal: |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    expected = 1 + 4 + 0.25 + (1 + 4 - 4) + (4 + 1 - 4) + (9 + 1 - 6)
    assert frechet_distance_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    s = _spd(5, 0)  # S2 = 4 S1 commutes with S1: Tr(S1 + 4 S1 - 2 * 2 S1) = Tr(S1)
    assert frechet_distance_stats(np.zeros(5), s, np.zeros(5), 4 * s) == pytest.approx(np.trace(s), rel=1e-7)
    assert frechet_distance_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 0.5, 1.0, 0.0]), np.array([0.5, 0.5, 0.0, -1.0])
    s1, s2 = _spd(4, 1) / 4, np.diag([0.5, 1.0, 2.0, 1.5])
    x = rng.multivariate_normal(mu1, s1, size=40_000)
    y = rng.multivariate_normal(mu2, s2, size=40_000)
    as_images = lambda f: torch.from_numpy(f).float().view(len(f), 4, 1, 1)  # noqa: E731
    got = fid(as_images(x), as_images(y), model=Flatten(), batch_size=8192)
    assert got == pytest.approx(frechet_distance_stats(mu1, s1, mu2, s2), rel=0.03)


def test_streaming_statistics_equal_numpy_for_any_batch_size():
    feats = torch.from_numpy(np.random.default_rng(2).normal(3.0, 2.0, size=(101, 6))).float()
    images = feats.view(101, 6, 1, 1)
    for batch in (1, 7, 1000):
        mu, sigma = feature_statistics(images, Flatten(), batch_size=batch)
        np.testing.assert_allclose(mu, feats.double().numpy().mean(0), rtol=1e-10)
        np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(images[:1], Flatten())


def test_reference_statistics_cached_under_key(tmp_path):
    gen = torch.rand(50, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    ref = torch.randint(0, 256, (80, 3, 1, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    model = Flatten()
    first = fid(gen, ref, model=model, reference_key="digits-80-abc", cache=str(tmp_path))
    files = list((tmp_path / "fid").glob("digits-80-abc-*.npz"))
    assert len(files) == 1
    calls = model.calls
    second = fid(gen, ref, model=model, reference_key="digits-80-abc", cache=str(tmp_path))
    assert second == first and model.calls - calls == 1  # only the generated batch was run again
    assert first == pytest.approx(fid(gen, ref, model=Flatten()), rel=1e-9)  # same as uncached
    # a cache entry for another key is not used: other images, another FID
    mu, _ = cached_statistics(ref[:40], "digits-40-def", Flatten(), tmp_path)
    np.testing.assert_allclose(mu, ref[:40].double().numpy().reshape(40, 3).mean(0) / 255, rtol=1e-6)


def test_missing_or_corrupt_weights_raise_unavailable(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FIDUnavailable, match="fid-weights file"):
        inception(str(bad), "cpu")
    with pytest.raises(FIDUnavailable, match="fid-weights file"):
        fid(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), str(tmp_path / "missing.pth"))


def test_inception_from_weights_file_gives_pool3_features(tmp_path):
    import pytorch_fid.inception as pf

    with (  # a weights file laid out like pytorch-fid's release, with random values
        mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None),
    ):
        state = pf.fid_inception_v3().state_dict()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    net = inception(str(path), "cpu")
    torch.testing.assert_close(net.state_dict()["blocks.0.0.conv.weight"], state["Conv2d_1a_3x3.conv.weight"])
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # random weights give denormal activations: slow, not wrong
    torch.set_num_threads(1)  # one 299x299 image: threads only add spin-waits on a busy CPU
    try:
        feats = inception_features(torch.rand(1, 1, 8, 8), net)  # grey is repeated to RGB
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()
    assert fidmod.weights_tag(str(path)).startswith("w") and fidmod.weights_tag("") == fidmod.DOWNLOAD_TAG
