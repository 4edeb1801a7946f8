"""Sim Score: a stand-in SSCD network saved as TorchScript and loaded through the real loader,
planted copies, exact chunked matching against the dense product, the background without
self-matches, DCR's percentile and the unavailable reasons."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

from evaluation.crops import dcr_crops
from evaluation.sscd import (
    SSCDUnavailable,
    background_scores,
    best_matches,
    cached_features,
    load_sscd,
    percentile,
    sim_score,
    sim_scores,
    sscd_features,
    summarize,
)

DIM = 64


class StandIn(torch.nn.Module):
    """A tiny conv net in SSCD's place: conv, 4x4 average pool, centred random projection to
    ``dim`` features, L2-normalised; symmetrised over horizontal flips (SSCD is trained to ignore them)."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.proj = torch.nn.Linear(8 * 16, dim, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(self.conv(x), 4).flatten(1)
        return self.proj(f - f.mean(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(x) + self.embed(torch.flip(x, dims=[3])), dim=1)


def save_torchscript(module: torch.nn.Module, path) -> None:
    """``module`` scripted and saved as SSCD's files are (torch 2.14 marks torch.jit deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module.eval()).save(str(path))


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sscd") / "standin.torchscript.pt"
    save_torchscript(StandIn(), path)
    return path


@pytest.fixture(scope="module")
def train_images():
    """40 distinct smooth 64x64 RGB images (random 8x8 colours, upsampled), uint8."""
    coarse = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return (F.interpolate(coarse, size=64, mode="bilinear") * 255).round().to(torch.uint8)


def test_loader_reads_the_torchscript_file_and_records_its_sha256(sscd_file):
    net = load_sscd(str(sscd_file), dim=DIM)
    assert net.dim == DIM and net.sha256 == hashlib.sha256(sscd_file.read_bytes()).hexdigest()
    assert load_sscd(str(sscd_file), dim=DIM) is net  # cached per file state and device
    assert load_sscd(str(sscd_file), dim=0).dim == DIM  # dim 0: any feature size
    assert load_sscd(str(sscd_file), expected_sha256=net.sha256[:12].upper(), dim=DIM).sha256 == net.sha256


def test_planted_copies_are_found(sscd_file, train_images):
    """An exact copy scores 1 against its original; a flipped and a noised copy rank it first;
    new images score lower. The nearest index is what the pairs grid will show."""
    net = load_sscd(str(sscd_file), dim=DIM)
    noise = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 12
    noised = (train_images[21].float() + noise).clamp(0, 255).to(torch.uint8)
    fresh = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    generated = torch.stack([train_images[7], train_images[12].flip(-1), noised, *fresh])
    result = sim_score(generated, train_images, net, batch_size=4)
    assert result.matches.scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert result.matches.index[:3].tolist() == [7, 12, 21]
    assert result.matches.scores[2] > 0.99 and (result.matches.scores[3:] < 0.9).all()
    assert result.sha256 == net.sha256
    assert (result.background.index != torch.arange(40)).all() and result.background.scores.max() < 0.9
    metrics = result.metrics()
    assert set(metrics) == {"sim_p95", "sim_mean", "sim_gt_0.5", "sim_bg_p95", "sim_bg_mean", "sim_bg_gt_0.5"}
    assert metrics["sim_p95"] == pytest.approx(percentile(result.matches.scores, 95))
    # uint8 and [0, 1] inputs, any batch size: the same features
    feats = sscd_features(train_images, net, batch_size=40)
    torch.testing.assert_close(sscd_features(train_images.float() / 255, net, batch_size=7), feats, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(40))


def test_features_see_dcrs_crops(sscd_file):
    """The network receives DCR's ret_transform output: Resize(256), CenterCrop(224), Normalize(0.5, 0.5)."""
    images = torch.rand(2, 3, 40, 70, generator=torch.Generator().manual_seed(4))
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.Normalize([0.5], [0.5])])
    torch.testing.assert_close(dcr_crops(images), ref(images))
    assert dcr_crops(images).shape == (2, 3, 224, 224)
    seen = []
    sscd_features(images, lambda x: seen.append(x) or torch.ones(x.shape[0], 3))
    torch.testing.assert_close(seen[0], ref(images))


