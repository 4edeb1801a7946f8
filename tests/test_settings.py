import math
import tomllib
from pathlib import Path

import pytest

from fl_app.config import settings_from_message, settings_from_run_config
from fl_app.settings import Settings

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
    # the authors' config files: only config/CIFAR100.txt trains with labels (use_labels=True, num_labels=100)
    assert {name: p["class-conditional"] for name, p in presets.items()} == {
        "cifar10": False,
        "cifar100": True,
        "afhq-dog": False,
    }


def test_afhq_preset_without_data_stops_naming_data_root():
    with open(ROOT / "configs" / "afhq-dog.toml", "rb") as fh:
        preset = tomllib.load(fh)
    with pytest.raises(ValueError, match="^data-root:"):
        settings_from_run_config(_pyproject_config(), preset)


def test_node_config_may_relocate_data_but_not_change_the_method(tmp_path):
    sent = {**Settings().to_run_config(), "shard": 2, "ids": [1, 2]}
    s = settings_from_message(sent, {"device": "cpu", "partition-id": 0})
    assert s.device == "cpu" and s.skip_threshold == Settings().skip_threshold
    with pytest.raises(ValueError, match="^skip-threshold: not a node-config key"):  # refused, not ignored
        settings_from_message(sent, {"device": "cpu", "skip-threshold": 0.9})


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


# ---- every bad setting refused before submission, naming the key and the range ----------------


