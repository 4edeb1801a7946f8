"""``iet-agc run`` wraps ``flwr run . --stream`` so it works as typed in a fresh shell.

Flower 1.41's local SuperLink builds a fresh per-run environment with ``uv`` (gigabytes for
torch) unless FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 is set when it starts. This command
sets it, restarts a local SuperLink started without it (or from another environment), checks
the settings before submitting, streams the logs, and exits non-zero when the run fails (``flwr run`` exits 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import fields
from pathlib import Path

import psutil

from ddpm.base import is_hub_id
from fl_app.checkpoint import FORMAT, CheckpointError, legacy_warning, load_checkpoint
from fl_app.config import settings_from_run_config, toml_value
from fl_app.resume import check_run_folder_free, resumed_settings
from fl_app.settings import Settings

from .inputs import InputError, fail, parse_pairs, parse_run_config
from .ray_cluster import check_federation, superlink_mismatch
from .stopping import Stopped, end_processes, exit_on_signals, process_tree

ENV_FLAG = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
GPUS = "client-resources-num-gpus"


def say(message: str) -> None:
    """A line of the command's own on stderr, beside the run's streamed logs."""
    print(f"[iet-agc] {message}", file=sys.stderr, flush=True)


def _project_defaults(app_dir: Path) -> dict:
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def _absolute_paths(overrides: dict) -> dict:
    """Relative paths (data-root, out-dir, ...) resolved here: the SuperLink may run elsewhere.
    An ``init-from`` Hub id (``owner/name`` that is no folder here) is a name, not a path: kept."""
    paths = {f.name.replace("_", "-") for f in fields(Settings) if f.metadata["rule"].path}

    def local(key: str, value: object) -> bool:
        if key not in paths or not isinstance(value, str) or not value or value.startswith("~"):
            return False
        return not (key == "init-from" and is_hub_id(value))

    return {k: str((Path.cwd() / v).resolve()) if local(k, v) else v for k, v in overrides.items()}


def _stale_superlinks() -> dict[int, str]:
    """Local simulation SuperLinks (Linux /proc) that would run our app wrongly, with the reason.

    Three ways: started without the flag (it builds a per-run environment), started from another
    Python environment (the ServerApp would import that environment's packages, not ours), or with
    another ``RAY_ADDRESS`` (its simulations would join another Ray cluster than this command's).
    """
    ours = str(Path(sys.executable).parent / "flower-superlink").encode()
    stale = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            script = next((part for part in cmd[:2] if part.endswith(b"flower-superlink")), None)
            if script is None or b"--simulation" not in cmd:
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{ENV_FLAG}=1".encode() not in env:
            stale[int(proc.name)] = f"it was started without {ENV_FLAG}=1"
        elif os.path.realpath(script) != os.path.realpath(ours):
            stale[int(proc.name)] = f"it runs from another environment ({script.decode(errors='replace')})"
        elif reason := superlink_mismatch(env):
            stale[int(proc.name)] = reason
    return stale


def _stop(stale: dict[int, str]) -> None:
    for pid, reason in stale.items():
        say(f"stopping local SuperLink {pid}: {reason}")
        os.kill(pid, signal.SIGTERM)
    pids, deadline = list(stale), time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)


def _stopped(
    err: Stopped, args: argparse.Namespace, env: dict, running: dict, earlier: list[int], since: float
) -> list:
    """After SIGINT or SIGTERM: the ServerApp killed at once, ``flwr stop`` on the SuperLink while the rest
    of the tree (Ray, SuperExec, flwr run) ends, the line saying how to continue; returns the SuperLinks
    this command started (``exit_on_signals`` ends them last)."""
    procs = [*err.tree, *_this_runs(_started_since(earlier, since), running["run_dir"])]
    apps = [p for p in procs if _named(p, "flwr-simulation", "flwr-serverapp")]
    links = [p for p in procs if _named(p, "flower-superlink")]
    for p in apps:  # the ServerApp first, at once: it records no round failed by the stop
        with contextlib.suppress(psutil.Error):
            p.kill()
    stopping = None  # the SuperLink, while still up, marks the run stopped (in parallel with the rest)
    if running["run_id"] is not None and (args.superlink or _local_superlinks()):
        stopping = _flwr_stop(running["run_id"], args, env)  # local: never with none up (it would start one)
    end_processes([p for p in procs if p not in links and p not in apps])  # Ray, SuperExec, flwr run
    if stopping is not None:
        try:
            stopping.wait(timeout=20)
        except subprocess.TimeoutExpired:
            stopping.kill()
            say("flwr stop took over 20 s; the SuperLink will mark the run failed when its task expires")
    name = signal.Signals(err.signum).name
    if running["run_dir"]:
        say(f"stopped by {name} (exit {err.code}); to continue: iet-agc run --resume {running['run_dir']}")
    else:
        say(f"stopped by {name} (exit {err.code}) before the run had a folder")
    return links  # ended last, by exit_on_signals, with whatever is left of the tree


def _local_superlinks() -> list[int]:
    """Local simulation SuperLinks running now (Linux /proc; none found elsewhere)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"flower-superlink") for part in cmd[:2]) and b"--simulation" in cmd:
            pids.append(int(proc.name))
    return pids


