"""Stable Diffusion in the federation (issue 20): a tiny StableDiffusionPipeline built from configs
and a captioned folder of 16 PNGs, fine-tuned for 2 rounds through the app (in-process
simulation); only the UNet's tensors travel, the export loads with ``from_pretrained`` and samples
as the trained model, the client conditions on the first captions, and what cannot work is
refused before training naming both keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ACROSS_KERNELS, noise_pngs
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from test_finetune import Traffic, _serialised, _simulate

from ddpm.adapters import load_trainable, merged_unet, trainable_state
from ddpm.captions import first_captions
from ddpm.data import load_dataset
from ddpm.family import Sampling
from ddpm.text_latent import image_seed
from ddpm.text_pipeline import build_text_pipeline
from fl_app.checkpoint import load_checkpoint
from fl_app.config import settings_from_message, settings_from_run_config
from fl_app.model import base_fingerprint, initial_model, model_family
from fl_app.settings import Settings

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "disc", "stripe", "cross"]


def _captions(i: int) -> list[str] | str:
    """Image i's captions: unique per image; every fourth has a second one (the first is trained on)."""
    first = f"a {COLOURS[i % 4]} {SHAPES[i // 4]} number {i}"
    return [first, f"another caption of image {i}"] if i % 4 == 0 else first


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory) -> str:
    """A tiny text-to-image pipeline (32 px, VAE factor 8, a two-level UNet: 4x4x4 latents)."""
    folder = tmp_path_factory.mktemp("sd") / "pipeline"
    build_text_pipeline(folder, resolution=32)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """16 captioned training images (metadata.jsonl, in shuffled order), 4 held-out ones."""
    base = tmp_path_factory.mktemp("images")
    train = noise_pngs(base / "train", 16, 0, 32)
    lines = [json.dumps({"file_name": f"{i:03d}.png", "text": _captions(i)}) for i in reversed(range(16))]
    (train / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {"train": str(train), "held": str(noise_pngs(base / "held", 4, 1, 32)), "root": str(base)}


def _config(sd_base: str, folders: dict, out: Path, **more) -> dict:
    """The run: 16 images in 4 shards on 2 nodes, 2 rounds of 2 local epochs at batch 2, AGC and
    TAA on (through the VAE), one evaluation of 4 images after the last round."""
    return {
        "dataset": "imagefolder",
        "data-root": folders["train"],
        "holdout-root": folders["held"],
        "init-from": sd_base,
        "image-size": 32,
        "train-size": 0,
        "num-shards": 4,
        "num-rounds": 2,
        "local-epochs": 2,
        "batch-size": 2,
        "warmup-epochs": 0,
        "lr": 1e-3,
        "hflip": True,
        "eval-every": 0,
        "eval-num-images": 4,
        "eval-batch-size": 4,
        "sample-steps": 2,
        "mq-neighbours": 4,
        "fid": False,
        "device": "cpu",
        "out-dir": str(out / "runs"),
        **more,
    }


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory) -> str:
    """A random 1024-d stand-in for sscd_disc_large, scripted and saved as SSCD's files are."""
    from test_sscd import StandIn, save_torchscript

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sscd") / "sscd_disc_large.torchscript.pt"
    save_torchscript(StandIn(dim=1024), path)
    return str(path)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    """A tiny CLIPModel with the byte-level tokenizer, saved as a CLIP folder is."""
    from test_clip_score import tiny_clip

    from ddpm.text_pipeline import byte_tokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tiny_clip().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def text_run(sd_base, folders, tmp_path_factory, sscd_file, clip_folder):
    """The 2-round federated fine-tune, what it sent and received recorded (``Traffic``); its
    evaluation with the stand-in SSCD and CLIP networks (tests/test_text_eval.py reads its columns)."""
    monkeypatch = pytest.MonkeyPatch()
    traffic = Traffic(monkeypatch)
    out = tmp_path_factory.mktemp("sdrun")
    metrics = {"sscd-weights": sscd_file, "clip-model": clip_folder, "fid-cache-dir": str(out / "cache")}
    cfg = _config(sd_base, folders, out, **metrics)
    try:
        run = _simulate(cfg)
    finally:
        monkeypatch.undo()
    return run, cfg, traffic


