"""The model seam (ddpm/family.py): the pixel DDPM family's equations on tiny tensors, and the
trainer, AGC/TAA and the export reaching the network only through the family."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from diffusers import DDPMPipeline

from clients.trainer import ShardState, agc_taa_loss, train_shard
from ddpm.data import load_dataset
from ddpm.family import PIXEL_DDPM, DiffusionFamily, PixelDDPM, Sampling
from ddpm.schedule import ddim_sample, draw_class_labels, train_scheduler
from ddpm.unet import build_unet
from fl_app.run_folder import RunWriter
from fl_app.settings import Settings

CPU = torch.device("cpu")


def test_pixel_ddpm_is_a_family_and_its_loss_is_eq_1_per_sample():
    assert isinstance(PIXEL_DDPM, DiffusionFamily) and PIXEL_DDPM.prediction_type == "epsilon"
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    assert PIXEL_DDPM.encode(x0) is x0
    t, noise = torch.tensor([0, 500, 999]), torch.randn(3, 1, 8, 8)
    sched = train_scheduler()
    got = PIXEL_DDPM.per_sample_loss(model, sched, x0, t, noise)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # eq. (forward process)
    with torch.no_grad():
        want = (model(x_t, t).sample - noise).pow(2).mean(dim=(1, 2, 3))
    assert got.shape == (3,)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_pixel_ddpm_conditions_on_classes_and_refuses_wrong_labels():
    plain, cond = build_unet("tiny", 8, 1), build_unet("tiny", 8, 1, 10)
    assert PIXEL_DDPM.check_condition(plain, None, 4) is None
    labels = PIXEL_DDPM.check_condition(cond, [0, 9, 3, 3], 4)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 9, 3, 3]
    for model, given, message in [
        (plain, torch.zeros(4), "no class embedding"),
        (cond, None, "conditioned on 10 classes but got no labels"),
        (cond, torch.zeros(3), "expected 4 labels"),
        (cond, torch.tensor([0, 1, 2, 10]), r"labels must be in \[0, 9\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            PIXEL_DDPM.check_condition(model, given, 4)


def test_pixel_ddpm_samples_with_ddim_and_exports_a_ddpm_pipeline(tmp_path):
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1)
    got = PIXEL_DDPM.sample(model, 3, Sampling(steps=2, batch_size=3, seed=4, device=CPU))
    assert torch.equal(got, ddim_sample(model, 3, steps=2, batch_size=3, seed=4))
    assert got.shape == (3, 1, 8, 8) and 0 <= got.min() <= got.max() <= 1
    pipe = PIXEL_DDPM.pipeline(model)
    assert isinstance(pipe, DDPMPipeline) and pipe.scheduler.config.prediction_type == "epsilon"
    with pytest.raises(TypeError, match="UNet2DModel"):
        PIXEL_DDPM.pipeline(torch.nn.Linear(2, 2))


@dataclass(frozen=True)
class HalfScale(PixelDDPM):
    """A family whose network denoises half-scaled pixels: what a latent family does, in small."""

    name: str = "half-scale"
    encoded: list = field(default_factory=list, compare=False)

    def encode(self, images):
        self.encoded.append(images.detach().clone())
        return images * 0.5


def test_the_trainer_and_taa_reach_the_network_through_the_family():
    """Every input the loss sees is the family's encoding; TAA's copies are pixels encoded."""
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1)
    settings = Settings(train_size=60, aug_range=float("inf"), agc=False)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    t, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 1, 8, 8)
    bank = torch.full((1000,), 1e-3)  # every ratio far above lambda: every sample in TAA's range
    family = HalfScale()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    mirror = lambda images01, rho: images01.flip(-1)  # noqa: E731  an augmentation, whatever the strength
    out = agc_taa_loss(model, train_scheduler(), x0, t, noise, bank, lambda r: r < 0, mirror, settings, None, family)
    hook.remove()
    assert out.aug.all() and len(family.encoded) == 2  # the batch, then the augmented copies
    assert torch.equal(family.encoded[0], x0) and torch.equal(family.encoded[1], ((x0 + 1) / 2).flip(-1) * 2 - 1)
    sched = train_scheduler()
    assert torch.equal(seen[0], sched.add_noise(x0 * 0.5, noise, t))  # the decision pass on encoded inputs
    # the default family changes nothing: the same call without it is the pixel DDPM's loss
    plain = agc_taa_loss(model, sched, x0, t, noise, bank, lambda r: r < 0, None, settings)
    assert torch.equal(plain.losses, PIXEL_DDPM.per_sample_loss(model, sched, x0, t, noise).detach())


def test_train_shard_and_the_run_folder_take_the_family(tmp_path):
    data = load_dataset("digits", train_size=60)
    settings = Settings(train_size=60, local_epochs=1, batch_size=16, taa=False)
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1)
    family = HalfScale()
    train_shard(model, data.images[:32], settings, ShardState(), device=CPU, seed=0, family=family)
    assert len(family.encoded) == 32 // 16 and all(x.min() >= -1 and x.max() <= 1 for x in family.encoded)
    run = tmp_path / "run"
    run.mkdir()
    RunWriter(run, settings).save_model(model, family)
    assert torch.equal(DDPMPipeline.from_pretrained(run / "pipeline").unet.conv_in.weight, model.conv_in.weight)


def test_pixel_ddpm_draws_class_labels_to_sample_a_conditional_model_with():
    assert PIXEL_DDPM.draw_condition(build_unet("tiny", 8, 1), 5, seed=3) is None
    drawn = PIXEL_DDPM.draw_condition(build_unet("tiny", 8, 1, 10), 5, seed=3)
    assert torch.equal(drawn, draw_class_labels(5, 10, 3))
