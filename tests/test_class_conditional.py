"""class-conditional: diffusers' class embedding in the UNet, labels in every training forward,
labels drawn from the seed for sampling, and the settings that cannot work refused by name."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ACROSS_KERNELS
from diffusers import DDPMPipeline
from flwr.simulation import run_simulation

from clients.agc import RatioSkip
from clients.trainer import ShardState, agc_taa_loss, train_shard
from ddpm.data import load_dataset, num_classes
from ddpm.schedule import ddim_sample, draw_class_labels, train_scheduler
from ddpm.unet import build_unet
from evaluation.evaluator import MemorizationEvaluator
from fl_app.client_app import app as client_app
from fl_app.config import settings_from_run_config
from fl_app.model import initial_model
from fl_app.server_app import make_server_app
from fl_app.settings import Settings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two tiny 'pretrained' pipelines: one unconditional, one conditioned on 10 classes."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, classes in (("plain", None), ("cond10", 10), ("cond3", 3)):
        torch.manual_seed(7)
        unet = build_unet("tiny", 8, 1, classes)
        DDPMPipeline(unet=unet, scheduler=train_scheduler()).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


# ---- the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dataset", "classes"), [("digits", 10), ("cifar10", 10), ("cifar100", 100)])
def test_the_unet_has_a_class_embedding_exactly_when_conditional(dataset, classes):
    assert num_classes(dataset) == classes
    cond = initial_model(Settings(dataset=dataset, class_conditional=True), 1)
    assert isinstance(cond.class_embedding, torch.nn.Embedding)
    assert cond.class_embedding.num_embeddings == classes == cond.config.num_class_embeds
    assert cond.class_embedding.embedding_dim == cond.time_embedding.linear_2.out_features
    plain = initial_model(Settings(dataset=dataset), 1)
    assert plain.class_embedding is None and plain.config.num_class_embeds is None
    assert num_classes("imagefolder") is None


def test_the_label_changes_the_prediction():
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, 10).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500, 500])
    a = model(x, t, class_labels=torch.tensor([3, 3])).sample
    b = model(x, t, class_labels=torch.tensor([3, 4])).sample
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class_labels"):  # diffusers refuses a conditional forward without
        model(x, t)


# ---- training -------------------------------------------------------------------------------------
def _batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    return x0, t, noise


@pytest.mark.parametrize("taa", [False, True])
def test_a_conditional_step_loss_depends_on_the_labels(taa):
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, 10).eval()  # eval: no dropout, so the same labels give the same loss
    x0, t, noise = _batch()
    settings = Settings(class_conditional=True, aug_range=float("inf"))
    bank = torch.full((1000,), 1e-3) if taa else torch.zeros(1000)  # taa: every sample is in TAA's range
    identity = (lambda images, rho: images) if taa else None  # noqa: E731 - the copy path, no randomness
    labels = torch.arange(8) % 10
    other = (labels + 5) % 10

    def loss(y):
        out = agc_taa_loss(model, train_scheduler(), x0, t, noise, bank, RatioSkip(0.5), identity, settings, y)
        return out.loss.detach(), out.losses

    same, again, changed = loss(labels), loss(labels.clone()), loss(other)
    assert torch.equal(same[0], again[0]) and torch.equal(same[1], again[1])
    assert not torch.allclose(same[0], changed[0])
    assert not torch.allclose(same[1], changed[1])  # the no-grad losses (skip rule, bank) see the labels too
    # one label changed: only that sample's plain loss moves
    one = labels.clone()
    one[2] = (one[2] + 1) % 10
    moved = loss(one)[1] != same[1]
    assert moved.tolist() == [i == 2 for i in range(8)]


def test_train_shard_uses_labels_repeatably():
    data = load_dataset("digits", train_size=60, cache_dir="off")
    settings = Settings(train_size=60, local_epochs=1, batch_size=16, class_conditional=True)
    images, labels = data.images[:32], data.labels[:32]
    torch.manual_seed(0)
    start = build_unet("tiny", 8, 1, 10).state_dict()

    def run(y):
        model = build_unet("tiny", 8, 1, 10)
        model.load_state_dict(start)
        result = train_shard(model, images, settings, ShardState(), device=CPU, seed=3, labels=y)
        return result, model.class_embedding.weight.detach().clone()

    (ra, wa), (rb, wb), (rc, wc) = run(labels), run(labels.clone()), run((labels + 1) % 10)
    assert ra.mean_loss == rb.mean_loss and torch.equal(wa, wb)
    assert ra.mean_loss != rc.mean_loss and not torch.equal(wa, wc)
    trained = (wa != start["class_embedding.weight"]).any(1)
    assert trained.tolist() == [bool((labels == c).any()) for c in range(10)]  # only the labels seen move


def test_train_shard_refuses_missing_extra_or_bad_labels():
    settings = Settings(local_epochs=1, batch_size=4)
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    cases = [
        (build_unet("tiny", 8, 1, 10), None, "got no labels"),
        (build_unet("tiny", 8, 1), torch.zeros(4, dtype=torch.long), "no class embedding"),
        (build_unet("tiny", 8, 1, 10), torch.zeros(3, dtype=torch.long), "expected 4 labels"),
        (build_unet("tiny", 8, 1, 10), torch.tensor([0, 1, 2, 10]), r"in \[0, 9\], got 0\.\.10$"),
        (build_unet("tiny", 8, 1, 10), torch.tensor([-1, 1, 2, 3]), r"got -1\.\.3$"),
    ]
    for model, labels, match in cases:
        with pytest.raises(ValueError, match=f"^class-conditional: .*{match}"):
            train_shard(model, images, settings, ShardState(), device=CPU, seed=0, labels=labels)


# ---- sampling -------------------------------------------------------------------------------------
def test_labels_are_uniform_seeded_and_prefix_stable():
    a = draw_class_labels(1000, 10, seed=5)
    assert a.dtype == torch.int64 and a.shape == (1000,)
    assert torch.equal(a, draw_class_labels(1000, 10, seed=5))
    assert torch.equal(a[:37], draw_class_labels(37, 10, seed=5))  # label i depends on (seed, i) only
    assert not torch.equal(a, draw_class_labels(1000, 10, seed=6))
    counts = torch.bincount(a, minlength=10)
    assert counts.numel() == 10 and int(counts.min()) >= 70 and int(counts.max()) <= 130  # 100 each expected
    assert int(draw_class_labels(5000, 100, seed=0).max()) == 99 and int(draw_class_labels(5000, 100, 0).min()) == 0
    with pytest.raises(ValueError, match="^class-conditional:"):
        draw_class_labels(3, 0, seed=0)


def test_conditional_sampling_is_repeatable_and_uses_the_labels():
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, 10)
    first = ddim_sample(model, 6, steps=3, seed=2)
    assert torch.equal(first, ddim_sample(model, 6, steps=3, seed=2))  # same shapes, same kernels: bitwise
    drawn = draw_class_labels(6, 10, seed=2)
    assert torch.equal(first, ddim_sample(model, 6, steps=3, seed=2, class_labels=drawn))  # the drawn labels
    other = ddim_sample(model, 6, steps=3, seed=2, class_labels=(drawn + 1) % 10)
    assert all((first[i] - other[i]).abs().max() > 100 * ACROSS_KERNELS["atol"] for i in range(6))
    with pytest.raises(ValueError, match="^class_labels:"):
        ddim_sample(model, 6, steps=3, class_labels=drawn[:5])
    with pytest.raises(ValueError, match="^class-conditional:"):
        ddim_sample(build_unet("tiny", 8, 1), 6, steps=3, class_labels=drawn)


@pytest.mark.parametrize("classes", [None, 10])
def test_samples_agree_across_batch_sizes_to_float_rounding(classes):
    """Image i's noise (and label) depend on (seed, i) only, so another batch size gives the same
    images but for rounding: other batch shapes run other convolution kernels, summing in another
    order. README "Determinism" states the tolerance (``ACROSS_KERNELS``) and why."""
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, classes)
    whole = ddim_sample(model, 12, steps=3, batch_size=12, seed=2)
    for batch_size in (1, 5, 8):
        torch.testing.assert_close(
            ddim_sample(model, 12, steps=3, batch_size=batch_size, seed=2), whole, **ACROSS_KERNELS
        )
    other_seed = ddim_sample(model, 12, steps=3, batch_size=5, seed=3)  # far beyond the tolerance
    assert all((other_seed[i] - whole[i]).abs().max() > 100 * ACROSS_KERNELS["atol"] for i in range(12))


# ---- settings -------------------------------------------------------------------------------------
def test_an_image_folder_has_no_labels(tmp_path):
    with pytest.raises(ValueError, match="^class-conditional: dataset 'imagefolder' has no labels"):
        Settings(dataset="imagefolder", data_root=str(tmp_path), class_conditional=True)
    Settings(dataset="imagefolder", data_root=str(tmp_path))  # unconditional: fine


@pytest.mark.parametrize(
    ("base", "conditional", "match"),
    [
        ("plain", True, "is unconditional"),
        ("cond10", False, r"is class-conditional \(10 classes\)"),
        ("cond3", True, "has 3 class embeddings, the data set 10 classes"),
    ],
)
def test_a_base_that_does_not_fit_is_refused_before_training_and_on_nodes(bases, base, conditional, match):
    run = {"init-from": bases[base], "class-conditional": conditional, "out-dir": str(Path(bases[base]).parent)}
    with pytest.raises(ValueError, match=f"^class-conditional: .*{match}"):
        settings_from_run_config(Settings().to_run_config(), run)
    settings = Settings(init_from=bases[base], class_conditional=conditional)  # a node runs the pure checks only
    with pytest.raises(ValueError, match=f"^class-conditional: .*{match}"):
        initial_model(settings, 1)


def test_a_conditional_base_fine_tunes_conditionally(bases):
    run = {"init-from": bases["cond10"], "class-conditional": True, "out-dir": str(Path(bases["cond10"]).parent)}
    settings = settings_from_run_config(Settings().to_run_config(), run)
    model = initial_model(settings, 1)
    assert model.config.num_class_embeds == 10 and model.class_embedding.num_embeddings == 10


# ---- the whole app, in-process --------------------------------------------------------------------
class _RecordingEvaluator(MemorizationEvaluator):
    """The app's evaluator, keeping the labels of every evaluation it sampled."""

    labels: list[torch.Tensor] = []

    def generate(self, model):
        images, labels = super().generate(model)
        _RecordingEvaluator.labels.append(labels)
        return images, labels


