"""SIGINT and SIGTERM from another process stop `iet-agc sweep` and `iet-agc run` within seconds,
with every process they started, the checkpoint kept and the run folder free to resume.

Real processes, sized to the budget of this file (~100 s on a 2-core CPU): SIGINT on the sweep,
started with SIGINT ignored as a script's `cmd &` or a supervisor starts it (the case that kept
training), then the sweep resumed to its end; SIGTERM on `iet-agc run` (flwr, a local SuperLink
of its own, SuperExec, flwr-simulation, Ray), then its `--resume` command checked up to the
submission. That a resumed run ends exactly as an uninterrupted one is tests/test_resume.py's
(SIGKILL, then resume): a signal leaves the same kind of checkpoint, here one of the last whole
round, which these tests check. The process-tree ending itself is tested on a tree of `sleep`s.
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import ROOT, background, output

from fl_app.checkpoint import load_checkpoint
from fl_app.simulation import run_in_process
from iet_agc.stopping import end_processes, process_tree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

TINY = {
    "train-size": 40,
    "num-shards": 2,
    "num-rounds": 3,
    "local-epochs": 1,
    "batch-size": 16,
    "eval-every": 0,
    "eval-num-images": 20,
    "sample-steps": 2,
    "mq-neighbours": 5,
    "holdout-size": 150,
    "fid": False,
}
STOP_SECONDS = 15  # measured 2-4 s here (README); room for a loaded CI machine


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _mentioning(tag: str) -> list[psutil.Process]:
    """Live processes whose command line or environment names ``tag`` (the test's own folder)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and _alive(p) and (tag in " ".join(p.cmdline()) or tag in str(p.environ())):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _start(argv: list[str], env: dict, tag: Path, ignore_sigint: bool = False) -> subprocess.Popen:
    env = {**env, "PYTHONPATH": str(ROOT), "IET_AGC_TEST_TAG": str(tag)}  # this checkout's code; a tag to find
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return background(argv, env, preexec_fn=ignore)  # noqa: PLW1509


def _wait_for_a_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 600  # ~30-60 s here
    while not list(out.glob("**/checkpoint/round-*")):
        assert proc.poll() is None, "ended before its first checkpoint: " + output(proc)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in 600 s"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, sig: int, tag: Path) -> tuple[float, list[psutil.Process]]:
    """Send ``sig`` from here; returns the seconds until the command exited and what is left of
    its tree as it was just before the signal, or of anything naming the test's folder."""
    tree = [psutil.Process(proc.pid), *process_tree(proc.pid)]
    assert len(tree) >= 8, tree  # Ray's head, raylet, agents and actors at least
    started = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    seconds = time.monotonic() - started
    return seconds, [p for p in tree if _alive(p)] + _mentioning(str(tag))


def _assert_unlocked(run_dir: Path) -> None:
    with open(run_dir / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if a process still holds it
        fcntl.flock(fh, fcntl.LOCK_UN)


def _stopped_run(out: Path) -> tuple[Path, int, pd.DataFrame]:
    (run,) = {p.parents[1] for p in out.glob("**/checkpoint/round-*")}
    _assert_unlocked(run)
    ckpt = load_checkpoint(run)
    assert 1 <= ckpt.server_round < TINY["num-rounds"] and not (run / "report.md").exists()
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["round"].tolist() == list(range(1, ckpt.server_round + 1))  # no round failed by the stop
    assert (rounds["replies"] == TINY["num-shards"]).all()
    return run, ckpt.server_round, rounds


def test_sigint_stops_a_sweep_started_with_sigint_ignored_and_it_resumes(tmp_path):
    from iet_agc import sweep as sw
    from iet_agc import sweep_file as sf

    path = tmp_path / "sweep.toml"
    path.write_text("seeds = [0]\n[rows.a]\n[set]\n" + "".join(f"{k} = {str(v).lower()}\n" for k, v in TINY.items()))
    out = tmp_path / "out"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = _start(["iet-agc", "sweep", str(path), "--out", str(out)], env, tmp_path, ignore_sigint=True)
    _wait_for_a_checkpoint(proc, out)
    seconds, left = _stop(proc, signal.SIGINT, tmp_path)
    log = output(proc)
    assert proc.returncode == 130 and seconds < STOP_SECONDS, (proc.returncode, seconds, log[-3000:])
    assert not left, [(p, p.status(), p.ppid()) for p in left]
    assert "sweep stopped by SIGINT (exit 130); run the same command to continue" in log
    run, kept, before = _stopped_run(out)

    one_actor = functools.partial(run_in_process, num_cpus=2)  # the command's code, one Ray actor: cheaper
    results = sw.run_sweep(sf.load_sweep(path, out=out), one_actor, progress=False)  # what the same command does
    assert results["run"].tolist() == [str(run)]  # the stopped run resumed, not a new one
    after = pd.read_csv(run / "rounds.csv")
    assert after["round"].tolist() == list(range(1, TINY["num-rounds"] + 1)) and (run / "report.md").is_file()
    pd.testing.assert_frame_equal(after.loc[: kept - 1, before.columns], before, check_exact=True)  # kept as they were


def test_sigterm_stops_iet_agc_run_with_its_superlink_and_ray(fresh_shell, tmp_path):
    from iet_agc.cli import build_parser
    from iet_agc.run import prepare_run

    out = tmp_path / "runs"
    config = " ".join(f"{k}={str(v).lower()}" for k, v in TINY.items()) + f' out-dir="{out}"'
    proc = _start(["iet-agc", "run", "--run-config", config], fresh_shell, tmp_path)
    _wait_for_a_checkpoint(proc, out)
    seconds, left = _stop(proc, signal.SIGTERM, tmp_path)
    log = output(proc)
    assert proc.returncode == 143 and seconds < STOP_SECONDS, (proc.returncode, seconds, log[-3000:])
    assert not left, left  # the SuperLink included (started for this test's FLWR_HOME)
    run, _, _ = _stopped_run(out)
    assert f"stopped by SIGTERM (exit 143); to continue: iet-agc run --resume {run}" in log

    args, _ = build_parser().parse_known_args(["run", str(ROOT), "--resume", str(run)])
    cmd = prepare_run(args)  # the resume is accepted: checkpoint readable, folder free, settings kept
    assert f'resume="{run}"' in cmd[cmd.index("--run-config") + 1]


def test_end_processes_ends_a_tree_with_orphans_and_one_that_ignores_sigterm():
    script = 'sleep 60 & (trap "" TERM; exec sleep 61) & setsid bash -c "(sleep 63 &); sleep 64" & wait'
    root = subprocess.Popen(["bash", "-c", script])
    try:
        deadline = time.monotonic() + 20
        while True:  # the orphan (sleep 63, its parent gone) is found through its session
            tree = process_tree(root.pid)
            names = sorted(" ".join(p.cmdline()) for p in tree if _alive(p))
            if len(names) == 4:
                break
            assert time.monotonic() < deadline, names
            time.sleep(0.05)
        assert names == ["sleep 60", "sleep 61", "sleep 63", "sleep 64"]  # bash execs its last command
        stubborn = [p.pid for p in tree if p.cmdline() == ["sleep", "61"]]
        started = time.monotonic()
        killed = end_processes(tree, grace=0.5)
        assert time.monotonic() - started < 3
        assert [p.pid for p in killed] == stubborn  # it ignores SIGTERM: SIGKILL after the grace
        assert not [p for p in tree if _alive(p)]
    finally:
        root.kill()
        root.wait()


def test_a_stop_ends_only_its_own_serverapp_on_a_superlink_other_runs_share(tmp_path):
    """Flower's local SuperLink listens on one fixed port: a second run on the machine uses the
    first one's, so its children include other runs' ServerApps. Only the one holding this run's
    ``.lock`` (and what it started) is this run's."""
    from iet_agc.run import _this_runs

    script = tmp_path / "flwr-simulation"  # named as the console script the SuperExec starts
    script.write_text(
        "import fcntl, subprocess, sys, time\n"
        "fh = open(sys.argv[1], 'a+'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
        "subprocess.Popen(['sleep', '30']); print('ready', flush=True); time.sleep(30)\n"
    )
    procs = []
    try:
        for name in ("ours", "theirs"):
            (tmp_path / name).mkdir()
            argv = [sys.executable, str(script), str(tmp_path / name / ".lock")]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
            assert proc.stdout.readline().strip() == b"ready"
            procs.append(proc)
        candidates = [psutil.Process(p.pid) for p in procs]
        found = _this_runs(candidates, str(tmp_path / "ours"))
        assert [p.pid for p in found[:1]] == [procs[0].pid]
        assert [p.cmdline() for p in found[1:]] == [["sleep", "30"]]  # what it started, nothing of theirs
        assert _this_runs(candidates, None) == []  # no folder yet: flwr stop ends the run, nothing is killed
        assert _this_runs(candidates, str(tmp_path / "elsewhere")) == []
    finally:
        for proc in procs:
            end_processes([*process_tree(proc.pid), psutil.Process(proc.pid)], grace=0.5)
            proc.wait()