def _started_since(superlinks: list[int], since: float) -> list[psutil.Process]:
    """What the SuperLinks ``superlinks`` started at ``since`` or later: this run's ServerApp, Ray."""
    found = []
    for pid in superlinks:
        with contextlib.suppress(psutil.Error):
            found += [p for p in psutil.Process(pid).children(recursive=True) if p.create_time() >= since - 1]
    return found


def _this_runs(candidates: list[psutil.Process], run_dir: str | None) -> list[psutil.Process]:
    """Of what a SuperLink that was already running started since the submission, this run's
    ServerApp (the process holding the run folder's ``.lock``) and what it started (Ray): Flower's
    local SuperLink listens on one fixed port, so other runs on this machine share it and their
    ServerApps are its children too. Nothing while the run has no folder yet (``flwr stop`` ends it)."""
    if not run_dir:
        return []
    lock = os.path.realpath(Path(run_dir) / ".lock")
    for proc in candidates:
        if not _named(proc, "flwr-simulation", "flwr-serverapp"):
            continue
        with contextlib.suppress(psutil.Error):
            if any(os.path.realpath(f.path) == lock for f in proc.open_files()):
                return [proc, *process_tree(proc.pid)]
    return []


def _named(proc: psutil.Process, *names: str) -> bool:
    """``proc`` runs one of the console scripts ``names`` (``python .../flwr-simulation ...``)."""
    with contextlib.suppress(psutil.Error):
        return any(Path(part).name in names for part in proc.cmdline()[:2])
    return False