def _settings(cfg: dict) -> Settings:
    return Settings.from_run_config({**cfg, "out-dir": "runs"})


def test_a_two_round_text_federation_records_rounds_skips_and_the_prompts(text_run):
    run, _, _ = text_run
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2] and rounds["replies"].tolist() == [4, 4]
    assert rounds["dropped"].tolist() == [0, 0] and (rounds["train_loss"] > 0).all()
    assert rounds["skip_rate"].notna().all() and rounds["aug_rate"].notna().all()
    last = rounds.iloc[-1]
    assert {"mq_0.5", "copy_1", "copy_5"} <= set(rounds.columns) and pd.notna(last["mq_0.5"])
    skips = pd.read_csv(run / "skip_counts.csv")  # AGC's counts per training id over the run
    assert skips["sample_id"].tolist() == list(range(16)) and (skips["skips"] >= 0).all()
    shards = pd.read_csv(run / "shards.csv")
    assert len(shards) == 8 and shards["skip_rate"].notna().all()
    report = (run / "eval_round002.md").read_text()
    assert "Text-conditional: each image's prompt drawn with replacement from the first captions of the 16" in report
    assert "classifier-free guidance 7.5" in report
    assert "`StableDiffusionPipeline.from_pretrained`" in (run / "report.md").read_text()


def test_the_text_metrics_join_rounds_csv(text_run):
    """Sim Score, its background and share above 0.5 and CLIP score (stand-in networks from
    sscd-weights and clip-model) in rounds.csv after the evaluated round; fid_authors an empty column (fid off)."""
    from evaluation.columns import CLIP_SCORE, FID_AUTHORS, SIM_BACKGROUND, SIM_SCORE, SIM_SHARE

    run, _, _ = text_run
    rounds = pd.read_csv(run / "rounds.csv")
    last = rounds.iloc[-1]
    assert all(pd.notna(last[k]) for k in (SIM_SCORE, SIM_BACKGROUND, SIM_SHARE, CLIP_SCORE)), last.to_dict()
    assert 0 <= last[SIM_SHARE] <= 1 and -1 <= last[SIM_SCORE] <= 1 and -1 <= last[SIM_BACKGROUND] <= 1
    assert FID_AUTHORS in rounds.columns and pd.isna(last[FID_AUTHORS])  # fid = false: empty, not zero
    assert rounds[SIM_SCORE].notna().tolist() == [False, True]  # evaluated after the last round only
    report = (run / "eval_round002.md").read_text()
    assert "Sim Score (`sim_score`)" in report and "nearest training image by SSCD" in report
    assert (run / "pairs_round002.png").is_file()


def test_only_the_unets_tensors_travel_both_ways(text_run, sd_base):
    run, cfg, traffic = text_run
    model = initial_model(_settings(cfg), 3)
    assert isinstance(model, UNet2DConditionModel)
    expected = _serialised(trainable_state(model))
    unet = StableDiffusionPipeline.from_pretrained(sd_base).unet
    assert set(expected) == {n for n, _ in unet.named_parameters()}  # the whole UNet, nothing else
    assert not any(k.startswith(("vae", "text_encoder", "encoder.", "decoder.", "text_model")) for k in expected)
    assert len(traffic.sent) == len(traffic.received) == 2 * 4  # 2 rounds x 4 shards
    assert all(record == expected for record in traffic.sent + traffic.received)
    assert set(load_checkpoint(run).weights) == set(expected)


def test_the_saved_pipeline_loads_and_generates_as_the_trained_model(text_run, sd_base):
    run, cfg, _ = text_run
    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    base = StableDiffusionPipeline.from_pretrained(sd_base)
    final = {k: torch.from_numpy(v) for k, v in load_checkpoint(run).weights.items()}
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in final.items())
    assert any(not torch.equal(saved[k], v) for k, v in base.unet.state_dict().items())  # fine-tuned
    for part in ("vae", "text_encoder"):  # the frozen parts are the base's, unchanged
        mine, theirs = getattr(pipe, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    settings = _settings(cfg)
    data = load_dataset(**settings.dataset_kwargs())
    family = model_family(settings, data)
    trained = initial_model(settings, 3, final)
    ours = family.sample(trained, 2, Sampling(steps=2, seed=3))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(image_seed(3, i)) for i in range(2)]
    prompts = family.draw_prompts(2, 3)
    assert set(prompts) <= set(first_captions(data))
    theirs = pipe(prompts, negative_prompt=[""] * 2, num_inference_steps=2, generator=gens, output_type="pt").images
    assert theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, **ACROSS_KERNELS)


