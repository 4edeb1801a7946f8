"""FID: pytorch-fid's formula against closed forms, streaming statistics, the on-disk cache, weights."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.data import load_dataset
from evaluation import fid as fidmod
from evaluation.config import EvalConfig
from evaluation.evaluator import MemorizationEvaluator
from evaluation.fid import (
    FID_WEIGHTS_SHA256,
    FIDUnavailable,
    cached_statistics,
    fid_score,
    inception,
    inception_features,
    sha256_file,
)
from evaluation.frechet import frechet_distance_stats, in_memory_statistics, streamed_statistics


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
    got = fid_score(as_images(x), as_images(y), model=Flatten(), batch_size=8192, resamples=2).value
    assert got == pytest.approx(frechet_distance_stats(mu1, s1, mu2, s2), rel=0.03)


def test_streaming_statistics_equal_numpy_for_any_batch_size():
    feats = torch.from_numpy(np.random.default_rng(2).normal(3.0, 2.0, size=(101, 6))).float()
    images = feats.view(101, 6, 1, 1)
    for batch in (1, 7, 1000):
        mu, sigma = streamed_statistics(images, Flatten(), batch_size=batch)
        np.testing.assert_allclose(mu, feats.double().numpy().mean(0), rtol=1e-10)
        np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        streamed_statistics(images[:1], Flatten())


def test_streamed_and_in_memory_statistics_agree():
    """The two fits of a Gaussian (streamed for reference sets, in memory for generated features)
    give the same mean and covariance to float64 rounding, for any batch size."""
    feats = torch.from_numpy(np.random.default_rng(7).normal(-1.0, 3.0, size=(257, 9))).float()  # as a model gives
    mu, sigma = in_memory_statistics(feats)
    for batch in (1, 50, 1000):
        mu_s, sigma_s = streamed_statistics(feats.view(257, 9, 1, 1), Flatten(), batch_size=batch)
        np.testing.assert_allclose(mu_s, mu, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(sigma_s, sigma, rtol=1e-12, atol=1e-12)


def test_reference_statistics_cached_under_key(tmp_path):
    gen = torch.rand(50, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    ref = torch.randint(0, 256, (80, 3, 1, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    model = Flatten()
    first = fid_score(gen, ref, model=model, reference_key="digits-80-abc", cache=str(tmp_path), resamples=2).value
    files = list((tmp_path / "fid").glob("digits-80-abc-*.npz"))
    assert len(files) == 1
    calls = model.calls
    second = fid_score(gen, ref, model=model, reference_key="digits-80-abc", cache=str(tmp_path), resamples=2).value
    assert second == first and model.calls - calls == 1  # only the generated batch was run again
    assert first == pytest.approx(fid_score(gen, ref, model=Flatten(), resamples=2).value, rel=1e-9)  # same as uncached
    # a cache entry for another key is not used: other images, another FID
    mu, _ = cached_statistics(ref[:40], "digits-40-def", Flatten(), tmp_path)
    np.testing.assert_allclose(mu, ref[:40].double().numpy().reshape(40, 3).mean(0) / 255, rtol=1e-6)


def test_missing_or_corrupt_weights_raise_unavailable(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FIDUnavailable, match="fid-weights file .*bad.pth refused: its sha256 is"):
        inception(str(bad), "cpu")
    with pytest.raises(FIDUnavailable, match="fid-weights file .*missing.pth: no such file"):
        fid_score(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), str(tmp_path / "missing.pth"), resamples=2)
    with pytest.raises(FIDUnavailable, match="not a weights-only state dict"):  # right hash, not a checkpoint
        inception(str(bad), "cpu", sha256_file(bad))


def test_known_hash_is_pytorch_fids():
    import pytorch_fid.inception as pf

    prefix = torch.hub.HASH_REGEX.search(pf.FID_WEIGHTS_URL.rsplit("/", 1)[-1]).group(1)
    assert prefix == "6726825d" and FID_WEIGHTS_SHA256.startswith(prefix) and len(FID_WEIGHTS_SHA256) == 64
    assert fidmod.FID_WEIGHTS_FILE == "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch.hub directory (where pytorch-fid's download lands), with inception's cache cleared."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    inception.cache_clear()
    yield fidmod.download_path()
    inception.cache_clear()


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A weights file laid out like pytorch-fid's release (its keys and shapes), with random values."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random.pth"
    torch.save(fidmod.fid_inception_net(None).state_dict(), path)
    return path


def test_weights_with_another_hash_are_refused(random_weights, hub, tmp_path):
    with pytest.raises(FIDUnavailable, match=r"random.pth refused: its sha256 is [0-9a-f]{16}\.\.\., not 6726825d"):
        inception(str(random_weights), "cpu")
    # the cached download is checked the same way (a stale or replaced file is refused, never loaded)
    hub.parent.mkdir(parents=True)
    hub.write_bytes(random_weights.read_bytes())
    with pytest.raises(FIDUnavailable, match="cached Inception weights .* refused: .*delete the file"):
        inception("", "cpu")
    # the evaluator records FID as unavailable with that reason, and the evaluation goes on
    data = load_dataset("digits", image_size=8, train_size=40, seed=0)
    settings = EvalConfig(fid=True, fid_weights=str(random_weights), fid_cache_dir=str(tmp_path), mq_neighbours=5)
    ev = MemorizationEvaluator(settings, data, tmp_path / "eval", torch.device("cpu"))
    result = ev.evaluate_images(data.images[:6].float() / 255)
    metrics = result.metrics
    assert metrics["fid"] is None and metrics["mq_0.4"] == 6
    assert "fid-weights file" in ev.fid_reason and "refused: its sha256 is" in ev.fid_reason
    assert f"FID: unavailable ({ev.fid_reason})" in result.report.read_text()


def test_download_is_hash_checked(hub, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # a server handing out another file
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"another file")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(FIDUnavailable, match="cached Inception weights .* refused: its sha256"):
        inception("", "cpu")
    assert calls == [(fidmod.FID_WEIGHTS_URL, FID_WEIGHTS_SHA256)]  # torch.hub checks it while downloading too

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("Name or service not known")

    hub.unlink()
    inception.cache_clear()
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FIDUnavailable, match="download from .*URLError"):
        inception("", "cpu")


class RunsCode:
    """Unpickling this calls ``exec``: what a full unpickler does with a hostile .pth file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_pickle_that_runs_code_is_never_run(tmp_path, hub):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": RunsCode(marker)}, evil)
    with pytest.raises(FIDUnavailable, match="refused: its sha256"):  # the hash refuses it unread
        inception(str(evil), "cpu")
    with pytest.raises(FIDUnavailable, match="not a weights-only state dict .*UnpicklingError"):
        inception(str(evil), "cpu", sha256_file(evil))  # even with its own hash: weights_only=True refuses
    hub.parent.mkdir(parents=True)
    hub.write_bytes(evil.read_bytes())
    with pytest.raises(FIDUnavailable, match="not a weights-only state dict"):
        inception("", "cpu", sha256_file(evil))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file is live: a full unpickler runs it
    assert marker.read_text() == "ran"


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 3 images: singular covariances, both sides alike
def test_accepted_weights_give_pytorch_fids_network_and_fid(random_weights, hub):
    import pytorch_fid.inception as pf

    digest = sha256_file(random_weights)
    hub.parent.mkdir(parents=True)
    hub.write_bytes(random_weights.read_bytes())
    theirs = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # pytorch-fid reads it from its cache
    ours = inception(str(random_weights), "cpu", digest)
    cached = inception("", "cpu", digest.upper()[:12])  # the cached download; a prefix of the hash will do
    assert str(ours).replace("PoolInception", "InceptionV3", 1) == str(theirs)
    for net in (ours, cached):
        mine, ref = net.state_dict(), theirs.state_dict()
        assert list(mine) == list(ref) and all(torch.equal(mine[k], ref[k]) for k in ref)
    gen = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))  # grey is repeated to RGB
    real = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # random weights give denormal activations: slow, not wrong
    torch.set_num_threads(1)  # small 299x299 batches: threads only add spin-waits on a busy CPU
    try:
        feats = inception_features(gen[:1], ours)
        stats = {name: [streamed_statistics(x, m) for x in (gen, real)] for name, m in (("ours", ours), ("pf", theirs))}
        got = fid_score(gen, real, str(random_weights), expected_sha256=digest, resamples=2).value  # 2048-d: ~20 s
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()
    for (mu, sigma), (mu_pf, sigma_pf) in zip(stats["ours"], stats["pf"], strict=True):
        np.testing.assert_array_equal(mu, mu_pf)  # pytorch-fid's own network's statistics, so its FID
        np.testing.assert_array_equal(sigma, sigma_pf)
    assert np.isfinite(got) and got >= 0
    assert fidmod.weights_tag(str(random_weights)) == "w" + digest[:16]
    assert fidmod.weights_tag("") == fidmod.DOWNLOAD_TAG
