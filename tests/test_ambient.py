"""Ambient Diffusion (Table I): an image's masks are a function of (seed, id) alone and the same in
every epoch, round and shard; the loss is the SNR-weighted x0 error over A, with no gradient from
pixels outside A; sampling feeds fixed random masks and derives epsilon from x0; the exported
pipeline samples from its folder; unsound combinations refused naming both keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline
from torch import nn

from clients.config import TrainConfig
from clients.trainer import ShardState, train_shard
from ddpm.ambient import AmbientFamily, ambient_masks, masked_x0_loss, snr
from ddpm.ambient_pipeline import AmbientPipeline, sampling_masks
from ddpm.data import to_model_range
from ddpm.family import DiffusionFamily, Sampling
from ddpm.schedule import train_scheduler
from ddpm.unet import build_unet
from fl_app.config import settings_from_run_config
from fl_app.model import initial_model, model_family
from fl_app.settings import Settings

CPU = torch.device("cpu")


# ---- the masks -----------------------------------------------------------------------------------
def test_masks_are_a_function_of_seed_and_id_with_the_set_survival():
    m = ambient_masks([3, 7, 11], (8, 8), p=0.4, delta=0.1, seed=5)
    assert m.shape == (3, 2, 8, 8) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(ambient_masks([11, 3], (8, 8), 0.4, 0.1, 5), m[[2, 0]])  # any shard, any order
    assert not torch.equal(ambient_masks([3], (8, 8), 0.4, 0.1, 6), m[:1])  # another seed, other masks
    big = ambient_masks(range(400), (8, 8), 0.4, 0.1, 0)
    a, ab = big[:, 0], big[:, 1]
    assert bool((ab <= a).all())  # A*B inside A
    assert abs(a.mean().item() - 0.6) < 0.01 and abs(ab.mean().item() - 0.54) < 0.01
    assert torch.equal(ambient_masks([0], (8, 8), 0.0, 0.0, 0), torch.ones(1, 2, 8, 8))  # p = delta = 0: all seen


@dataclass(frozen=True)
class Recording(AmbientFamily):
    """The Ambient family, keeping every batch and masks the trainer hands its loss."""

    seen: list = field(default_factory=list, compare=False)

    def per_sample_loss(self, model, scheduler, x0, t, noise, condition=None):
        self.seen.append((x0.detach().clone(), condition.clone()))
        return super().per_sample_loss(model, scheduler, x0, t, noise, condition)


def test_an_images_masks_are_the_same_in_every_epoch_round_and_shard():
    """Two rounds of one shard (other seeds, so other batches and flips) and another shard holding
    some of the same ids: every time an image trains, it does so with its own masks, flipped with it."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    clean = to_model_range(images)
    masks = ambient_masks(range(12), (8, 8), 0.4, 0.1, seed=3)
    config = TrainConfig(local_epochs=2, batch_size=4, taa=False, hflip=True)
    family = Recording()
    for ids, seed in ((range(0, 8), 1), (range(0, 8), 2), (range(4, 12), 3)):  # round 1, round 2, shard 2
        rows = torch.tensor(list(ids))
        model = build_unet("tiny", 8, 1, in_channels=2)
        train_shard(model, images[rows], config, ShardState(), device=CPU, seed=seed, labels=masks[rows], family=family)
    checked = flipped = 0
    for x0, cond in family.seen:
        for x, c in zip(x0, cond, strict=True):
            plain = (clean == x).flatten(1).all(1).nonzero().flatten()
            mirrored = (clean.flip(-1) == x).flatten(1).all(1).nonzero().flatten()
            if plain.numel():
                assert torch.equal(c, masks[plain[0]])
            else:
                assert torch.equal(c, masks[mirrored[0]].flip(-1))  # the mask moved with its image
                flipped += 1
            checked += 1
    assert checked == 3 * 2 * 8 and 0 < flipped < checked


# ---- the loss ------------------------------------------------------------------------------------
class Fixed(nn.Module):
    """A stand-in network: always the same x0 prediction; keeps what it was fed."""

    def __init__(self, pred: torch.Tensor, size: int = 2) -> None:
        super().__init__()
        self.pred, self.inputs = pred, []
        self.config = SimpleNamespace(in_channels=2 * pred.shape[1], out_channels=pred.shape[1], sample_size=size)

    def forward(self, x, t):
        self.inputs.append(x.clone())
        return SimpleNamespace(sample=self.pred.expand(x.shape[0], -1, -1, -1))