def test_a_resumed_text_run_ends_as_an_uninterrupted_one(text_run, tmp_path):
    """1 round, then resumed to 2 == the 2 rounds straight: the SD base reloads from init-from and
    proves its fingerprint, the shards' Adam states and banks carry over (bitwise, as test_finetune)."""
    from flwr.simulation import run_simulation

    from fl_app.client_app import app as client_app
    from fl_app.server_app import make_server_app

    run, cfg, _ = text_run
    short = _simulate({**cfg, "num-rounds": 1, "out-dir": str(tmp_path / "short")})
    run_simulation(
        server_app=make_server_app({**cfg, "resume": str(short)}),
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    a, b = load_checkpoint(short), load_checkpoint(run)
    assert a.server_round == b.server_round == 2 and a.base_fingerprint == b.base_fingerprint
    assert "+" in a.base_fingerprint  # the UNet's and the frozen parts'
    assert all(np.array_equal(a.weights[key], b.weights[key]) for key in b.weights)
    columns = ["round", "train_loss", "skip_rate", "aug_rate", "moved", "replies"]
    pd.testing.assert_frame_equal(*(pd.read_csv(r / "rounds.csv")[columns] for r in (short, run)), check_exact=True)
    exports = [UNet2DConditionModel.from_pretrained(r / "pipeline" / "unet").state_dict() for r in (short, run)]
    assert all(torch.equal(exports[0][k], v) for k, v in exports[1].items())  # the same exported pipeline


def test_a_lora_text_run_sends_only_lora_tensors_and_exports_them_merged(sd_base, folders, tmp_path, monkeypatch):
    """adapter = "lora" in the federation (1 round): LoRA's A and B on the UNet's attention
    projections travel both ways, nothing else; the export is a plain StableDiffusionPipeline whose
    UNet moved only where LoRA sits."""
    traffic = Traffic(monkeypatch)
    more = {"num-rounds": 1, "local-epochs": 1, "adapter": "lora", "lora-rank": 2, "lr": 1e-2}
    cfg = _config(sd_base, folders, tmp_path, **more)
    run = _simulate(cfg)
    expected = _serialised(trainable_state(initial_model(_settings(cfg), 3)))
    assert expected and all(".lora_A." in k or ".lora_B." in k for k in expected)
    assert len(traffic.sent) == len(traffic.received) == 4
    assert all(record == expected for record in traffic.sent + traffic.received)
    unet = StableDiffusionPipeline.from_pretrained(run / "pipeline").unet
    base = StableDiffusionPipeline.from_pretrained(sd_base).unet.state_dict()
    assert type(unet) is UNet2DConditionModel and not any("lora" in k for k in unet.state_dict())
    moved = [k for k, v in unet.state_dict().items() if not torch.equal(v, base[k])]
    assert moved and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") and "attn" in k for k in moved)
    assert (run / "adapter" / "adapter.safetensors").is_file()


# ---- the ClientApp as a SuperNode calls it -----------------------------------------------------
def _train_message(settings: Settings, ids, model=None):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    model = model if model is not None else initial_model(settings, 3)
    cfg = ConfigRecord(
        {
            **settings.to_run_config(),
            "fingerprint": load_dataset(**settings.dataset_kwargs()).fingerprint,
            "base-fingerprint": base_fingerprint(settings, model),
            "ids": list(ids),
            "shard": 0,
            "server-round": 1,
            "run-key": "run-sd",
        }
    )
    content = RecordDict({"arrays": ArrayRecord(trainable_state(model)), "config": cfg})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def _node(tmp_path: Path, **keys):
    from flwr.app import Context, RecordDict

    node = {"state-dir": str(tmp_path / "state"), **keys}
    return Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})


