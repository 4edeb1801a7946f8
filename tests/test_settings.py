import math
import tomllib
from pathlib import Path

import pytest

from ddpm.settings import Settings
from fl_app.config import settings_from_message, settings_from_run_config

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_config():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_settings_defaults_and_default_preset():
    config = _pyproject_config()
    assert sorted(config) == sorted(Settings.keys())
    assert Settings.from_run_config(config) == Settings()
    with open(ROOT / "configs" / "default.toml", "rb") as fh:
        assert tomllib.load(fh) == config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"num-shards": 0}, "num-shards"),
        ({"lr": -0.001}, "lr"),
        ({"dataset": "cifar10", "data-root": "/no/such/dir"}, "data-root"),
        ({"dataset": "imagefolder"}, "data-root"),
        ({"skip-threshold": 0.0}, "skip-threshold"),
        ({"aug-range": 1.0}, "aug-range"),
        ({"msr-proportion": 1.0}, "msr-proportion"),
        ({"bank-eta": 1.0}, "bank-eta"),
        ({"aug-sharpness": -1.0}, "aug-sharpness"),
        ({"local-epochs": 0}, "local-epochs"),
        ({"msr": "best"}, "msr"),
        ({"model": "huge"}, "model"),
        ({"num-shards": "four"}, "num-shards"),
        ({"mq-thresholds": "0.4,x"}, "mq-thresholds"),
        ({"num-shards": 401}, "num-shards"),
        ({"shards": 3}, "shards"),
    ],
)
def test_invalid_settings_name_the_key(override, key):
    with pytest.raises(ValueError) as err:
        settings_from_run_config(_pyproject_config(), override)
    assert str(err.value).startswith(f"{key}:")


def test_infinite_range_and_types():
    s = Settings.from_run_config({"aug-range": "inf", "lr": 1, "hflip": "true"})
    assert math.isinf(s.aug_range) and s.lr == 1.0 and s.hflip is True
    assert Settings.from_run_config(s.to_run_config()) == s


@pytest.mark.parametrize("preset", ["default", "cifar10", "cifar100"])
def test_presets_validate(preset):
    with open(ROOT / "configs" / f"{preset}.toml", "rb") as fh:
        settings_from_run_config(_pyproject_config(), tomllib.load(fh))


def test_paper_presets_carry_the_paper_settings():
    presets = {}
    for name in ("cifar10", "cifar100", "afhq-dog"):
        with open(ROOT / "configs" / f"{name}.toml", "rb") as fh:
            presets[name] = tomllib.load(fh)
    expect = {  # REFERENCE.md, paper settings table
        "cifar10": (10, 0.5, 1.7, 3),
        "cifar100": (10, 0.5, 1.7, 5),
        "afhq-dog": (5, 0.7, 1.2, 5),
    }
    for name, (k, lam, r, m) in expect.items():
        p = presets[name]
        assert (p["num-shards"], p["skip-threshold"], p["aug-range"], p["randaugment-magnitude"]) == (k, lam, r, m)
        assert (p["bank-eta"], p["msr-proportion"], p["local-epochs"], p["aug-sharpness"]) == (0.8, 0.25, 50, 5.0)


def test_afhq_preset_without_data_stops_naming_data_root():
    with open(ROOT / "configs" / "afhq-dog.toml", "rb") as fh:
        preset = tomllib.load(fh)
    with pytest.raises(ValueError, match="^data-root:"):
        settings_from_run_config(_pyproject_config(), preset)


def test_node_config_may_relocate_data_but_not_change_the_method(tmp_path):
    sent = {**Settings().to_run_config(), "shard": 2, "ids": [1, 2]}
    s = settings_from_message(sent, {"device": "cpu", "skip-threshold": 0.9, "partition-id": 0})
    assert s.device == "cpu" and s.skip_threshold == Settings().skip_threshold


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in Settings.keys() if f"| `{k}` |" not in readme]
    assert not missing, f"README lacks settings: {missing}"


def test_server_only_paths_are_not_required_on_a_node(tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    sent = {**Settings(fid_weights=str(weights), holdout_root=str(tmp_path)).to_run_config(), "shard": 0}
    weights.unlink()  # the node's file system does not have the server's files
    s = settings_from_message(sent, {"data-root": str(tmp_path)})
    assert s.fid_weights == "" and s.holdout_root == "" and s.data_root == str(tmp_path)