def test_a_conditional_federated_run_trains_and_samples_with_labels(tmp_path, caplog):
    import logging

    from conftest import TINY_RUN

    caplog.set_level(logging.INFO, logger="flwr")

    cfg = {**TINY_RUN, "class-conditional": True, "out-dir": str(tmp_path / "runs"), "eval-every": 1}
    _RecordingEvaluator.labels = []
    run_simulation(
        server_app=make_server_app(cfg, evaluator_factory=_RecordingEvaluator),
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    (run,) = sorted((tmp_path / "runs").iterdir())
    assert "model tiny (0.70M params, conditional on 10 classes)" in caplog.text  # the run's first line
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2] and rounds["replies"].tolist() == [4, 4]
    assert rounds["mq_0.5"].notna().all()
    expected = draw_class_labels(TINY_RUN["eval-num-images"], 10, seed=0)
    assert len(_RecordingEvaluator.labels) == 2
    assert all(torch.equal(labels, expected) for labels in _RecordingEvaluator.labels)
    assert "Class-conditional: each image's label drawn uniformly" in (run / "eval_round002.md").read_text()
    assert "class-conditional (10 classes): `DDPMPipeline.__call__` passes no labels" in (run / "report.md").read_text()
    # the exported UNet is conditional, and its class embedding has learned from the shards' labels
    unet = DDPMPipeline.from_pretrained(run / "pipeline").unet
    assert unet.config.num_class_embeds == 10
    torch.manual_seed(0)  # the run's seed: the server's initial model
    start = initial_model(Settings(**{k.replace("-", "_"): v for k, v in cfg.items()}), 1)
    assert (unet.class_embedding.weight != start.class_embedding.weight).any(1).all()
    images = ddim_sample(unet, 4, steps=2, seed=0)  # how a user samples it: labels drawn from the seed
    assert images.shape == (4, 1, 8, 8)


def test_class_conditional_cannot_change_on_resume():
    from fl_app.resume import RESUMABLE_KEYS, resumed_settings

    saved = Settings().to_run_config()
    assert "class-conditional" not in RESUMABLE_KEYS
    with pytest.raises(ValueError, match="^class-conditional: cannot change when resuming"):
        resumed_settings(saved, {"class-conditional": True}, Settings().to_run_config())
    older = {k: v for k, v in saved.items() if k != "class-conditional"}  # a run from before the key
    assert resumed_settings(older, {"class-conditional": False}, saved)["class-conditional"] is False


def test_iet_agc_evaluate_samples_a_conditional_pipeline_with_labels(tmp_path, capsys):
    from iet_agc.cli import main

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    DDPMPipeline(unet=build_unet("tiny", 8, 1, 10), scheduler=train_scheduler()).save_pretrained(run / "pipeline")
    (run / "settings.toml").write_text(
        "train-size = 120\nnum-shards = 2\nsample-steps = 2\nmq-neighbours = 10\nfid = false\n"
        f'class-conditional = true\nfid-cache-dir = "{tmp_path}"\n'
    )
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--num-images", "12", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert "Class-conditional: each image's label drawn uniformly" in (out / "eval_final.md").read_text()
