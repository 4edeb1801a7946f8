"""Experiment tracking (fl_app/trackers.py), read back with each tracker's own reader: TensorBoard's
``EventAccumulator``, ``mlflow.MlflowClient`` on the local store, W&B's ``wandb leet inspect`` on
the offline ``.wandb`` file. One real run in this process (TensorBoard, its tracker raising at
round 2) and its resume; MLflow and W&B are handed that run folder's rounds by ``open_tracker``,
as a ServerApp that starts or resumes a run does."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from fl_app.config import settings_from_run_config
from fl_app.run_folder import run_result
from fl_app.settings import Settings
from fl_app.simulation import run_in_process
from fl_app.trackers import STATE, TRACKER_KEYS, hyperparameters, open_tracker, read_state

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # two shards of 16 digits, evaluated every round: seconds per round after Ray's start
    "train-size": 32,
    "num-shards": 2,
    "num-rounds": 2,
    "local-epochs": 1,
    "batch-size": 16,
    "eval-every": 1,
    "eval-num-images": 16,
    "sample-steps": 2,
    "mq-neighbours": 8,
    "fid": False,
}
METRICS = ("train_loss", "skip_rate", "aug_rate", "moved", "replies", "dropped", "seconds", "mq_0.5", "digit_fd")


def _only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if (p / "rounds.csv").is_file()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """A run with tracker = tensorboard whose SummaryWriter raises at round 2's images (the run
    finishes), then the run resumed to 3 rounds: (run folder, log records of the first run)."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path_factory.mktemp("tracked") / "runs"
    original = SummaryWriter.add_image

    def full_disk(self, tag, img_tensor, global_step=None, *args, **kwargs):
        if global_step == 2:
            raise OSError(28, "No space left on device")
        return original(self, tag, img_tensor, global_step, *args, **kwargs)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("flwr").addHandler(handler)
    patch = pytest.MonkeyPatch()
    patch.setattr(SummaryWriter, "add_image", full_disk)
    try:
        run_in_process({**SMALL, "out-dir": str(out), "tracker": "tensorboard"})
    finally:
        patch.undo()
        logging.getLogger("flwr").removeHandler(handler)
    run = _only_run(out)
    first = {"rows": pd.read_csv(run / "rounds.csv"), "state": read_state(run), "records": records}
    run_in_process({**SMALL, "out-dir": str(out), "tracker": "tensorboard", "num-rounds": 3, "resume": str(run)})
    return run, first


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_a_tracker_that_raises_mid_run_is_warned_about_and_the_run_goes_on(tensorboard_run):
    run, first = tensorboard_run
    assert first["rows"]["round"].tolist() == [1, 2]  # the first run finished both rounds
    warnings = [r.getMessage() for r in first["records"] if r.levelno == logging.WARNING]
    assert any("tracker tensorboard failed at round 2" in w and "No space left" in w for w in warnings), warnings
    assert first["state"]["tensorboard"]["round"] == 1  # the last round it took
    assert (run / "report.md").is_file() and (run / "pipeline" / "model_index.json").is_file()


def test_tensorboard_holds_every_round_once_at_its_step_after_the_resume(tensorboard_run):
    run, _ = tensorboard_run
    state = read_state(run)["tensorboard"]
    log_dir = Path(state["run_id"])
    assert log_dir == run.parent / "tensorboard" / run.name and state["round"] == 3
    events = _events(log_dir)
    rows = pd.read_csv(run / "rounds.csv").set_index("round")
    for column in METRICS:
        logged = [(e.step, e.value) for e in events.Scalars(column)]
        assert [s for s, _ in logged] == [1, 2, 3], (column, logged)  # round 2 sent again on resume, once
        assert [v for _, v in logged] == pytest.approx(rows[column].tolist(), rel=1e-6), column
    for image in ("samples", "pairs", "curves"):
        assert [e.step for e in events.Images(image)] == ([1, 2, 3] if image != "curves" else [1, 3]), image
    final = run_result(run)
    assert events.Scalars("final/mq_0.5")[-1].value == pytest.approx(final["mq_0.5"])
    assert events.Scalars("final/skip_rate")[-1].step == 3
    folder = events.Tensors("run_folder/text_summary")[0].tensor_proto.string_val[0].decode()
    assert folder == str(run.resolve())


