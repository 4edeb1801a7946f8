"""Fine-tuning in the federation (in-process simulation): from a pipeline the test saves itself,
only the adapter's tensors travel, the checkpoint holds them, and the merged export samples as
the adapted model does."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from flwr.simulation import run_simulation
from safetensors.torch import load_file

from ddpm.adapters import load_trainable, trainable_state
from ddpm.schedule import ddim_sample, train_scheduler
from ddpm.unet import build_unet
from fl_app.checkpoint import load_checkpoint
from fl_app.client_app import app as client_app
from fl_app.model import initial_model
from fl_app.server_app import make_server_app
from fl_app.settings import Settings
from strategies.iet import IETStrategy


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
    """A tiny 'pretrained' base: a seeded UNet saved as a DDPMPipeline folder."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("base") / "pipeline"
    DDPMPipeline(unet=build_unet("tiny", 8, 1), scheduler=train_scheduler()).save_pretrained(path)
    return path


def _sizes(message) -> dict[str, tuple]:
    return {k: (tuple(a.shape), len(a.data)) for k, a in message.content["arrays"].items()}


def _serialised(tensors) -> dict[str, tuple]:
    """Shapes and the bytes a float32 tensor takes in an Array (numpy .npy: 128-byte header + data)."""
    return {k: (tuple(v.shape), 128 + v.numel() * 4) for k, v in tensors.items()}


class Traffic:
    """What the strategy sends and receives: key -> (shape, serialised bytes) of every weights record."""

    def __init__(self, monkeypatch):
        self.sent: list[dict[str, tuple]] = []
        self.received: list[dict[str, tuple]] = []
        configure, check = IETStrategy.configure_train, IETStrategy.check_replies

        def configure_train(strategy, *args, **kwargs):
            messages = configure(strategy, *args, **kwargs)
            self.sent += [_sizes(m) for m in messages]
            return messages

        def check_replies(strategy, server_round, replies):
            replies = list(replies)
            self.received += [_sizes(m) for m in replies]
            return check(strategy, server_round, replies)

        monkeypatch.setattr(IETStrategy, "configure_train", configure_train)
        monkeypatch.setattr(IETStrategy, "check_replies", check_replies)


def _simulate(overrides):
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    (run,) = sorted(Path(overrides["out-dir"]).iterdir())
    return run


@pytest.fixture(scope="module")
def lora_run(base_pipeline, tmp_path_factory):
    from conftest import TINY_RUN

    monkeypatch = pytest.MonkeyPatch()
    traffic = Traffic(monkeypatch)
    out = tmp_path_factory.mktemp("ft")
    cfg = {
        **TINY_RUN,
        "out-dir": str(out / "runs"),
        "init-from": str(base_pipeline),
        "adapter": "lora",
        "lora-rank": 2,
        "lr": 0.01,
    }
    try:
        run = _simulate(cfg)
    finally:
        monkeypatch.undo()
    return run, cfg, traffic


def test_only_lora_tensors_travel_both_ways(lora_run):
    run, cfg, traffic = lora_run
    settings = Settings.from_run_config({**cfg, "out-dir": "runs"})
    expected = _serialised(trainable_state(initial_model(settings, 1)))
    assert all(".lora_A." in k or ".lora_B." in k for k in expected)
    assert len(traffic.sent) == 2 * 4 and len(traffic.received) == 2 * 4  # 2 rounds x 4 shards
    for record in traffic.sent + traffic.received:
        assert record == expected
    full = sum(size for _, size in _serialised(build_unet("tiny", 8, 1).state_dict()).values())
    per_message = sum(size for _, size in traffic.sent[0].values())
    assert per_message * 20 < full, (per_message, full)
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["replies"].tolist() == [4, 4] and rounds["dropped"].tolist() == [0, 0]


def test_checkpoint_holds_the_adapter(lora_run):
    run, _, traffic = lora_run
    ckpt = load_checkpoint(run)
    assert ckpt.server_round == 2 and set(ckpt.weights) == set(traffic.sent[0])
    assert ckpt.base_fingerprint and ckpt.base_fingerprint.split("-")[0].isdigit()


def test_merged_export_samples_as_the_adapted_model(lora_run):
    run, cfg, _ = lora_run
    pipe = DDPMPipeline.from_pretrained(run / "pipeline")
    assert type(pipe.unet) is UNet2DModel
    assert not any("lora" in k for k in pipe.unet.state_dict())
    settings = Settings.from_run_config({**cfg, "out-dir": "runs"})
    adapted = initial_model(settings, 1)
    final = {k: torch.from_numpy(v) for k, v in load_checkpoint(run).weights.items()}
    load_trainable(adapted, final)
    alone = load_file(run / "adapter" / "adapter.safetensors")
    assert all(torch.equal(alone[k], v) for k, v in final.items())
    assert any(".lora_A." in k for k in alone)
    base = DDPMPipeline.from_pretrained(cfg["init-from"]).unet
    moved = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert moved and all("attentions" in k for k in moved)  # fine-tuned, and only where LoRA sits
    merged_images = ddim_sample(pipe.unet, 6, steps=5, seed=1)
    adapted_images = ddim_sample(adapted, 6, steps=5, seed=1)
    np.testing.assert_allclose(merged_images.numpy(), adapted_images.numpy(), atol=1e-4)