def _refused(override, key, match=None):
    with pytest.raises(ValueError) as err:
        settings_from_run_config(_pyproject_config(), override)
    assert str(err.value).startswith(f"{key}:"), str(err.value)
    if match:
        assert match in str(err.value), str(err.value)
    return str(err.value)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("override", "key", "match"),
    [
        # floats finite where infinity means nothing; aug-range may be inf but not -inf
        ({"lr": INF}, "lr", "finite"),
        ({"lr": NAN}, "lr", "finite"),
        ({"lr": "nan"}, "lr", None),
        ({"lr": 2.0}, "lr", "(0, 1]"),
        ({"skip-threshold": INF}, "skip-threshold", "finite"),
        ({"skip-threshold": 11.0}, "skip-threshold", "(0, 10]"),
        ({"aug-sharpness": INF}, "aug-sharpness", "finite"),
        ({"bank-eta": NAN}, "bank-eta", None),
        ({"bank-eta": -INF}, "bank-eta", None),
        ({"grad-clip": INF}, "grad-clip", "finite"),
        ({"grad-clip": 0.0}, "grad-clip", "> 0"),
        ({"aug-range": -INF}, "aug-range", "> 1, or inf"),
        ({"aug-range": "-inf"}, "aug-range", None),
        ({"aug-range": NAN}, "aug-range", None),
        ({"round-timeout": INF}, "round-timeout", "(0, 604800]"),
        ({"round-timeout": 0}, "round-timeout", None),
        ({"round-timeout": NAN}, "round-timeout", None),
        ({"msr-proportion": NAN}, "msr-proportion", "[0, 1)"),
        ({"msr-proportion": -0.1}, "msr-proportion", None),
        ({"lr": 10**400}, "lr", None),  # too large for a float
        # seed: torch and numpy take seeds below 2**31
        ({"seed": -1}, "seed", "[0, 2147483647]"),
        ({"seed": 2**31}, "seed", None),
        # device by its full syntax
        ({"device": "gpu"}, "device", "cuda:N"),
        ({"device": "cuda:"}, "device", None),
        ({"device": "cuda:x"}, "device", None),
        ({"device": "cuda:-1"}, "device", None),
        ({"device": "mps:0"}, "device", None),
        ({"device": "CPU"}, "device", None),
        ({"device": " cpu"}, "device", None),
        ({"device": "cuda:0:1"}, "device", None),
        ({"device": ""}, "device", None),
        # torchvision's RandAugment: magnitudes 0..30, 14 operations; DDPM: 1000 timesteps
        ({"randaugment-magnitude": 31}, "randaugment-magnitude", "[0, 30]"),
        ({"randaugment-magnitude": -1}, "randaugment-magnitude", None),
        ({"randaugment-ops": 15}, "randaugment-ops", "[1, 14]"),
        ({"randaugment-ops": 0}, "randaugment-ops", None),
        ({"sample-steps": 1001}, "sample-steps", "[1, 1000]"),
        # upper bounds where a value would only hang the run
        ({"num-rounds": 10**6}, "num-rounds", "[1, 10000]"),
        ({"local-epochs": 10**6}, "local-epochs", "[1, 10000]"),
        ({"batch-size": 10**9}, "batch-size", "[1, 65536]"),
        ({"eval-num-images": 10**9}, "eval-num-images", "[1, 1000000]"),
        ({"eval-batch-size": -1}, "eval-batch-size", "auto"),
        ({"eval-batch-size": "many"}, "eval-batch-size", "auto"),
        ({"eval-batch-size": 10**6}, "eval-batch-size", "[1, 65536]"),
        ({"precision": "fp8"}, "precision", "bf16"),
        ({"channels-last": "maybe"}, "channels-last", None),
        ({"compile": "yes"}, "compile", None),
        ({"min-nodes": 10**6}, "min-nodes", "[1, 1000]"),
        ({"warmup-epochs": -1}, "warmup-epochs", "[0, 10000]"),
        ({"eval-every": -1}, "eval-every", "[0, 10000]"),
        ({"image-size": 12}, "image-size", "power of two"),
        ({"image-size": 2}, "image-size", "[4, 1024]"),
        ({"image-size": 2048}, "image-size", None),
        ({"model": "cifar", "image-size": 4}, "image-size", "[8, 1024] for model 'cifar'"),
        ({"model": "afhq64", "image-size": 8}, "image-size", "[16, 1024]"),
        ({"mq-thresholds": "0.5,0.5"}, "mq-thresholds", "repeat"),
        ({"mq-thresholds": "0.5,inf"}, "mq-thresholds", "(0, 1]"),
        ({"mq-thresholds": "0,0.5"}, "mq-thresholds", None),
        ({"mq-thresholds": "nan"}, "mq-thresholds", None),
        ({"mq-thresholds": ""}, "mq-thresholds", None),
        ({"mq-thresholds": "0.4,"}, "mq-thresholds", None),
        # the new settings
        ({"max-failed-rounds": 0}, "max-failed-rounds", "[1, 10000]"),
        ({"node-max-failures": 0}, "node-max-failures", "[1, 10000]"),
        ({"resume": 3}, "resume", None),
        ({"resume": "/no/such/run"}, "resume", "existing"),
        # types: ints refuse fractions and booleans; booleans true/false only; strings refuse numbers
        ({"num-shards": 2.5}, "num-shards", None),
        ({"num-shards": True}, "num-shards", None),
        ({"num-shards": "4"}, "num-shards", None),
        ({"hflip": 1}, "hflip", "true or false"),
        ({"hflip": "yes"}, "hflip", None),
        ({"lr": True}, "lr", None),
        ({"dataset": 1}, "dataset", None),
        ({"out-dir": 1.5}, "out-dir", None),
        ({"msr": None}, "msr", None),
        ({"num-rounds": [1, 2]}, "num-rounds", None),
    ],
)
def test_bad_settings_are_refused_naming_the_key_and_range(override, key, match):
    _refused(override, key, match)


def test_good_edge_values_are_accepted():
    base = _pyproject_config()
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps", "xpu", "xpu:3"):  # the rule; the full
        assert Settings.from_run_config({**base, "device": device}).device == device  # check wants it here too
    for device in ("auto", "cpu"):
        assert settings_from_run_config(base, {"device": device}).device == device
    s = settings_from_run_config(
        base,
        {
            "aug-range": "inf",
            "seed": 2**31 - 1,
            "randaugment-magnitude": 30,
            "randaugment-ops": 14,
            "sample-steps": 1000,
            "lr": 1,
            "hflip": "TRUE",
            "fid": "false",
            "num-shards": 4.0,
            "eval-every": 0,
            "warmup-epochs": 0,
            "mq-thresholds": "1,0.25",
            "image-size": 1024,
        },
    )
    assert math.isinf(s.aug_range) and s.hflip is True and s.fid is False and s.num_shards == 4
    assert s.thresholds == (1.0, 0.25) and isinstance(s.lr, float)


