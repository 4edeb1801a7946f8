"""The text-conditional latent family (ddpm/text_latent.py) on a tiny Stable Diffusion pipeline
built from configs (ddpm/text_pipeline.py): its loss equations, frozen parts, conditions,
sampling through diffusers' own pipeline, export and loading, and the trainer using it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ACROSS_KERNELS
from diffusers import DDIMScheduler, StableDiffusionPipeline

from clients.config import TrainConfig
from clients.trainer import ShardState, train_shard
from ddpm.family import DiffusionFamily, Sampling
from ddpm.text_latent import TextLatentDiffusion, is_text_pipeline, load_text_family
from ddpm.text_pipeline import build_text_pipeline, byte_vocabulary

CPU = torch.device("cpu")
CAPTIONS = ("a red cat", "a blue dog", "two green birds", "an empty street")
PROMPTS = tuple(f"prompt {i}" for i in range(10))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny checkpoint per prediction type (32 px, VAE factor 8: 4x4x4 latents)."""
    root = tmp_path_factory.mktemp("sd")
    for kind in ("epsilon", "v_prediction"):
        build_text_pipeline(root / kind, prediction_type=kind)
    return {"epsilon": root / "epsilon", "v_prediction": root / "v_prediction"}


@pytest.fixture
def sd(folders):
    """A fresh (UNet, family) of the epsilon checkpoint, with prompts to sample from."""
    return load_text_family(str(folders["epsilon"]), prompts=PROMPTS)


def pixels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_tiny_pipeline_loads_offline_and_the_family_conforms(folders, sd):
    pipe = StableDiffusionPipeline.from_pretrained(folders["epsilon"])
    assert pipe.safety_checker is None and pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a cat").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "c", "a", "t</w>", "<|endoftext|>"]  # characters, no merges
    assert len(pipe.tokenizer) == len(byte_vocabulary()) == 514
    unet, family = sd
    assert isinstance(family, DiffusionFamily) and family.prediction_type == "epsilon"
    assert family.scaling_factor == pipe.vae.config.scaling_factor and family.downsample == 8
    assert not any(p.requires_grad for p in [*family.vae.parameters(), *family.text_encoder.parameters()])
    assert not family.vae.training and not family.text_encoder.training and unet.training
    v_unet, v_family = load_text_family(str(folders["v_prediction"]))
    assert (
        v_family.prediction_type == "v_prediction"
        and v_family.train_scheduler().config.prediction_type == "v_prediction"
    )


def test_encode_is_the_scaled_posterior_mean_and_noise_has_its_shape(sd, monkeypatch):
    _, family = sd
    x = pixels()
    z = family.encode(x)
    assert z.shape == (4, 4, 4, 4) and not z.requires_grad
    assert torch.equal(z, family.encode(x))  # deterministic: cacheable per node
    with torch.no_grad():
        want = family.vae.encode(x).latent_dist.mean * family.vae.config.scaling_factor
    torch.testing.assert_close(z, want)
    drawn = TextLatentDiffusion(family.vae, family.text_encoder, family.tokenizer, family.scheduler, latent="sample")
    torch.manual_seed(1)
    a = drawn.encode(x)
    torch.manual_seed(1)
    assert torch.equal(a, drawn.encode(x)) and not torch.equal(a, z)  # a draw from torch's global RNG
    monkeypatch.setattr(family.vae, "encode", lambda *a, **k: pytest.fail("noise_like ran the VAE"))
    assert family.noise_like(x).shape == z.shape


def hand_loss(unet, family, z0, t, noise, ids, kind):
    """Eq. 1 in latent space, written out: x_t = sqrt(abar) z0 + sqrt(1 - abar) eps; the target
    eps, or v = sqrt(abar) eps - sqrt(1 - abar) z0; the mean over the latent per sample."""
    abar = family.train_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    target = noise if kind == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * z0
    with torch.no_grad():
        states = family.text_encoder(ids)[0]
        pred = unet(x_t, t, encoder_hidden_states=states).sample
    return (pred - target).pow(2).mean(dim=(1, 2, 3)), target


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_per_sample_loss_is_the_latent_squared_error_against_eps_or_v(folders, kind):
    unet, family = load_text_family(str(folders[kind]))
    torch.manual_seed(0)
    z0, noise = family.encode(pixels(3)), torch.randn(3, 4, 4, 4)
    t, ids = torch.tensor([0, 400, 999]), family.tokenize(CAPTIONS[:3])
    sched = family.train_scheduler()
    got = family.per_sample_loss(unet, sched, z0, t, noise, ids)
    want, target = hand_loss(unet, family, z0, t, noise, ids, kind)
    assert got.shape == (3,)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    if kind == "v_prediction":
        torch.testing.assert_close(sched.get_velocity(z0, noise, t), target)