def test_tensorboard_hyperparameters_are_the_settings(tensorboard_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, _ = tensorboard_run
    events = _events(Path(read_state(run)["tensorboard"]["run_id"]))
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train-size"].number_value == 32 and hparams["dataset"].string_value == "digits"
    assert hparams["seed"].number_value == 0 and hparams["msr"].string_value == "memory"
    assert set(hparams) == set(hyperparameters(Settings()))  # every setting but where it writes
    assert not set(hparams) & set(TRACKER_KEYS)


# ---- MLflow and W&B: the run folder's rounds handed over by open_tracker, then a resume ----------
def _replay(tmp_path: Path, run: Path, tracker: str, **extra) -> tuple[Path, Settings]:
    """A copy of the run whose tracked run took rounds 1-2 and stopped, then resumed: round 3 and
    the end. Returns the copy and its settings."""
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    (copy / STATE).unlink()
    settings = Settings(**{k.replace("-", "_"): v for k, v in SMALL.items()}, tracker=tracker, **extra)
    rows = pd.read_csv(copy / "rounds.csv").to_dict("records")
    stopped = open_tracker(settings, copy, rows[:2])
    stopped.close(ok=False)
    resumed = open_tracker(settings, copy, rows[:2])  # a resume hands over what the tracked run lacks
    assert resumed.backend.run_id == stopped.backend.run_id
    resumed.round_done(rows[2])
    resumed.finish(run_result(copy))
    resumed.close(ok=True)
    return copy, settings


def test_mlflow_holds_every_round_once_the_images_parameters_and_artifacts(tensorboard_run, tmp_path):
    from mlflow import MlflowClient

    run, _ = tensorboard_run
    copy, settings = _replay(tmp_path, run, "mlflow")
    store = tmp_path / "runs" / "mlflow"
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("iet-agc")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_id == read_state(copy)["mlflow"]["run_id"] and tracked.info.status == "FINISHED"
    assert tracked.info.run_name == copy.name and tracked.data.tags["run_folder"] == str(copy.resolve())
    rows = pd.read_csv(copy / "rounds.csv").set_index("round")
    for column in METRICS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, column))
        assert [s for s, _ in history] == [1, 2, 3], (column, history)
        assert [v for _, v in history] == pytest.approx(rows[column].tolist(), rel=1e-6), column
    assert tracked.data.metrics["final/mq_0.5"] == pytest.approx(run_result(copy)["mq_0.5"])
    params = tracked.data.params
    assert params == {k: str(v) for k, v in hyperparameters(settings).items()}
    images = [a.path for a in client.list_artifacts(tracked.info.run_id, "images")]
    for key, steps in (("samples", (1, 2, 3)), ("pairs", (1, 2, 3)), ("curves", (3,))):  # curves: live rounds
        logged = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if p.startswith(f"images/{key}+"))
        assert logged == sorted(steps * 2), (key, logged)  # each a PNG and MLflow's compressed copy
    top = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"pipeline", "report.md", "rounds.csv", "settings.toml"} <= top
    assert "pipeline/model_index.json" in {a.path for a in client.list_artifacts(tracked.info.run_id, "pipeline")}


