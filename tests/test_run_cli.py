"""`iet-agc run`'s options as `flwr run` takes them, and every `iet-agc run` example of the README."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from iet_agc.cli import build_parser
from iet_agc.run import prepare_run

ROOT = Path(__file__).resolve().parents[1]


def _command(argv: list[str]) -> list[str]:
    args, unknown = build_parser().parse_known_args(argv)
    return prepare_run(args) + unknown


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_one_toml_file_or_pairs_never_both(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    preset = _command(["run", "--run-config", "configs/cifar10.toml"])
    assert "num-shards=10" in _option(preset, "--run-config").split()
    pairs = _command(["run", "-c", "num-rounds=5 lr=0.0005", "-c", "num-rounds=6"])
    assert _option(pairs, "--run-config").split()[:2] == ["num-rounds=6", "lr=0.0005"]  # later wins, as flwr
    with pytest.raises(ValueError, match=r"--run-config: a TOML file \(configs/cifar10.toml\) cannot be combined"):
        _command(["run", "--run-config", "configs/cifar10.toml", "--run-config", "num-rounds=3"])
    with pytest.raises(ValueError, match=r"--run-config: expected key=value pairs .*'num-rounds = 5'"):
        _command(["run", "--run-config", "num-rounds = 5"])  # flwr would silently skip it
    with pytest.raises(ValueError, match=r"--run-config: lr: invalid TOML value '\[0.1'"):
        _command(["run", "--run-config", "lr=[0.1"])  # begun as an array: TOML's error
    with pytest.raises(ValueError, match=r"^lr: must be a finite number in \(0, 1\], got '1e-3x'"):
        _command(["run", "--run-config", "lr=1e-3x"])  # not TOML: text, which the settings refuse


def test_relative_paths_are_taken_from_where_the_user_runs(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "a.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "imgs" / "b.png")
    monkeypatch.chdir(tmp_path)
    pairs = "dataset='imagefolder' data-root='imgs' out-dir='out' num-shards=2 mq-neighbours=2 train-size=0"
    config = _option(_command(["run", str(ROOT), "--run-config", pairs]), "--run-config")
    assert f'data-root="{tmp_path / "imgs"}"' in config and f'out-dir="{tmp_path / "out"}"' in config


def test_federation_config_and_other_flwr_options_pass_through(monkeypatch):
    monkeypatch.chdir(ROOT)
    cmd = _command(["run", "--federation-config", "num-supernodes=3 client-resources-num-cpus=1", "--format", "json"])
    assert _option(cmd, "--federation-config").split()[:2] == ["num-supernodes=3", "client-resources-num-cpus=1"]
    assert cmd[2] == str(ROOT) and cmd[-1] == "--format=json"
    cmd = _command(["run", ".", "lab", "--federation", "@me/x", "--some-future-flag"])
    assert cmd[2:4] == [str(ROOT), "lab"] and cmd[-2:] == ["--federation=@me/x", "--some-future-flag"]
    assert "num-supernodes=4" in _option(_command(["run", "--supernodes", "4"]), "--federation-config")
    gpus = _option(_command(["run", "--gpus", "0.5"]), "--federation-config")
    assert "client-resources-num-gpus=0.5" in gpus
    with pytest.raises(ValueError, match="num-supernodes=2 contradicts --supernodes 3"):
        _command(["run", "--supernodes", "3", "--federation-config", "num-supernodes=2"])
    with pytest.raises(ValueError, match=r"min-nodes: must be <= num-supernodes \(1\)"):
        _command(["run", "--federation-config", "num-supernodes=1", "-c", "min-nodes=2"])


def _readme_commands() -> list[str]:
    """Each shell line of the README's bash blocks that runs `iet-agc run`, or prepares its input."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if "iet-agc run" in line or line.startswith("sed ")]


# what a README example may still stop at: the user's own paths (a run folder, the AFHQ images, a
# run's pipeline to fine-tune, a tracking server of their own), and the Hugging Face Hub, which this
# offline machine cannot reach
PLACEHOLDERS = (
    "not a run folder (no such directory)",
    "data-root: must be an existing directory",
    "-digits-seed0/pipeline' (no such directory)",  # a run's pipeline the user made before
    "got '/models/sd-2-1-base' (no such directory)",  # the user's own Stable Diffusion checkpoint
    "init-from: cannot download 'google/ddpm-cifar10-32'",  # the Hub id kept as a Hub id
    "tracker-uri: the mlflow server http://mlflow.example:5000 cannot be reached",
)


def test_every_readme_example_of_iet_agc_run_is_accepted(tmp_path, monkeypatch):
    for name in ("pyproject.toml", "configs"):
        (shutil.copytree if name == "configs" else shutil.copy)(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: fail at once, not after the Hub client's retries
    commands = _readme_commands()
    assert sum("iet-agc run" in c for c in commands) >= 6, commands
    for line in commands:
        if not line.startswith("pip install") and "iet-agc run" not in line:
            subprocess.run(line, shell=True, check=True, cwd=tmp_path)  # e.g. the sed that copies a preset
            continue
        argv = shlex.split(line.split("&&")[-1])[1:]  # after `iet-agc`
        try:
            cmd = _command(argv)
        except Exception as err:  # the message is what the user reads
            assert any(p in str(err) for p in PLACEHOLDERS), f"{line}: {err}"
            continue
        assert cmd[:2] == ["flwr", "run"] and "--stream" in cmd, line


def test_a_hub_id_stays_a_hub_id_and_a_relative_folder_becomes_absolute(tmp_path, monkeypatch):
    from iet_agc.run import _absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pipeline").mkdir(parents=True)
    (tmp_path / "owner" / "local").mkdir(parents=True)  # owner/name that is a folder here: a path
    given = {"init-from": "google/ddpm-cifar10-32", "out-dir": "runs", "data-root": "~/data"}
    assert _absolute_paths(given) == {**given, "out-dir": str(tmp_path / "runs")}
    assert _absolute_paths({"init-from": "runs/pipeline"}) == {"init-from": str(tmp_path / "runs" / "pipeline")}
    assert _absolute_paths({"init-from": "owner/local"}) == {"init-from": str(tmp_path / "owner" / "local")}