@pytest.mark.usefixtures("flower_task")
def test_the_client_conditions_on_first_captions_and_counts_skips(sd_base, folders, tmp_path, monkeypatch):
    import fl_app.client_app as client_module

    settings = _settings(_config(sd_base, folders, tmp_path, **{"local-epochs": 1}))
    ids = [4, 0, 9, 13]
    seen = []
    real = client_module.train_shard

    def recording(*args, **kwargs):
        seen.append(kwargs["labels"])
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_shard", recording)
    message = _train_message(settings, ids)
    reply = client_module.app(message, _node(tmp_path))
    family = model_family(settings, load_dataset(**settings.dataset_kwargs()))
    want = family.tokenize([_captions(i)[0] if i % 4 == 0 else _captions(i) for i in ids])
    assert len(seen) == 1 and torch.equal(seen[0], want)  # the shard's first captions, tokenized once
    assert set(reply.content["arrays"]) == set(trainable_state(initial_model(settings, 3)))
    skip_all = client_module.make_client_app(skip_rule=lambda ratio: torch.ones_like(ratio, dtype=torch.bool))
    again = skip_all(message, _node(tmp_path / "other"))
    assert again.content["skips"]["counts"].numpy().tolist() == [1, 1, 1, 1]  # one epoch, every sample skipped
    sent = message.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(v, sent[k]) for k, v in again.content["arrays"].to_torch_state_dict().items())


@pytest.mark.usefixtures("flower_task")
def test_a_node_whose_vae_differs_refuses(sd_base, folders, tmp_path):
    """The base fingerprint covers the frozen parts: the same UNet with another VAE is refused."""
    settings = _settings(_config(sd_base, folders, tmp_path))
    other = tmp_path / "other-vae"
    shutil.copytree(sd_base, other)
    build_text_pipeline(tmp_path / "seed1", resolution=32, seed=1)
    shutil.rmtree(other / "vae")
    shutil.copytree(tmp_path / "seed1" / "vae", other / "vae")
    from fl_app.client_app import app

    with pytest.raises(ValueError, match="base model mismatch .* this node's has"):
        app(_train_message(settings, [0, 1]), _node(tmp_path, **{"init-from": str(other)}))