def test_constructor_and_replace_check_ranges_too():
    with pytest.raises(ValueError, match="^lr:"):
        Settings(lr=float("nan"))
    with pytest.raises(ValueError, match="^seed:"):
        Settings().replace(seed=-1)
    assert Settings().replace(seed=3).seed == 3 and Settings(lr=1).lr == 1.0


# ---- data-dependent checks, up front and without decoding the data --------------------------


def test_num_train_images_without_decoding(tmp_path):
    from sklearn.datasets import load_digits

    from ddpm.data import num_train_images

    assert num_train_images("digits") == len(load_digits().images) - 1 == 1796
    assert num_train_images("cifar10") == num_train_images("cifar100") == 50000
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not decoded")
    (tmp_path / "notes.txt").write_text("x")
    assert num_train_images("imagefolder", str(tmp_path)) == 3


@pytest.mark.parametrize(
    ("override", "key", "match"),
    [
        ({"num-shards": 500, "train-size": 400}, "num-shards", "[1, 400]"),
        ({"mq-neighbours": 1000}, "mq-neighbours", "[1, 400]"),
        ({"train-size": 5000}, "train-size", "[2, 1796] for digits"),
        ({"train-size": 1797}, "train-size", None),
        ({"train-size": 0}, "train-size", None),
        ({"dataset": "cifar10", "train-size": 60000}, "train-size", "[0, 50000]"),
        ({"train-size": 30}, "mq-neighbours", "[1, 30]"),
        ({"train-size": 3, "mq-neighbours": 3}, "num-shards", "[1, 3]"),
    ],
)
def test_data_size_checks(override, key, match):
    _refused(override, key, match)


def _image_folder(path, n):
    path.mkdir()
    for i in range(n):
        (path / f"{i:03d}.png").write_bytes(b"")  # counted, never decoded
    return str(path)


def test_image_folder_size_is_checked_up_front(tmp_path):
    root = _image_folder(tmp_path / "three", 3)
    base = {"dataset": "imagefolder", "data-root": root, "out-dir": str(tmp_path / "runs"), "mq-neighbours": 3}
    _refused({**base, "train-size": 10}, "train-size", "holds 3 images")
    _refused({**base, "train-size": 0}, "num-shards", "[1, 3]")
    _refused({**base, "train-size": 0, "num-shards": 3, "mq-neighbours": 10}, "mq-neighbours", "[1, 3]")
    _refused({**base, "data-root": _image_folder(tmp_path / "empty", 0)}, "data-root", "at least one image")
    ok = {**base, "train-size": 0, "num-shards": 3, "mq-neighbours": 3}
    assert settings_from_run_config(_pyproject_config(), ok).train_size == 0
    empty = _image_folder(tmp_path / "no-holdout", 0)
    _refused({**ok, "holdout-root": empty}, "holdout-root", "at least one image")


def test_missing_paths_name_their_key(tmp_path):
    _refused({"dataset": "cifar10", "data-root": str(tmp_path / "nope")}, "data-root", "existing directory")
    _refused({"dataset": "cifar10", "data-root": "~/surely-not-here-iet"}, "data-root", "no such directory")
    _refused({"holdout-root": str(tmp_path / "nope")}, "holdout-root")
    _refused({"fid-weights": str(tmp_path)}, "fid-weights", "existing file")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused({"resume": str(a_file)}, "resume", "existing run folder")
    assert settings_from_run_config(_pyproject_config(), {"resume": str(tmp_path)}).resume == str(tmp_path)
    _refused({"data-root": "a\0b"}, "data-root", "NUL")
    _refused({"out-dir": "x" * 5000}, "out-dir")  # name too long: an OSError turned into the key's error