def test_the_loss_on_a_2x2_image_is_the_snr_weighted_x0_error_over_a():
    sched = train_scheduler()
    x0 = torch.tensor([[[[0.5, -0.5], [1.0, 0.0]]]])
    pred = torch.tensor([[[[0.25, 0.5], [-1.0, 0.5]]]])
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]])  # A, A*B
    t, noise = torch.tensor([10]), torch.tensor([[[[0.3, -0.2], [0.1, 0.7]]]])
    model = Fixed(pred)
    family = AmbientFamily(p=0.4, delta=0.1)
    loss = family.per_sample_loss(model, sched, x0, t, noise, masks)
    abar = sched.alphas_cumprod[10]
    by_hand = abar / (1 - abar) * (0.25**2 + 1.0**2 + 0 + 0.5**2) / 4  # (1, 0) is outside A
    assert loss.shape == (1,) and torch.allclose(loss, by_hand.reshape(1))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    fed = model.inputs[0]
    assert torch.allclose(fed[:, :1], masks[:, 1:] * x_t) and torch.equal(fed[:, 1:], masks[:, 1:])  # [AB x_t, AB]
    clipped = AmbientFamily(max_snr=2.0).per_sample_loss(model, sched, x0, t, noise, masks)
    assert torch.allclose(clipped, torch.tensor([2.0 * (0.25**2 + 1.0 + 0.25) / 4]))
    assert torch.allclose(snr(sched.alphas_cumprod, t), abar / (1 - abar))
    assert torch.equal(masked_x0_loss(pred, x0, torch.zeros_like(x0), torch.ones(1)), torch.zeros(1))


def test_the_loss_has_no_gradient_from_pixels_outside_a():
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 3, in_channels=6)
    x0 = (torch.rand(4, 3, 8, 8) * 2 - 1).requires_grad_()
    masks = ambient_masks(range(4), (8, 8), 0.5, 0.3, seed=0)
    t = torch.tensor([0, 100, 500, 999])
    loss = AmbientFamily(0.5, 0.3).per_sample_loss(model, train_scheduler(), x0, t, torch.randn(4, 3, 8, 8), masks)
    loss.sum().backward()
    a, ab = masks[:, :1].expand(-1, 3, -1, -1), masks[:, 1:].expand(-1, 3, -1, -1)
    grad = x0.grad
    assert bool((grad[a == 0] == 0).all())  # no pixel outside A reaches the loss
    assert bool((grad[(a == 1) & (ab == 0)] != 0).all())  # A's hidden pixels are targets
    assert bool((grad[ab == 1] != 0).any())


def test_the_family_refuses_what_it_cannot_train():
    family = AmbientFamily()
    with pytest.raises(ValueError, match="^ambient: the model needs 2C input channels"):
        family.check_condition(build_unet("tiny", 8, 1), torch.ones(2, 2, 8, 8), 2)
    model = build_unet("tiny", 8, 1, in_channels=2)
    with pytest.raises(ValueError, match=r"^ambient: expected the masks \[A, A\*B\] of 2 images"):
        family.check_condition(model, None, 2)
    with pytest.raises(ValueError, match="^ambient: masks must be 0/1"):
        family.check_condition(model, torch.full((2, 2, 8, 8), 0.5), 2)
    assert isinstance(family, DiffusionFamily) and family.prediction_type == "sample"


# ---- sampling and the export ---------------------------------------------------------------------
def test_sampling_feeds_one_fixed_mask_and_derives_epsilon_from_x0():
    """A network that always predicts the image z ends every DDIM trajectory at z (eta 0, the last
    step to abar = 1), whatever the noise: the epsilon of each step is the one of that x0."""
    z = torch.tensor([[[[0.5, -0.25], [0.0, 1.0]]]])
    model = Fixed(z)
    family = AmbientFamily(p=0.5, delta=0.2)
    images = family.sample(model, 3, Sampling(steps=5, batch_size=3, seed=7))
    assert torch.allclose(images, ((z + 1) / 2).expand(3, -1, -1, -1), atol=1e-5)
    masks = sampling_masks(3, 2, family.survival, seed=7)
    assert len(model.inputs) == 5
    assert all(torch.equal(fed[:, 1:], masks) for fed in model.inputs)  # the same mask at every step
    assert all(torch.equal(fed[:, :1] * (1 - masks), torch.zeros(3, 1, 2, 2)) for fed in model.inputs)
    many = sampling_masks(2000, 8, 0.54, seed=0)
    assert abs(many.mean().item() - 0.54) < 0.01 and torch.equal(sampling_masks(5, 8, 0.54, 0), many[:5])


def test_the_exported_pipeline_samples_from_its_folder(tmp_path):
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, in_channels=2)
    family = AmbientFamily(p=0.4, delta=0.1)
    family.pipeline(model).save_pretrained(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "pipeline.py").is_file()
    folder = str(tmp_path / "pipeline")
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    assert type(pipe).__name__ == "AmbientPipeline" and pipe.config.survival == pytest.approx(0.54)
    got = pipe(batch_size=3, num_inference_steps=3, seed=1, output_type="pt").images
    want = family.sample(model, 3, Sampling(steps=3, batch_size=3, seed=1))
    assert torch.allclose(got, want, atol=1e-6)
    own = AmbientPipeline.from_pretrained(folder)
    assert torch.allclose(own(batch_size=3, num_inference_steps=3, seed=1, output_type="pt").images, want, atol=1e-6)
    pictures = pipe(batch_size=2, num_inference_steps=2).images
    assert len(pictures) == 2 and pictures[0].size == (8, 8)


