"""Checkpoint and resume: a killed run, resumed, ends exactly as an uninterrupted run.

The end-to-end test drives the README's command (`iet-agc run`) in a fresh FLWR_HOME, kills it
with SIGKILL twice (the SuperLink alone after round 1 of 4, the whole process tree after round 3
of the resumed run), resumes it with `iet-agc run --resume` each time, and compares the tables
and the final weights with an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import background, newcomer_env, output, stop_local_superlinks, superlink_pids
from safetensors.numpy import load_file

from fl_app.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fl_app.resume import resumed_settings, run_folder_lock
from fl_app.settings import Settings
from iet_agc.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "train-size=120 num-shards=4 num-rounds=4 local-epochs=6 batch-size=16 eval-every=2 eval-num-images=60 "
    "sample-steps=4 mq-neighbours=10 fid=false"
)
EXACT = ("assignments.csv", "moved.csv", "skip_counts.csv")
WEIGHTS = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"


# ---- the rules, on small inputs ------------------------------------------------------------
def test_resumed_settings_keep_the_run_and_refuse_changes_naming_the_key():
    saved = {"lr": 0.01, "num-rounds": 4, "seed": 0, "model": "tiny"}
    defaults = {"lr": 0.001, "num-rounds": 20, "seed": 0, "model": "tiny"}
    assert resumed_settings(saved, {"num-rounds": 8}, {})["num-rounds"] == 8
    assert resumed_settings(saved, {"lr": 0.001}, defaults)["lr"] == 0.01  # flwr sends the app's defaults
    with pytest.raises(ValueError, match=r"^lr: cannot change when resuming.*0\.01.*0\.5"):
        resumed_settings(saved, {"lr": 0.5}, defaults)
    with pytest.raises(ValueError, match="^lr: cannot change"):
        resumed_settings(saved, {"lr": 0.001}, {})  # `iet-agc run --resume` passes only what the user typed


def _checkpoint(r: int) -> Checkpoint:
    return Checkpoint(
        server_round=r,
        weights={"w": np.full((2, 2), r, np.float32)},
        ledger_meta={"k": r},
        ledger_arrays={"shard-0": np.arange(3)},
        rows=[{"round": i, "fid": float("nan")} for i in range(1, r + 1)],
        settings=Settings().to_run_config(),
        run_key="abc",
        fingerprint="3-x",
    )


def test_checkpoint_is_atomic_keeps_the_newest_and_loads_without_pickle(tmp_path):
    for r in (1, 2):
        save_checkpoint(tmp_path, _checkpoint(r))
    (tmp_path / "checkpoint" / ".round-000003.tmp-1").mkdir()  # a crash while writing round 3
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.server_round == 2 and ckpt.weights["w"].tolist() == [[2, 2], [2, 2]]
    assert ckpt.rows == [{"round": 1, "fid": None}, {"round": 2, "fid": None}] and ckpt.run_key == "abc"
    assert [p.name for p in (tmp_path / "checkpoint").glob("round-*")] == ["round-000002"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "state.json").write_text("{not json"), "state.json: 9 bytes"),
        (lambda d: (d / "weights.safetensors").write_bytes(b"\x00" * 5), "weights.safetensors: 5 bytes"),
        (lambda d: (d / "ledger.safetensors").unlink(), "ledger.safetensors: missing"),
        (lambda d: (d / "state.json").write_text(json.dumps({"format": 99})), "state.json: 14 bytes"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, message):
    damage(save_checkpoint(tmp_path, _checkpoint(1)))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_a_run_folder_has_one_writer(tmp_path):
    with run_folder_lock(tmp_path):
        with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path):  # released on exit
        pass


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--resume", "{tmp}/nope"], "no such directory"),
        (None, ["--run-config", "min-nodes=3"], "min-nodes: must be <= num-supernodes (2)"),
        (None, ["--supernodes", "0", "--run-config", "min-nodes=1"], "num-supernodes: must be an integer >= 1"),
        (lambda t: save_checkpoint(t, _checkpoint(1)), ["--resume", "{tmp}", "--run-config", "seed=3"], "seed:"),
        (
            lambda t: save_checkpoint(t, _checkpoint(1)),
            ["--resume", "{tmp}", "--run-config", "num-rounds=0"],
            "num-rounds",
        ),
        (
            lambda t: (save_checkpoint(t, _checkpoint(1)) / "weights.safetensors").write_bytes(b"\x01" * 9),
            ["--resume", "{tmp}"],
            "weights.safetensors: 9 bytes",
        ),
        (lambda t: (t / "afile").write_text("x"), ["--resume", "{tmp}/afile"], "no such directory"),
        (lambda t: (t / "empty").mkdir(), ["--resume", "{tmp}/empty"], "no checkpoint"),
        (lambda t: save_checkpoint(t, _checkpoint(1)), ["--resume", "{tmp}", "--run-config", "lr=0.5"], "lr:"),
        (
            lambda t: (save_checkpoint(t, _checkpoint(1)) / "state.json").write_text("{"),
            ["--resume", "{tmp}"],
            "state.json: 1 bytes",
        ),
    ],
)
def test_bad_resume_inputs_exit_2_with_one_line(tmp_path, capsys, monkeypatch, setup, args, message):
    monkeypatch.setattr("iet_agc.run.subprocess.Popen", lambda *a, **k: pytest.fail("a run was submitted"))
    if setup:
        setup(tmp_path)
    code = cli_main(["run", str(ROOT), *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


# ---- end to end: kill, resume, compare ------------------------------------------------------
def _iet_agc(env, *args, out: Path | None = None) -> subprocess.Popen:
    """`iet-agc run ...` in the background; its output goes to a temporary file (``proc.log``)."""
    config = ["--run-config", f'{TINY} out-dir="{out}"'] if out else []
    return background(["iet-agc", "run", *args, *config], env)


def _finish(proc: subprocess.Popen) -> str:
    proc.wait(timeout=600)
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def _descendants(roots: list[int]) -> list[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(roots), list(roots)
    while frontier:
        p = frontier.pop()
        children = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(children)
        frontier += children
    return sorted(found)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_until_round(proc: subprocess.Popen, out: Path, done: int) -> subprocess.Popen:
    """Return as soon as ``proc``'s round-``done`` checkpoint exists (round ``done + 1`` is in flight)."""
    deadline = time.monotonic() + 900  # ~60 s here: generous for a CPU twice as slow and busy
    while not list(out.glob(f"*/checkpoint/round-{done:06d}")):
        assert proc.poll() is None, f"the run ended before round {done}: " + output(proc)[-3000:]
        assert time.monotonic() < deadline, f"no round-{done} checkpoint in 900 s"
        time.sleep(0.05)
    return proc