def _wandb_records(run_file: Path) -> list[dict]:
    """The records of an offline run's ``.wandb`` file, as W&B's own reader prints them."""
    wandb = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_files_hold_every_round_once_the_images_and_config(tensorboard_run, tmp_path):
    run, _ = tensorboard_run
    copy, settings = _replay(tmp_path, run, "wandb", tracker_group="table3", tracker_tags="cell=agc+iet;seed=0")
    run_id = read_state(copy)["wandb"]["run_id"]
    files = sorted((tmp_path / "runs" / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    # the stopped run and its resume: one W&B run id, synced in order (W&B appends -1 to a folder
    # name already taken, as when both start within the same second)
    files.sort(key=lambda f: (f.parent.name.rsplit(run_id, 1)[0], f.parent.name))
    assert len(files) == 2
    records = [r for f in files for r in _wandb_records(f)]
    history = [(f, r["history"]) for f in files for r in _wandb_records(f) if r["type"] == "history"]
    steps = [h["step"]["num"] for _, h in history]
    assert steps == [1, 2, 3], steps
    rows = pd.read_csv(copy / "rounds.csv").set_index("round")
    for file, h in history:
        item = h["item"]
        for column in METRICS:
            assert item[column] == pytest.approx(rows.at[h["step"]["num"], column], rel=1e-6), column
        for image in ("samples", "pairs"):  # W&B flattens an image's fields: samples.path, ...
            assert item[f"{image}._type"] == "image-file"
            assert (file.parent / "files" / item[f"{image}.path"]).is_file()
    started = next(r["run"] for r in records if r["type"] == "run")
    assert started["project"] == "iet-agc" and started["run_group"] == "table3"
    assert started["tags"] == ["cell=agc+iet", "seed=0"] and started["display_name"] == copy.name
    config = dict(started.get("config", {}).get("update", {}))
    for r in records:
        if r["type"] == "config":
            config.update(r["config"].get("update", {}))
    assert config["train-size"] == 32 and config["cell"] == "agc+iet" and config["msr"] == "memory"
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["final/mq_0.5"] == pytest.approx(run_result(copy)["mq_0.5"])
    assert summary["run_folder"] == str(copy.resolve())


# ---- refused before training -------------------------------------------------------------------
@pytest.mark.parametrize("tracker, module", [("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_tracker_that_is_not_installed_is_refused_naming_tracker(tmp_path, monkeypatch, tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # import mlflow -> ImportError, as without the package
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "runs"
    with pytest.raises(ValueError, match=rf'^tracker: {tracker} is not installed .*pip install -e "\.\[{tracker}\]"'):
        settings_from_run_config({**SMALL, "out-dir": str(out), "tracker": tracker})
    assert not out.exists()  # before anything: no run folder, nothing logged


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_iet_agc_run_exits_2_naming_tracker_before_submitting(tmp_path, monkeypatch, capsys):
    """The settings-error path of ``iet-agc run``: one line, exit 2, no SuperLink touched."""
    import iet_agc.run
    from iet_agc.cli import main

    def never(*args, **kwargs):
        raise AssertionError("iet-agc run went past the settings check")

    monkeypatch.setattr(iet_agc.run, "_stale_superlinks", never)
    monkeypatch.setattr(iet_agc.run, "subprocess", SimpleNamespace(Popen=never, run=never))  # its own only
    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "runs"
    assert main(["run", str(ROOT), "--run-config", f"tracker='mlflow' out-dir='{out}'"]) == 2
    assert capsys.readouterr().err.startswith("iet-agc run: error: tracker: mlflow is not installed")
    monkeypatch.delitem(sys.modules, "mlflow")
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert main(["run", str(ROOT), "--run-config", f"tracker='mlflow' tracker-uri='{uri}' out-dir='{out}'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"iet-agc run: error: tracker-uri: the mlflow server {uri} cannot be reached"), err
    assert not out.exists()


def test_a_tracker_that_cannot_start_stops_the_run_naming_tracker(tmp_path):
    run = tmp_path / "runs" / "run-a"
    run.mkdir(parents=True)
    (tmp_path / "runs" / "tensorboard").write_text("a file where the log folders go")
    with pytest.raises(ValueError, match=r"^tracker: tensorboard could not start a run in .*tensorboard"):
        open_tracker(Settings(tracker="tensorboard"), run)
    assert not (run / STATE).exists()


# ---- sweeps: one group, cell and seed as tags ----------------------------------------------------
def test_a_sweep_groups_its_cells_and_tags_cell_and_seed(tensorboard_run, tmp_path):
    from mlflow import MlflowClient

    from iet_agc.sweep_file import config_hash, load_sweep

    file = tmp_path / "tiny.toml"
    file.write_text(
        'base = "default"\nseeds = [0, 1]\n[set]\ntracker = "mlflow"\n[grid]\nskip-threshold = [0.3, 0.5]\n'
    )
    sweep = load_sweep(file, out=tmp_path / "sweeps" / "tiny")
    cell = sweep.cells[0]
    config = sweep.config(cell, 1)
    assert config["tracker-group"] == "tiny" and config["tracker-run-name"] == f"{cell.name}-seed1"
    assert config["tracker-tags"] == f"cell={cell.name};seed=1"
    assert config["tracker-dir"] == str(tmp_path / "sweeps" / "tiny" / "mlflow")
    untracked = {k: v for k, v in config.items() if not k.startswith("tracker")}
    assert config_hash(config) == config_hash(untracked)  # tracking a sweep never makes its rows stale
    run, _ = tensorboard_run
    for cell in sweep.cells:
        for seed in sweep.seeds:
            copy = tmp_path / "cells" / f"{cell.name}-{seed}" / run.name
            shutil.copytree(run, copy)
            (copy / STATE).unlink()
            settings = Settings.from_run_config(sweep.config(cell, seed))
            tracker = open_tracker(settings, copy, pd.read_csv(copy / "rounds.csv").to_dict("records"))
            tracker.close(ok=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'tiny' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    table = client.search_runs([experiment.experiment_id], filter_string=f"tags.cell = '{sweep.cells[1].name}'")
    assert sorted(r.data.tags["seed"] for r in table) == ["0", "1"]
    assert {r.data.params["skip-threshold"] for r in table} == {"0.5"}
    assert len(client.search_runs([experiment.experiment_id])) == 4