# ---- the settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("others", "key"),
    [({}, "taa"), ({"taa": False, "class-conditional": True}, "class-conditional")],
)
def test_unsound_combinations_are_refused_naming_both_keys(others, key):
    with pytest.raises(ValueError, match=f"^ambient: cannot be combined with {key}: "):
        settings_from_run_config(Settings().to_run_config(), {"ambient": True, **others})


def test_init_from_is_refused_with_ambient(tmp_path):
    with pytest.raises(ValueError, match="^ambient: cannot be combined with init-from: .*2C"):
        Settings(ambient=True, taa=False, init_from=str(tmp_path))


@pytest.mark.parametrize(("key", "value"), [("ambient-p", 1.0), ("ambient-delta", -0.1), ("ambient-max-snr", 0.0)])
def test_ambient_ranges(key, value):
    with pytest.raises(ValueError, match=f"^{key}: must be "):
        Settings.from_run_config({key: value})


def test_the_app_builds_an_ambient_model_and_family():
    settings = Settings(ambient=True, taa=False, ambient_p=0.2, ambient_delta=0.05, ambient_max_snr=100.0)
    model = initial_model(settings, 1)
    assert (model.config.in_channels, model.config.out_channels) == (2, 1)
    assert model_family(settings) == AmbientFamily(0.2, 0.05, 100.0)
    plain = Settings()
    assert initial_model(plain, 1).config.in_channels == 1 and model_family(plain).name == "pixel-ddpm"


# ---- the app -------------------------------------------------------------------------------------
@pytest.mark.usefixtures("flower_task")
def test_the_client_app_trains_an_ambient_shard_and_the_run_exports_its_pipeline(tmp_path):
    """A node trains the 2C network on its shard's masks (made from the ids it was sent) and replies;
    the run's export of those weights (``RunWriter.save_model`` with the run's family) samples."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from ddpm.data import load_dataset
    from fl_app.client_app import app
    from fl_app.run_folder import RunWriter

    settings = Settings(
        train_size=60, local_epochs=1, batch_size=16, num_shards=2, warmup_epochs=0, ambient=True, taa=False
    )
    data = load_dataset(**settings.dataset_kwargs())
    torch.manual_seed(0)
    model = initial_model(settings, 1)
    ids = list(range(0, 60, 2))
    config = {"fingerprint": data.fingerprint, "ids": ids, "shard": 1, "server-round": 1, "run-key": "run-a"}
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({**settings.to_run_config(), **config})}
    )
    ctx = Context(run_id=1, node_id=0, node_config={"state-dir": str(tmp_path)}, state=RecordDict(), run_config={})
    reply = app(Message(content, dst_node_id=0, message_type=MessageType.TRAIN), ctx).content
    assert reply["metrics"]["num-examples"] == 30 and reply["skips"]["counts"].numpy().shape == (30,)
    trained = reply["arrays"].to_torch_state_dict()
    assert trained["conv_in.weight"].shape[1] == 2 and not torch.equal(trained["conv_in.weight"], model.conv_in.weight)
    model.load_state_dict(trained)
    (tmp_path / "run").mkdir()
    folder = RunWriter(tmp_path / "run", settings).save_model(model, model_family(settings))
    pipe = DiffusionPipeline.from_pretrained(str(folder), custom_pipeline=str(folder), trust_remote_code=True)
    got = pipe(batch_size=4, num_inference_steps=4, seed=0, output_type="pt").images
    want = model_family(settings).sample(model, 4, Sampling(steps=4, batch_size=4, seed=0))
    assert got.shape == (4, 1, 8, 8) and torch.allclose(got, want, atol=1e-6) and not torch.equal(got[0], got[1])


def test_iet_agc_evaluate_samples_an_ambient_export(tmp_path, capsys):
    """``iet-agc evaluate`` of an Ambient run folder (the run's p, delta) and of its bare pipeline
    folder (the saved survival): the same images, measured against the clean training images."""
    import json

    from iet_agc.cli import main

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    AmbientFamily(0.4, 0.1).pipeline(build_unet("tiny", 8, 1, in_channels=2)).save_pretrained(run / "pipeline")
    (run / "settings.toml").write_text(
        "train-size = 120\nnum-shards = 2\nsample-steps = 2\nmq-neighbours = 10\nfid = false\n"
        "ambient = true\ntaa = false\nambient-p = 0.4\nambient-delta = 0.1\n"
    )
    results = []
    for source in (run, run / "pipeline"):
        out = tmp_path / f"eval-{len(results)}"
        assert main(["evaluate", str(source), "--num-images", "6", "--device", "cpu", "--out", str(out)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["n_generated"] == 6 and "mq_0.5" in results[0]
    assert results[0]["digit_fd"] == pytest.approx(results[1]["digit_fd"], rel=1e-4)