def _flwr_stop(run_id: str, args: argparse.Namespace, env: dict) -> subprocess.Popen | None:
    """``flwr stop RUN_ID`` started on the run's SuperLink: the run ends as stopped, not running."""
    cmd = ["flwr", "stop", run_id, *([args.superlink] if args.superlink else [])]
    try:
        return subprocess.Popen(
            cmd, cwd=Path(args.app).resolve(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError as err:
        say(f"{shlex.join(cmd)}: {err}")
        return None


def _run_status(run_id: str, app_dir: Path, env: dict) -> tuple[str, str]:
    out = subprocess.run(
        ["flwr", "ls", "--run-id", run_id, "--format", "json"], cwd=app_dir, env=env, capture_output=True, text=True
    )
    try:
        run = json.loads(out.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        return "unknown", out.stdout[-500:] + out.stderr[-500:]


def federation_config(args: argparse.Namespace) -> dict:
    """``--federation-config`` pairs (repeatable, later wins) with ``--supernodes`` as ``num-supernodes``
    (default 2) and ``--gpus`` as ``client-resources-num-gpus`` (default: 1 with CUDA, else unset)."""
    federation: dict = {}
    federation.update(parse_pairs(args.federation_config, "--federation-config"))
    for flag, key, value in (("--supernodes", "num-supernodes", args.supernodes), ("--gpus", GPUS, args.gpus)):
        if value is not None and key in federation and federation[key] != value:
            raise InputError(f"--federation-config: {key}={federation[key]} contradicts {flag} {value:g}")
        if value is not None:
            federation[key] = value
    federation.setdefault("num-supernodes", 2)
    if GPUS not in federation and (gpus := _default_gpus()):
        federation[GPUS] = gpus
    nodes = federation["num-supernodes"]
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise InputError(f"--federation-config: num-supernodes: must be an integer >= 1, got {nodes!r}")
    return federation


def prepare_run(args: argparse.Namespace) -> list[str]:
    """The ``flwr run`` command for ``args``, once every setting has been checked (ValueError,
    CheckpointError or OSError otherwise, naming the option or key)."""
    app_dir = Path(args.app).resolve()
    overrides = _absolute_paths(parse_run_config(args.run_config))
    defaults = _project_defaults(app_dir)
    federation = federation_config(args)
    resumed = None
    if args.resume is not None:
        overrides, resumed = _resume_overrides(Path(args.resume), overrides)
    elif "out-dir" not in overrides:  # runs land beside the user, not in the SuperLink's cwd
        overrides["out-dir"] = _absolute_paths({"out-dir": defaults.get("out-dir", "runs")})["out-dir"]
    settings = settings_from_run_config(defaults, overrides)
    nodes = federation["num-supernodes"]
    if settings.min_nodes > nodes:  # the run would wait for nodes forever
        raise ValueError(f"min-nodes: must be <= num-supernodes ({nodes}), got {settings.min_nodes}")
    if (cluster := check_federation(federation, os.environ)) is not None:
        say(
            f"the simulation joins the Ray cluster at {cluster.address} (from {cluster.source}); its ClientApps "
            "run with the environment `ray start` had on each machine"
        )
    if resumed is not None:
        say(f"resuming {args.resume} after round {resumed} of {settings.num_rounds}")
    config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    nodes_config = " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())
    cmd = ["flwr", "run", str(app_dir), *([args.superlink] if args.superlink else []), "--stream"]
    cmd += ["--run-config", config, "--federation-config", nodes_config]
    return cmd + [f"--{k}={v}" for k in ("federation", "format") if (v := getattr(args, k)) is not None]


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cmd = prepare_run(args) + args.flwr_args
    except CheckpointError as err:
        return fail("run", InputError(f"--resume: {err}"))
    except (ValueError, OSError, RuntimeError) as err:
        return fail("run", err)
    env = {**os.environ, ENV_FLAG: "1"}
    if sys.platform.startswith("linux"):
        _stop(_stale_superlinks())
    else:
        say(
            f"note: a local SuperLink started earlier without {ENV_FLAG}=1 keeps building a per-run environment; "
            "stop it once if so (it restarts on the next run)"
        )
    say(shlex.join(cmd))
    running = {"run_id": None, "run_dir": args.resume}
    earlier = _local_superlinks()  # not ours to end; what they start for this run is
    submitted = time.time()

    with exit_on_signals(
        lambda err: _stopped(err, args, env, running, earlier, submitted)
    ):  # SIGINT or SIGTERM: flwr, the SuperLink it started and Ray end too
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if running["run_id"] is None and (m := re.search(r"started run (\d+)|\"run-id\": (\d+)", line)):
                running["run_id"] = m.group(1) or m.group(2)
            elif running["run_dir"] is None and (m := re.search(r"; output (.+?)\s*$", line)):
                running["run_dir"] = m.group(1)
        code = proc.wait()
    run_id = running["run_id"]
    if code or run_id is None:
        return code or 1
    status, details = _run_status(run_id, Path(args.app).resolve(), env)
    if status != "finished:completed":
        print(f"iet-agc run: run {run_id} ended as {status}: {details}", file=sys.stderr, flush=True)
        return 1
    return 0


def _resume_overrides(run_dir: Path, given: dict) -> tuple[dict, int]:
    """The run's own settings from its checkpoint, with the user's changes where a resume allows
    them, and the round it completed."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run folder (no such directory)")
    check_run_folder_free(run_dir)  # a run still writing it is refused first; nothing is written here
    ckpt = load_checkpoint(run_dir)  # every file against its checksum, the run key, the round: before submitting
    if ckpt.format < FORMAT:
        say(f"warning: {legacy_warning(run_dir, ckpt)}")
    merged = resumed_settings(ckpt.settings, given, defaults={})
    merged["resume"] = str(run_dir.resolve())
    return merged, ckpt.server_round


def _default_gpus() -> float:
    """One GPU per running ClientApp when CUDA is visible: Ray hides GPUs from actors asked for none."""
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand (options it does not know pass on to ``flwr run``) to ``iet-agc``."""
    run = sub.add_parser("run", help="run the Flower app in local simulation (flwr run . --stream, done right)")
    run.add_argument("app", nargs="?", default=".", help="app folder holding pyproject.toml (default: .)")
    run.add_argument("superlink", nargs="?", help="as flwr run: a SuperLink connection (default: the local one)")
    run.add_argument("--federation", help="as flwr run: the federation to submit the run to")
    run.add_argument("--format", choices=("default", "json"), help="as flwr run: its output format")
    run.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        help="as flwr run: one TOML file, or 'key=value ...' (repeatable, later wins); not both",
    )
    run.add_argument(
        "--federation-config",
        action="append",
        default=[],
        help="as flwr run: 'key=value ...' (repeatable), e.g. 'num-supernodes=4 client-resources-num-cpus=2'",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its last checkpoint, with its own settings "
        "(--run-config may change only run-length and evaluation keys)",
    )
    run.add_argument(
        "--supernodes", type=int, default=None, help="simulated SuperNodes: num-supernodes in --federation-config (2)"
    )
    run.add_argument(
        "--gpus",
        type=float,
        default=None,
        help="GPUs per running ClientApp in simulation: client-resources-num-gpus in --federation-config "
        "(default: 1 if CUDA is available, else 0; 0.5 = two share one)",
    )
    run.set_defaults(func=cmd_run)  # options it does not know are passed on to flwr run