def test_only_the_unet_gets_gradients_and_ids_or_embeddings_give_one_loss(sd):
    unet, family = sd
    torch.manual_seed(0)
    z0, noise, t = family.encode(pixels()), torch.randn(4, 4, 4, 4), torch.randint(0, 1000, (4,))
    ids = family.tokenize(CAPTIONS)
    sched = family.train_scheduler()
    loss = family.per_sample_loss(unet, sched, z0, t, noise, ids)
    loss.mean().backward()
    assert all(p.grad is None for p in [*family.vae.parameters(), *family.text_encoder.parameters()])
    assert all(p.grad is not None for p in unet.parameters()) and unet.conv_in.weight.grad.abs().sum() > 0
    embeds = family.embed(ids)
    assert embeds.shape == (4, 77, 32) and not embeds.requires_grad
    with torch.no_grad():
        assert torch.equal(family.per_sample_loss(unet, sched, z0, t, noise, embeds), loss.detach())
    assert family.check_condition(unet, list(CAPTIONS), 4).equal(ids)  # captions are tokenized
    assert family.flip_condition(ids, torch.ones(4, dtype=torch.bool)) is ids  # captions do not flip


def test_bad_conditions_are_refused_saying_what_is_expected(sd):
    unet, family = sd
    ids = family.tokenize(CAPTIONS)
    assert family.check_condition(unet, ids.int(), 4).dtype == torch.int64
    assert family.check_condition(unet, family.embed(ids).double(), 4).dtype == torch.float32
    for given, message in [
        (None, r"text-conditional: expected the captions of 4 images as token ids \(int64, shape \(4, 77\)\)"),
        (ids[:3], r"expected token ids .* got torch.int64 of shape \(3, 77\)"),
        (ids[:, :10], r"shape \(4, 10\)"),
        (torch.zeros(4, 77, 16), r"text embeddings \(float, \(4, 77, 32\)\), got torch.float32 of shape \(4, 77, 16\)"),
        (ids.bool(), "got torch.bool"),
        (ids + 1000, r"token ids must be in \[0, 513\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            family.check_condition(unet, given, 4)
    with pytest.raises(ValueError, match="text-conditional: the loss needs"):
        family.per_sample_loss(unet, family.train_scheduler(), torch.zeros(4, 4, 4, 4), torch.zeros(4).long(), 0, None)


def test_prompts_are_drawn_with_replacement_prompt_i_from_seed_and_i_alone(sd):
    unet, family = sd
    few, many = family.draw_prompts(3, seed=42), family.draw_prompts(40, seed=42)
    assert few == many[:3] and set(many) <= set(PROMPTS) and len(set(many)) < 40  # with replacement
    assert family.draw_prompts(40, seed=43) != many
    assert torch.equal(family.draw_condition(unet, 3, 42), family.tokenize(few))
    with pytest.raises(ValueError, match="no prompts to sample with"):
        TextLatentDiffusion(family.vae, family.text_encoder, family.tokenizer, family.scheduler).draw_condition(
            unet, 2, 0
        )


def test_sample_is_diffusers_pipeline_image_i_independent_of_the_batch(sd):
    unet, family = sd
    how = Sampling(steps=2, batch_size=3, seed=5)
    three = family.sample(unet, 3, how)
    assert three.shape == (3, 3, 32, 32) and three.dtype == torch.float32 and 0 <= three.min() <= three.max() <= 1
    two = family.sample(unet, 2, Sampling(steps=2, batch_size=1, seed=5))
    torch.testing.assert_close(two, three[:2], **ACROSS_KERNELS)
    assert (family.sample(unet, 1, Sampling(steps=2, seed=6)) - three[:1]).abs().max() > 100 * ACROSS_KERNELS["atol"]
    ids = family.draw_condition(unet, 3, 5)  # what sample drew: the same images from ids or embeddings
    torch.testing.assert_close(family.sample(unet, 3, how, family.embed(ids)), three, **ACROSS_KERNELS)
    pipe = StableDiffusionPipeline.from_pretrained(family.source)  # by hand: prompts in, diffusers' DDIM
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in family_seeds(5, 3)]
    prompts = family.draw_prompts(3, 5)
    want = pipe(prompts, negative_prompt=[""] * 3, num_inference_steps=2, generator=gens, output_type="pt").images
    torch.testing.assert_close(three, want, **ACROSS_KERNELS)


def family_seeds(seed: int, n: int) -> list[int]:
    from ddpm.text_latent import image_seed

    return [image_seed(seed, i) for i in range(n)]


def test_the_pipeline_round_trips_with_the_trained_unet(sd, tmp_path):
    unet, family = sd
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)  # a "trained" UNet, unlike the checkpoint's
    family.pipeline(unet).save_pretrained(tmp_path / "out")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    saved, ours = loaded.unet.state_dict(), unet.state_dict()
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in ours)
    assert loaded.scheduler.config.prediction_type == "epsilon" and is_text_pipeline(str(tmp_path / "out"))
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        family.pipeline(torch.nn.Linear(2, 2))


