"""One ``key=value`` rule: the same pairs through ``iet-agc run --run-config``, ``iet-agc evaluate
--set`` and ``iet-agc sweep --set`` give the same settings, or the same exit-2 line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fl_app.config import settings_from_run_config
from fl_app.settings import Settings
from iet_agc import run as run_cmd
from iet_agc import sweep as sweep_cmd
from iet_agc.cli import build_parser, main
from iet_agc.evaluate import evaluate_settings
from iet_agc.inputs import InputError, parse_pairs
from iet_agc.run import prepare_run
from iet_agc.sweep_file import load_sweep

ROOT = Path(__file__).resolve().parents[1]
WHERE = ("out-dir", "resume")  # where a run writes: each command sets its own

GOOD = [
    "num-shards=3 lr=0.0005",
    "dataset=digits agc=false",  # a bare word is text
    'skip-threshold=0.4 mq-thresholds="0.3,0.5"',
]
BAD = [
    "lr=1e-3x",  # not TOML: text, which the settings refuse
    "num-shards=0",
    "no-such-key=1",
    "lr = 0.1",  # spaces around =
    'lr="0.1',  # begun as a string: TOML's error
    "lr=0.1 lr=0.2",  # twice in one item
    "adapter=lora",  # needs init-from
]


def _run_settings(items: list[str]) -> dict:
    """What the ServerApp of ``iet-agc run`` reads: the submitted --run-config over the app's defaults."""
    args = build_parser().parse_args(["run", str(ROOT), *(a for item in items for a in ("--run-config", item))])
    cmd = prepare_run(args)
    sent = parse_pairs(cmd[cmd.index("--run-config") + 1], "--run-config")
    return settings_from_run_config(run_cmd._project_defaults(ROOT), sent).to_run_config()


def _evaluate_settings(items: list[str]) -> dict:
    args = build_parser().parse_args(["evaluate", "x", *(a for item in items for a in ("--set", item))])
    return evaluate_settings(None, args)[0].to_run_config()


def _sweep_settings(items: list[str], tmp_path: Path) -> dict:
    (tmp_path / "s.toml").write_text("seeds = [0]\n")
    sweep = load_sweep(tmp_path / "s.toml", extra=parse_pairs(items, "--set"), out=tmp_path / "out")
    return Settings.from_run_config(sweep.config(sweep.cells[0], 0)).to_run_config()


def _without_where(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in WHERE}


@pytest.mark.parametrize("items", [[p] for p in GOOD] + [["num-rounds=3", "num-rounds=4"]])  # later wins
def test_the_same_pairs_give_the_same_settings(items, tmp_path):
    ran = _without_where(_run_settings(items))
    assert ran == _without_where(_evaluate_settings(items)) == _without_where(_sweep_settings(items, tmp_path))
    given = parse_pairs(items, "--set")
    assert all(ran[k] == Settings.from_run_config(given).to_run_config()[k] for k in given)
    assert ran != _without_where(Settings.from_run_config({}).to_run_config())  # the pairs took effect


def _exit_line(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    command = argv[0]
    assert err.startswith(f"iet-agc {command}: error: "), err
    return re.sub(r"--run-config|--set", "<option>", err.removeprefix(f"iet-agc {command}: error: "))


@pytest.mark.parametrize("pairs", BAD)
def test_the_same_bad_pairs_give_the_same_exit_2_line(pairs, tmp_path, capsys, monkeypatch):
    never = lambda *a, **k: pytest.fail("went past the settings check")  # noqa: E731
    monkeypatch.setattr(run_cmd.subprocess, "Popen", never)
    monkeypatch.setattr(run_cmd, "_stop", never)
    monkeypatch.setattr(sweep_cmd, "run_sweep", never)
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")  # the source is found; the settings come first
    (tmp_path / "s.toml").write_text("seeds = [0]\n")
    lines = {
        "run": _exit_line(["run", str(ROOT), "--run-config", pairs], capsys),
        "evaluate": _exit_line(["evaluate", str(pipeline), "--set", pairs], capsys),
        "sweep": _exit_line(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--set", pairs], capsys),
    }
    assert len(set(lines.values())) == 1, lines
    key = re.split(r"[ =]", pairs)[0]
    assert key in lines["run"], lines


def test_a_value_toml_does_not_read_is_text_unless_begun_as_toml():
    assert parse_pairs("dataset=cifar10 data-root=/data/x lr=1e-3x", "--set") == {
        "dataset": "cifar10",
        "data-root": "/data/x",
        "lr": "1e-3x",
    }
    assert parse_pairs(["a=1 b=true", 'c="x y"', "a=2"], "--set") == {"a": 2, "b": True, "c": "x y"}
    for text, message in [
        ("a=[1,", "--set: a: invalid TOML value '[1,'"),
        ("a=1 a=2", "--set: a: given twice"),
        ("a", "--set: expected key=value pairs"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            parse_pairs(text, "--set")
    assert parse_pairs("", "--set") == {}
