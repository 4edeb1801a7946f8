"""Shared test helpers: small settings that keep every test fast on a 2-core CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Threads: OMP_NUM_THREADS when the caller sets it (CI runs the suite with 1 and with 2), else at
# most 2. Results compared bitwise come from the same threads, shapes and code on both sides; Ray
# gives an actor OMP_NUM_THREADS when set, else its num-cpus, so tests that compare a simulation
# with another process pin both (``pinned_threads``).
THREADS = torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else max(1, min(2, torch.get_num_threads()))
torch.set_num_threads(THREADS)

# Two computations of one float32 result through other kernels (another batch shape picks another
# convolution kernel and summation order): a 3-step DDIM sample of a tiny UNet in [0, 1] moved by
# at most 5.5e-6 between batch sizes 1..64, 1 or 2 threads (an AVX-512 CPU, 2026-12-02). Rounding
# of ~1e-6 in the UNet's output is amplified up to 1/sqrt(alpha_bar_666) ~ 9 by DDIM's x0 step, so
# ~1e-5 is the scale; 1e-4 leaves room for other CPUs and stays 100x below what a seed changes.
ACROSS_KERNELS = {"rtol": 0.0, "atol": 1e-4}

TINY_RUN = {
    "train-size": 120,
    "num-shards": 4,
    "num-rounds": 2,
    "local-epochs": 2,
    "batch-size": 16,
    "eval-every": 0,
    "eval-num-images": 60,
    "sample-steps": 4,
    "mq-neighbours": 10,
    "fid": False,
}


@pytest.fixture(autouse=True, scope="session")
def _session_cache_home(tmp_path_factory):
    """Decoded data sets, node state and models go to a folder of this test session, not the
    user's ``~/.cache``: every session starts from what a clean machine has."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))
    yield
    patch.undo()


@pytest.fixture
def tiny_run(tmp_path):
    """Run-config overrides for an in-process simulation that finishes in seconds."""
    return {**TINY_RUN, "out-dir": str(tmp_path / "runs")}


@pytest.fixture
def flower_task():
    """Messages can only be made inside a Flower task: pretend to be one (ServerApp or ClientApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture
def nginx() -> str:
    """The nginx binary the front-door tests run. Where it is missing they are skipped with the
    reason, but in CI (``CI=true``: ``.ci/run`` installs it as root) they fail: never silently."""
    from deploy.frontdoor import nginx_binary

    found = nginx_binary()
    if found is None:
        reason = "no nginx on PATH nor /usr/sbin/nginx: the front door needs a real one (Debian: apt-get install nginx)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    return found


def noise_pngs(path: Path, n: int, seed: int, size: int) -> Path:
    """A folder of ``n`` seeded-noise RGB PNGs of ``size`` x ``size`` (distinct images) named by their id."""
    import numpy as np
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


def superlink_pids(home: Path | None = None) -> list[int]:
    """Local simulation SuperLinks (those serving ``home`` when given; the local one is machine-wide)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in cmd and b"--simulation" in cmd and (home is None or str(home).encode() in cmd):
            pids.append(int(proc.name))
    return pids


def newcomer_env(tmp: Path) -> dict[str, str]:
    """A shell as a newcomer has it: no Flower settings in the environment, an empty FLWR_HOME,
    caches (node state among them) in a folder of the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env["FLWR_HOME"] = str(tmp / "flwr-home")
    env["XDG_CACHE_HOME"] = str(tmp / "cache")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's iet-agc, flwr
    return env


def stop_local_superlinks(home: Path | None = None) -> None:
    """Stop local SuperLinks (all, or those of ``home``): one started from another shell would run
    the test's app with that shell's environment (its cache folder, for one)."""
    pids = superlink_pids(home)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)


@pytest.fixture
def fresh_shell(tmp_path):
    """``newcomer_env`` for one test; the SuperLink it starts ends with the test."""
    stop_local_superlinks()
    yield newcomer_env(tmp_path)
    stop_local_superlinks(tmp_path / "flwr-home")  # services the test started end with it


def iet_agc_run(*args: str, env: dict, cwd: Path = ROOT) -> str:
    """``iet-agc run ARGS`` in a subprocess as a user types it; its whole log, after checking it succeeded."""
    proc = subprocess.run(["iet-agc", "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def background(argv: list[str], env: dict, cwd: Path = ROOT, **popen) -> subprocess.Popen:
    """``argv`` in the background in its own session (a signal to it is the test's, not pytest's);
    stdout and stderr go to a temporary file, read back with ``output``."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen
    )
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    """Everything a ``background`` process has written so far."""
    proc.log.seek(0)
    return proc.log.read()


class Clock:
    """A fake ``time`` for strategies.dispatch: ``sleep`` moves ``monotonic`` on, at once."""

    def __init__(self):
        self.t = 0.0

    def monotonic(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


@pytest.fixture
def clock(monkeypatch):
    """strategies.dispatch on a ``Clock``: deadlines and backoff without waiting."""
    import strategies.dispatch as dispatch_module

    c = Clock()
    monkeypatch.setattr(dispatch_module, "time", c)
    return c