# ---- out-dir: non-empty and writable, checked where the run starts, never on a node ---------


def test_out_dir_must_be_non_empty_and_writable(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused({"out-dir": ""}, "out-dir", "non-empty")
    _refused({"out-dir": "   "}, "out-dir", "non-empty")
    _refused({"out-dir": str(a_file)}, "out-dir", "not a directory")
    _refused({"out-dir": str(a_file / "runs")}, "out-dir", "not a directory")  # under a regular file: even root
    _refused({"fid-cache-dir": str(a_file / "cache")}, "fid-cache-dir", "not a directory")
    ok = settings_from_run_config(_pyproject_config(), {"out-dir": str(tmp_path / "new" / "runs")})
    assert ok.out_dir.endswith("runs") and not (tmp_path / "new").exists()  # checked, not made


def test_nodes_run_the_pure_checks_but_not_the_servers_paths(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    sent = {**Settings().to_run_config(), "out-dir": str(a_file / "runs"), "resume": "/server/run", "shard": 0}
    s = settings_from_message(sent, {})
    assert s.out_dir == str(a_file / "runs") and s.resume == ""
    with pytest.raises(ValueError, match="^lr:"):
        settings_from_message({**sent, "lr": float("nan")}, {})
    with pytest.raises(ValueError, match="^device:"):
        settings_from_message(sent, {"device": "gpu0"})


def test_every_key_has_a_documented_range():
    readme = (ROOT / "README.md").read_text()
    for key, allowed in Settings.allowed().items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{key}` |"))
        assert allowed in row, f"README row of {key} lacks its range: {allowed}"


# ---- --run-config: a TOML syntax error names the key it was reading ---------------------------


def test_run_config_syntax_error_names_the_key(tmp_path, capsys, monkeypatch):
    from iet_agc import run as cli
    from iet_agc.cli import main
    from iet_agc.inputs import parse_run_config

    def never(*args, **kwargs):
        raise AssertionError("iet-agc run went past the settings check")

    monkeypatch.setattr(cli.subprocess, "Popen", never)  # bad settings never reach flwr
    monkeypatch.setattr(cli, "_stop", never, raising=False)  # nor touch a running SuperLink

    with pytest.raises(ValueError) as err:
        parse_run_config(['num-shards=3 lr="1e-3'])
    assert str(err.value).startswith("--run-config: lr: invalid TOML value '\"1e-3' (")
    assert parse_run_config(["num-shards=3 lr=1e-3x"]) == {"num-shards": 3, "lr": "1e-3x"}  # text, for the check
    with pytest.raises(ValueError, match="^--run-config: lr: given twice"):
        parse_run_config(["lr=0.1 lr=0.2"])
    with pytest.raises(ValueError, match="^--run-config: expected key=value"):
        parse_run_config(["lr"])
    assert parse_run_config(['lr=0.01 out-dir="a b" aug-range=inf', "seed=3"]) == {
        "lr": 0.01,
        "out-dir": "a b",
        "aug-range": math.inf,
        "seed": 3,
    }
    preset = tmp_path / "bad.toml"
    preset.write_text('lr = 0.1\nnum-shards = 3x\nmsr = "none"\n')
    with pytest.raises(ValueError) as err:
        parse_run_config([str(preset)])
    assert str(err.value).startswith(f"--run-config: {preset}: line 2 (num-shards): invalid TOML")
    # iet-agc run stops before submitting (exit 2), naming the key
    assert main(["run", "--run-config", "lr=1e-3x", str(ROOT)]) == 2
    assert "iet-agc run: error: lr: must be a finite number in (0, 1], got '1e-3x'" in capsys.readouterr().err
    assert main(["run", "--run-config", "lr=nan", str(ROOT)]) == 2
    assert "lr:" in capsys.readouterr().err


TABLE1 = sorted((ROOT / "configs" / "table1").glob("*.toml"))


def _table1_rows() -> dict[str, dict]:
    """The rows of the digits Table I sweep (without its [set]), named as the preset files are."""
    with open(ROOT / "configs" / "sweeps" / "table1.toml", "rb") as fh:
        return {name.replace("+", "-plus"): row for name, row in tomllib.load(fh)["rows"].items()}


def test_table1_has_a_cifar10_preset_for_every_row_of_the_table1_sweep():
    assert {p.stem for p in TABLE1} == set(_table1_rows()) and len(TABLE1) == 6


@pytest.mark.parametrize("preset", TABLE1, ids=lambda p: p.stem)
def test_table1_presets_are_cifar10_with_their_rows_changes(preset):
    """Each CIFAR-10 Table I preset is configs/cifar10.toml changed exactly as its row of the digits
    sweep changes the default (the two tables differ in data and scale only), and it validates."""
    with open(ROOT / "configs" / "cifar10.toml", "rb") as fh:
        cifar10 = tomllib.load(fh)
    with open(preset, "rb") as fh:
        mine = tomllib.load(fh)
    changes = dict(_table1_rows()[preset.stem])
    if changes.get("dp-sgd"):  # on the 35.7M-parameter UNet, per-sample gradients in parts of 32
        changes["dp-max-physical-batch"] = 32
    assert mine == {**cifar10, **changes}
    settings = settings_from_run_config(_pyproject_config(), mine)
    assert settings.dataset == "cifar10" and settings.model == "cifar"


def test_a_device_this_machine_lacks_is_refused_before_the_run(tmp_path):
    from fl_app.config import settings_from_run_config

    for device in ("cuda:999", "xpu:999"):
        with pytest.raises(ValueError, match=f"^device: {device}: "):
            settings_from_run_config({"device": device, "out-dir": str(tmp_path)})
    assert settings_from_run_config({"device": "cpu", "out-dir": str(tmp_path)}).device == "cpu"


@pytest.mark.parametrize("preset", ["laion10k", "laion10k-lora"])
def test_stable_diffusion_presets_carry_the_authors_settings_and_validate_on_a_local_copy(preset, tmp_path):
    """configs/laion10k*.toml: the authors' SD run (liuxiao-guan/IET-AGC_SD's diff_train_fed_acce_es.sh)
    and its LoRA variant; without data they stop naming data-root, and with a local checkpoint and a
    captioned folder in place of the Hub id and LAION they pass every check before training."""
    import json

    from conftest import noise_pngs

    from ddpm.text_pipeline import build_text_pipeline

    with open(ROOT / "configs" / f"{preset}.toml", "rb") as fh:
        p = tomllib.load(fh)
    authors = {"num-shards": 4, "num-rounds": 25, "local-steps": 2000, "batch-size": 8, "image-size": 256}
    assert {k: p[k] for k in authors} == authors
    assert (p["optimizer"], p["weight-decay"], p["skip-threshold"], p["bank-eta"]) == ("adamw", 0.01, 0.8, 0.8)
    assert (p["taa"], p["msr"], p["eval-num-images"], p["sample-steps"], p["guidance-scale"]) == (
        False,
        "none",
        4000,
        50,
        7.5,
    )
    full = preset == "laion10k"
    assert (p["adapter"], p["lr"], p["warmup-steps"]) == (("none", 2.5e-6, 5000) if full else ("lora", 1e-4, 0))
    with pytest.raises(ValueError, match="^data-root:"):
        settings_from_run_config(_pyproject_config(), p)
    base = tmp_path / "sd"
    build_text_pipeline(base, resolution=256)
    images = noise_pngs(tmp_path / "train", 8, 0, 256)
    (images / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i:03d}.png", "text": f"image {i}"}) + "\n" for i in range(8))
    )
    local = {**p, "init-from": str(base), "data-root": str(images), "device": "cpu", "mq-neighbours": 4}  # 8 images
    s = settings_from_run_config(_pyproject_config(), local)
    assert s.text_conditional and s.local_steps == 2000 and s.optimizer == "adamw"