def _random_feats(n: int, seed: int, dim: int = 16) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_chunked_matching_equals_the_dense_product():
    gen, train = _random_feats(37, 5), _random_feats(53, 6)
    dense_v, dense_i = (gen @ train.T).max(dim=1)
    for q, k in [(5, 7), (1, 1), (37, 53), (100, 4)]:
        m = sim_scores(gen, train, query_chunk=q, key_chunk=k)
        assert torch.equal(m.index, dense_i)
        torch.testing.assert_close(m.scores, dense_v, rtol=0, atol=1e-6)
    self_masked = train @ train.T
    self_masked.fill_diagonal_(-torch.inf)
    bg_v, bg_i = self_masked.max(dim=1)
    for q, k in [(5, 7), (53, 53), (8, 3)]:
        bg = background_scores(train, query_chunk=q, key_chunk=k)
        assert torch.equal(bg.index, bg_i)
        torch.testing.assert_close(bg.scores, bg_v, rtol=0, atol=1e-6)


def test_background_excludes_self_matches_but_not_duplicates():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    feats = torch.stack([e1, e2, F.normalize(e1 + e2, dim=0), torch.tensor([0.0, 0.0, 1.0]), e2])
    bg = background_scores(feats, query_chunk=2, key_chunk=3)
    # e2 and its duplicate (row 4) match each other; ties (rows 2 and 3) go to the lowest index
    assert bg.index.tolist() == [2, 4, 0, 0, 1]
    torch.testing.assert_close(bg.scores, torch.tensor([0.5**0.5, 1.0, 0.5**0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="at least 2 key rows"):
        background_scores(feats[:1])
    with pytest.raises(ValueError, match="finite"):
        best_matches(torch.full((1, 3), float("nan")), feats)


def test_percentile_and_summary_are_dcrs():
    scores = torch.tensor([0.6, 0.1, 0.5, 0.3, 0.2])
    # np.percentile's linear rule: sorted [0.1, 0.2, 0.3, 0.5, 0.6], position 0.95 * 4 = 3.8
    assert percentile(scores, 95) == pytest.approx(0.5 + 0.8 * (0.6 - 0.5), abs=1e-7)
    assert percentile(np.array([1.0, 2.0, 3.0, 4.0]), 50) == 2.5
    summary = summarize(scores)
    assert summary["sim_p95"] == pytest.approx(0.58, abs=1e-7)
    assert summary["sim_mean"] == pytest.approx(0.34, abs=1e-7)
    assert summary["sim_gt_0.5"] == pytest.approx(0.2)  # strictly above: 0.5 itself does not count


def test_unavailable_reasons(tmp_path, sscd_file):
    with pytest.raises(SSCDUnavailable, match="sscd-weights is empty: .*CC-BY-NC.*never downloaded"):
        load_sscd("")
    with pytest.raises(SSCDUnavailable, match="missing.pt: no such file"):
        load_sscd(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a network")
    with pytest.raises(SSCDUnavailable, match="garbage.pt: not a TorchScript file"):
        load_sscd(str(garbage))
    state = tmp_path / "state.pt"
    torch.save(StandIn().state_dict(), state)
    with pytest.raises(SSCDUnavailable, match="state.pt: not a TorchScript file"):
        load_sscd(str(state))
    with pytest.raises(SSCDUnavailable, match=f"gives {DIM}-d features, not 1024"):
        load_sscd(str(sscd_file))  # SSCD large's 1024 by default
    with pytest.raises(SSCDUnavailable, match=r"refused: its sha256 is [0-9a-f]{16}\.\.\., not 00000000"):
        load_sscd(str(sscd_file), expected_sha256="0" * 64, dim=DIM)
    scalar = tmp_path / "scalar.pt"
    save_torchscript(torch.nn.Flatten(0), scalar)
    with pytest.raises(SSCDUnavailable, match=r"gives \(301056,\) for 2 images"):
        load_sscd(str(scalar), dim=0)


def test_training_features_are_cached_under_their_key(tmp_path, sscd_file, train_images):
    net = load_sscd(str(sscd_file), dim=DIM)
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return net(x)

    first = cached_features(train_images, f"digits-40-{net.sha256[:16]}", counted, tmp_path, batch_size=16)
    assert calls == [16, 16, 8] and (tmp_path / f"digits-40-{net.sha256[:16]}.npy").is_file()
    again = cached_features(train_images, f"digits-40-{net.sha256[:16]}", counted, tmp_path)
    assert len(calls) == 3 and torch.equal(again, first)
    gen = train_images[:3]
    direct = sim_score(gen, train_images, net, background=False)
    reused = sim_score(gen, train_images, net, background=False, train_features=first)
    assert reused.background is None and torch.equal(reused.matches.index, direct.matches.index)