def _wait_until_unlocked(run_dir: Path, seconds: float = 240) -> None:
    """Wait until no process holds the run folder (a simulation orphaned by its SuperLink stops
    itself before its next round)."""
    deadline = time.monotonic() + seconds
    with open(run_dir / ".lock", "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the run folder stayed locked"
                time.sleep(1)


def _assert_same_run(resumed: Path, reference: Path) -> None:
    a = pd.read_csv(resumed / "rounds.csv").drop(columns="seconds")
    b = pd.read_csv(reference / "rounds.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for name in EXACT:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    wa, wb = load_file(resumed / WEIGHTS), load_file(reference / WEIGHTS)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 4-round run through `iet-agc run`."""
    tmp = tmp_path_factory.mktemp("reference")
    env = newcomer_env(tmp)
    stop_local_superlinks()
    try:
        _finish(_iet_agc(env, out=tmp / "runs"))
    finally:
        _kill(superlink_pids(tmp / "flwr-home"))
    (run,) = (tmp / "runs").iterdir()
    return run


def test_killed_twice_and_resumed_twice_ends_as_an_uninterrupted_run(reference_run, fresh_shell, tmp_path):
    """The SuperLink alone is killed (SIGKILL) once round 1 is checkpointed: `iet-agc run` loses
    its stream, the orphaned ServerApp stops before its next round; the run is resumed, and its
    whole process tree (iet-agc, flwr, SuperLink, SuperExec, ServerApp, Ray) is killed once round 3
    is checkpointed; resumed again, it ends with the tables and weights of an uninterrupted run."""
    out = tmp_path / "runs"
    proc = _run_until_round(_iet_agc(fresh_shell, out=out), out, 1)
    _kill(superlink_pids())
    proc.wait(timeout=120)
    assert proc.returncode != 0
    (run,) = out.iterdir()
    _wait_until_unlocked(run)  # the orphaned ServerApp notices before its next round and stops
    assert 1 <= load_checkpoint(run).server_round < 3

    proc = _run_until_round(_iet_agc(fresh_shell, "--resume", str(run)), out, 3)
    _kill(_descendants([proc.pid, *superlink_pids()]))
    proc.wait(timeout=30)
    assert load_checkpoint(run).server_round == 3
    assert "resuming" in output(proc) and "round 1/4" not in output(proc)

    last = _finish(_iet_agc(fresh_shell, "--resume", str(run)))
    assert "resuming" in last and "round 4/4: loss" in last and "round 3/4" not in last
    _assert_same_run(run, reference_run)