# ---- adapters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["lora", "difffit"])
def test_an_adapter_trains_and_merges_on_the_sd_unet(sd_base, folders, tmp_path, adapter):
    """LoRA and DiffFit go through the adapter setting on a UNet2DConditionModel: only their tensors
    train (and travel), and the merged UNet computes what the adapted one does."""
    settings = _settings(_config(sd_base, folders, tmp_path, adapter=adapter, **{"lora-rank": 2}))
    model = initial_model(settings, 3)
    travels = trainable_state(model)
    full = sum(p.numel() for p in model.parameters())
    assert travels and sum(v.numel() for v in travels.values()) * 20 < full
    if adapter == "lora":
        assert all(".lora_A." in k or ".lora_B." in k for k in travels)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    plain = merged_unet(model)
    assert type(plain) is UNet2DConditionModel and not any("lora" in k or "difffit" in k for k in plain.state_dict())
    family = model_family(settings)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 700])
    states = family.embed(family.tokenize(["a red square", "a blue disc"]))
    with torch.no_grad():
        a = model.eval()(x, t, encoder_hidden_states=states).sample
        b = plain.eval()(x, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    load_trainable(initial_model(settings, 3), travels)  # what travels loads into a node's model


def test_the_evaluator_samples_prompts_from_the_captions_and_takes_scorers(sd_base, folders, tmp_path):
    """Prompts drawn from the training captions, MQ on the pixels at image-size, the scorer hook's
    columns joined, and the auto batch's probe (CUDA only in a run) sampling the whole pipeline."""
    from ddpm.precision import FP32
    from evaluation.evaluator import MemorizationEvaluator
    from fl_app.config import eval_config

    settings = _settings(_config(sd_base, folders, tmp_path))
    data = load_dataset(**settings.dataset_kwargs())
    family, model = model_family(settings, data), initial_model(settings, 3)
    got = []

    def scorer(images, prompts, data):  # where Sim Score / CLIP score plug in
        got.append((images.shape, list(prompts), len(data)))
        return {"sim_score": 0.25}

    ev = MemorizationEvaluator(eval_config(settings), data, tmp_path / "eval", torch.device("cpu"), family, [scorer])
    result = ev(1, model)
    assert result.images.shape == (4, 3, 32, 32) and result.labels is None
    assert result.prompts == family.draw_prompts(4, 0) and set(result.prompts) <= set(first_captions(data))
    assert got == [((4, 3, 32, 32), result.prompts, 16)] and result.metrics["sim_score"] == 0.25
    assert result.metrics["mq_0.5"] is not None
    ev._probe(model, FP32, 2)  # noqa: SLF001 - one DDIM step of 2 images through the pipeline


# ---- refusals, before training -----------------------------------------------------------------
def _refusal(sd_base, folders, tmp_path, **more) -> str:
    with pytest.raises(ValueError) as err:
        settings_from_run_config({}, _config(sd_base, folders, tmp_path, **more))
    return str(err.value)


@pytest.mark.parametrize(
    ("more", "first", "second"),
    [
        ({"ambient": True, "taa": False}, "ambient:", "init-from"),
        (
            {"class-conditional": True, "dataset": "digits", "holdout-root": "", "train-size": 400},
            "class-conditional:",
            "init-from",
        ),
        ({"class-conditional": True}, "class-conditional:", "init-from"),
        (
            {"dp-sgd": True, "agc": False, "taa": False, "msr": "none", "dp-noise-multiplier": 1.0},
            "dp-sgd:",
            "init-from",
        ),
        ({"dataset": "digits", "holdout-root": "", "train-size": 400, "num-shards": 4}, "dataset:", "init-from"),
        ({"image-size": 8}, "image-size:", "init-from"),
        ({"guidance-scale": 0.5}, "guidance-scale:", ">= 1"),
        ({"captions": "/no/such/captions.json"}, "captions:", "no such file"),
    ],
)
def test_what_cannot_work_is_refused_naming_both_keys(sd_base, folders, tmp_path, more, first, second):
    message = _refusal(sd_base, folders, tmp_path, **more)
    assert message.startswith(first) and second in message, message


def test_captions_are_required_checked_and_only_for_the_text_family(sd_base, folders, tmp_path):
    bare = noise_pngs(tmp_path / "bare", 4, 2, 32)  # no metadata.jsonl
    message = _refusal(sd_base, folders, tmp_path, **{"data-root": str(bare), "holdout-root": "", "num-shards": 2})
    assert message.startswith("captions:") and "init-from" in message and "data-root" in message
    table = tmp_path / "captions.json"
    table.write_text(json.dumps({f"/fs/laion/{i:03d}.png": [f"c{i}"] for i in range(5)}))  # one image too many
    message = _refusal(sd_base, folders, tmp_path, **{"data-root": str(bare), "captions": str(table), "num-shards": 2})
    assert message.startswith("captions:") and "name no image" in message
    table.write_text(json.dumps({f"/fs/laion/{i:03d}.png": [f"c{i}", "more"] for i in range(4)}))
    ok = settings_from_run_config(
        {},
        _config(
            sd_base,
            folders,
            tmp_path,
            **{"data-root": str(bare), "captions": str(table), "num-shards": 2, "holdout-root": ""},
        ),
    )
    assert ok.text_conditional and load_dataset(**ok.dataset_kwargs()).captions[1] == ("c1", "more")
    message = _refusal(sd_base, folders, tmp_path, **{"init-from": "", "captions": str(table), "image-size": 32})
    assert message.startswith("captions:") and "init-from" in message  # a pixel DDPM reads no captions
    broken = tmp_path / "broken"
    shutil.copytree(sd_base, broken)
    shutil.rmtree(broken / "vae")
    message = _refusal(sd_base, folders, tmp_path, **{"init-from": str(broken)})
    assert message.startswith("init-from:") and "lacks its vae" in message
    # a node keeps its captions JSON where it likes (node-config), as its data-root
    sent = {**ok.to_run_config(), "shard": 0}
    assert settings_from_message(sent, {"captions": str(table)}).captions == str(table)