@pytest.mark.usefixtures("flower_task")
def test_a_node_with_another_base_refuses_and_one_with_the_same_trains(base_pipeline, tmp_path):
    """The ClientApp as a SuperNode calls it: its own init-from (--node-config) must hold the
    server's base; one that differs is refused naming both fingerprints, before any training."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from ddpm.base import model_fingerprint
    from ddpm.data import load_dataset

    settings = Settings(init_from=str(base_pipeline), adapter="difffit", train_size=60, local_epochs=1, batch_size=16)
    server_model = initial_model(settings, 1)
    cfg = ConfigRecord(
        {
            **settings.to_run_config(),
            "fingerprint": load_dataset(**settings.dataset_kwargs()).fingerprint,
            "base-fingerprint": model_fingerprint(server_model),
            "ids": list(range(30)),
            "shard": 0,
            "server-round": 1,
            "run-key": "run-ft",
        }
    )
    content = RecordDict({"arrays": ArrayRecord(trainable_state(server_model)), "config": cfg})
    message = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
    torch.manual_seed(7)
    other = tmp_path / "other"
    DDPMPipeline(unet=build_unet("tiny", 8, 1), scheduler=train_scheduler()).save_pretrained(other)

    def context(init_from):
        node = {"state-dir": str(tmp_path / "state"), "init-from": init_from}
        return Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})

    with pytest.raises(ValueError, match="base model mismatch .* fingerprint .* this node's has"):
        client_app(message, context(str(other)))
    reply = client_app(message, context(str(base_pipeline)))
    assert set(reply.content["arrays"]) == set(trainable_state(server_model))


def test_resumed_adapter_run_ends_as_an_uninterrupted_one(lora_run, tmp_path):
    """Checkpoint/resume covers adapters: 2 rounds + resume to 3 == 3 rounds straight."""
    import shutil

    run, cfg, _ = lora_run
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    (copy / ".lock").unlink(missing_ok=True)
    _simulate_resume = make_server_app({**cfg, "num-rounds": 3, "resume": str(copy)})
    run_simulation(
        server_app=_simulate_resume,
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    straight = _simulate({**cfg, "num-rounds": 3, "out-dir": str(tmp_path / "straight")})
    a, b = load_checkpoint(copy), load_checkpoint(straight)
    assert a.server_round == b.server_round == 3 and set(a.weights) == set(b.weights)
    # the same process, threads and shapes on both sides: bitwise, as tests/test_resume.py
    assert all(np.array_equal(a.weights[key], b.weights[key]) for key in a.weights)
    # the training columns; the 2-round run also evaluated its last round (round 2), the straight one did not
    columns = ["round", "train_loss", "skip_rate", "aug_rate", "moved", "replies"]
    rounds = [pd.read_csv(r / "rounds.csv")[columns] for r in (copy, straight)]
    pd.testing.assert_frame_equal(*rounds, check_exact=True)


@pytest.mark.parametrize(
    "adapter, frozen_a, travels",
    [
        ("difffit", False, lambda k: k.endswith((".bias", "difffit_scale")) or "norm" in k),
        ("lora", True, lambda k: ".lora_B." in k),
    ],
)
def test_what_travels_follows_the_mode(base_pipeline, tmp_path, monkeypatch, adapter, frozen_a, travels):
    """DiffFit sends biases, norms and scales; LoRA with A frozen sends only the B matrices."""
    from conftest import TINY_RUN

    traffic = Traffic(monkeypatch)
    cfg = {
        **TINY_RUN,
        "num-rounds": 1,
        "out-dir": str(tmp_path / "runs"),
        "init-from": str(base_pipeline),
        "adapter": adapter,
        "lora-freeze-a": frozen_a,
    }
    run = _simulate(cfg)
    settings = Settings.from_run_config({**cfg, "out-dir": "runs"})
    expected = _serialised(trainable_state(initial_model(settings, 1)))
    assert expected and all(travels(k) for k in expected)
    assert len(traffic.sent) == len(traffic.received) == 4
    assert all(record == expected for record in traffic.sent + traffic.received)
    assert pd.read_csv(run / "rounds.csv")["replies"].tolist() == [4]
    report = (run / "report.md").read_text()
    assert f"adapter `{adapter}`" in report
    assert type(DDPMPipeline.from_pretrained(run / "pipeline").unet) is UNet2DModel