def test_loading_refuses_other_predictions_and_missing_checkpoints_naming_them(folders, tmp_path):
    bad = tmp_path / "x0-model"
    shutil.copytree(folders["epsilon"], bad)
    config = bad / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match=f"init-from: the checkpoint '{bad}' predicts 'sample'"):
        load_text_family(str(bad))
    with pytest.raises(ValueError, match="no such directory"):
        load_text_family(str(tmp_path / "missing"))
    with pytest.raises(
        ValueError, match="init-from: cannot load a StableDiffusionPipeline from 'nobody/no-such-model'"
    ):
        load_text_family("nobody/no-such-model", local_files_only=True)  # offline: the Hub cache only
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddpm" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    assert is_text_pipeline(str(folders["epsilon"])) and not is_text_pipeline(str(tmp_path / "ddpm"))
    assert not is_text_pipeline(str(tmp_path / "missing"))


def captioned(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_train_shard_trains_the_unet_alone_with_agc_and_taa(sd):
    unet, family = sd
    frozen = [p.clone() for p in [*family.vae.parameters(), *family.text_encoder.parameters()]]
    before = unet.conv_in.weight.clone()
    config = TrainConfig(local_epochs=1, batch_size=2, warmup_epochs=0, precision="fp32", aug_range=float("inf"))
    state = ShardState(bank=torch.full((1000,), 1e-6))  # every ratio far above lambda: all kept, all augmented
    labels = family.tokenize(CAPTIONS)
    out = train_shard(unet, captioned(), config, state, device=CPU, seed=0, labels=labels, family=family)
    assert out.steps == 2 and out.skip_rate == 0 and out.aug_rate == 1 and out.mean_loss > 0
    assert not torch.equal(unet.conv_in.weight, before)
    now = [*family.vae.parameters(), *family.text_encoder.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, now, strict=True))
    with pytest.raises(ValueError, match="text-conditional"):
        train_shard(unet, captioned(), config, ShardState(), device=CPU, seed=0, family=family)


def test_agc_skips_text_samples_whose_latent_loss_is_below_the_bank(sd):
    """A bank far above every loss: all samples skipped (ratio < lambda), the UNet unchanged."""
    unet, family = sd
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    config = TrainConfig(local_epochs=2, batch_size=2, warmup_epochs=0, precision="fp32", taa=False)
    state = ShardState(bank=torch.full((1000,), 1e6))
    out = train_shard(
        unet, captioned(), config, state, device=CPU, seed=0, labels=family.tokenize(CAPTIONS), family=family
    )
    assert out.skip_rate == 1 and out.skip_counts.tolist() == [2, 2, 2, 2]
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert (state.bank < 1e6).any()  # every sample still updates the bank (eq. 3)
