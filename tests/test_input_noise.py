"""The adding-noise baseline (Table I): the noise has the set variance, fixed noise is a function of
(seed, image id) alone, the images the evaluation compares with stay clean, bad settings refused."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from clients.config import TrainConfig
from clients.input_noise import fixed_input_noise
from clients.trainer import ShardState, train_shard
from ddpm.data import to_model_range
from ddpm.family import PixelDDPM
from ddpm.unet import build_unet
from fl_app.settings import Settings

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Recording(PixelDDPM):
    """The pixel family, keeping every batch the trainer hands it (after the added noise)."""

    seen: list = field(default_factory=list, compare=False)

    def encode(self, images):
        self.seen.append(images.detach().clone())
        return images


def _train(config: TrainConfig, images: torch.Tensor, seed: int = 0, **kw) -> list[torch.Tensor]:
    torch.manual_seed(0)
    family = Recording()
    train_shard(build_unet("tiny", 8, 1), images, config, ShardState(), device=CPU, seed=seed, family=family, **kw)
    return family.seen


def test_the_added_noise_has_the_set_variance_and_the_images_stay_clean():
    images = torch.full((64, 1, 8, 8), 128, dtype=torch.uint8)  # one grey: the model range's 128/127.5 - 1
    clean = images.clone()
    config = TrainConfig(local_epochs=2, batch_size=32, taa=False, input_noise_variance=0.1)
    seen = _train(config, images)
    noise = torch.cat(seen) - (128 / 127.5 - 1)
    assert len(seen) == 4 and noise.numel() == 4 * 32 * 64
    assert noise.var().item() == pytest.approx(0.1, rel=0.05) and abs(noise.mean().item()) < 0.01
    assert not torch.equal(seen[0], seen[2])  # afresh at every step: epoch 2 sees other noise
    assert torch.equal(images, clean)  # the shard's images (what MQ and FID read) are not touched
    off = _train(TrainConfig(local_epochs=1, batch_size=32, taa=False), images)
    assert all(torch.equal(b, to_model_range(images[:32])) for b in off)  # variance 0: no noise at all


def test_taa_copies_carry_the_noise_unclipped():
    """The noise goes on what trains, after TAA: a copy is augment(clean image) + its noise."""
    images = torch.full((32, 1, 8, 8), 128, dtype=torch.uint8)
    config = TrainConfig(local_epochs=1, batch_size=32, agc=False, aug_range=float("inf"), input_noise_variance=0.1)
    state = ShardState(bank=torch.full((1000,), 1e-3))  # every ratio far above lambda: every sample augmented
    family = Recording()
    torch.manual_seed(0)
    half_grey = lambda images01, rho: torch.full_like(images01, 0.5)  # noqa: E731  a copy: 0 in [-1, 1]
    model = build_unet("tiny", 8, 1)
    train_shard(model, images, config, state, device=CPU, seed=0, family=family, augment=half_grey)
    batch, copies = family.seen  # the batch (decision pass), then its copies
    noise = batch - to_model_range(images)
    torch.testing.assert_close(copies, noise, rtol=0, atol=1e-6)  # the same step's noise, image by image
    assert copies.var().item() == pytest.approx(0.1, rel=0.1) and copies.abs().max() > 0.9  # not clipped


def test_fixed_noise_is_one_draw_per_image_id():
    a = fixed_input_noise([3, 7, 11], (1, 8, 8), seed=5)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(fixed_input_noise([11, 3], (1, 8, 8), seed=5), a[[2, 0]])  # any shard, any order
    assert not torch.equal(fixed_input_noise([3], (1, 8, 8), seed=6), a[:1])
    assert abs(fixed_input_noise(range(200), (1, 8, 8), 0).var().item() - 1) < 0.05


def test_fixed_noise_is_the_same_in_every_epoch_and_round():
    images = torch.full((32, 1, 8, 8), 128, dtype=torch.uint8)
    ids = torch.arange(100, 132)
    noise = fixed_input_noise(ids.tolist(), (1, 8, 8), seed=0)
    config = TrainConfig(local_epochs=2, batch_size=32, taa=False, input_noise_variance=0.1, input_noise_fixed=True)
    rounds = [torch.cat(_train(config, images, seed=r, input_noise=noise)) for r in (0, 1)]
    grey = to_model_range(images[:1])[0]
    expected = {tuple((grey + 0.1**0.5 * row).flatten().tolist()) for row in noise}
    for seen in rounds:  # every batch of every round is the fixed noisy images, in some order
        assert {tuple(row.flatten().tolist()) for row in seen} == expected
    with pytest.raises(ValueError, match="input-noise-fixed: .*needs input_noise"):
        _train(config, images)
    with pytest.raises(ValueError, match="input-noise-fixed: .*takes no input_noise"):
        _train(TrainConfig(taa=False), images, input_noise=noise)


def test_fixed_noise_without_a_variance_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match="^input-noise-fixed: .*input-noise-variance is 0"):
        Settings(input_noise_fixed=True)
    assert Settings(input_noise_fixed=True, input_noise_variance=0.1).input_noise_fixed
    with pytest.raises(ValueError, match="^input-noise-variance: "):
        Settings(input_noise_variance=-0.1)
