"""init-from: loading a base pipeline, and the settings that must agree with it (before training)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from ddpm.base import base_config, is_hub_id, load_base_unet
from ddpm.schedule import train_scheduler
from ddpm.unet import build_unet
from fl_app.config import settings_from_message, settings_from_run_config
from fl_app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, 1)
    path = tmp_path_factory.mktemp("base") / "pipeline"
    DDPMPipeline(unet=unet, scheduler=train_scheduler()).save_pretrained(path)
    return path, unet


def test_a_pipeline_folder_loads_its_unet(pipeline_dir):
    path, unet = pipeline_dir
    loaded = load_base_unet(str(path))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert base_config(str(path))["sample_size"] == 8
    assert load_base_unet(str(path / "unet")).config.in_channels == 1  # a bare UNet folder too
    assert load_base_unet(str(path)) is not load_base_unet(str(path))  # fresh copies from one load


def test_hub_ids_and_paths_are_told_apart(pipeline_dir):
    assert is_hub_id("google/ddpm-cifar10-32")
    assert not is_hub_id(str(pipeline_dir[0]))
    assert not is_hub_id("runs/x/pipeline")


def test_a_missing_folder_names_init_from(tmp_path):
    with pytest.raises(ValueError, match="^init-from: .*no such directory"):
        settings_from_run_config({"init-from": str(tmp_path / "nope" / "pipeline"), "out-dir": str(tmp_path)})


def test_mismatched_image_size_is_refused_naming_the_key(pipeline_dir, tmp_path):
    cfg = {"init-from": str(pipeline_dir[0]), "out-dir": str(tmp_path)}
    assert settings_from_run_config(cfg).init_from == str(pipeline_dir[0])
    with pytest.raises(ValueError, match=r"^image-size: must be 8 to match the base model .* got 16"):
        settings_from_run_config({**cfg, "image-size": 16})


def test_mismatched_channels_are_refused_naming_the_key(pipeline_dir, tmp_path):
    cfg = {"init-from": str(pipeline_dir[0]), "out-dir": str(tmp_path), "dataset": "cifar10", "train-size": 100}
    with pytest.raises(ValueError, match="^dataset: 'cifar10' has 3-channel images, but the base .* takes 1"):
        settings_from_run_config(cfg)


def test_an_adapter_needs_a_base():
    with pytest.raises(ValueError, match="^adapter: 'lora' .* needs init-from"):
        Settings(adapter="lora")


def test_a_node_may_keep_the_base_elsewhere(pipeline_dir):
    sent = {**Settings(init_from="/server/base").to_run_config(), "shard": 0}
    assert settings_from_message(sent, {"init-from": str(pipeline_dir[0])}).init_from == str(pipeline_dir[0])


def test_offline_hub_id_gives_a_clear_error_naming_it(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, an empty cache): the run stops before training, naming the id."""
    code = (
        "from fl_app.config import settings_from_run_config\n"
        f"settings_from_run_config({{'init-from': 'google/ddpm-cifar10-32', 'dataset': 'cifar10', "
        f"'image-size': 32, 'model': 'cifar', 'train-size': 100, 'out-dir': {str(tmp_path)!r}}})\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: init-from: cannot download 'google/ddpm-cifar10-32' from the Hugging Face Hub")
    assert "local" in last


def test_a_hub_id_loads_from_the_hub_cache(pipeline_dir, tmp_path):
    """The Hub path end to end without network: a snapshot laid out as huggingface_hub caches a
    download (refs/main -> snapshots/<commit>) is found by its id, and the run's settings pass."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-ddpm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    DDPMPipeline.from_pretrained(pipeline_dir[0]).save_pretrained(repo / "snapshots" / commit)
    code = (
        "from fl_app.config import settings_from_run_config\n"
        "from ddpm.base import load_base_unet\n"
        "settings_from_run_config({'init-from': 'someone/tiny-ddpm', 'adapter': 'lora', "
        f"'out-dir': {str(tmp_path)!r}}})\n"
        "print(sum(p.numel() for p in load_base_unet('someone/tiny-ddpm').parameters()))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == sum(p.numel() for p in pipeline_dir[1].parameters())
