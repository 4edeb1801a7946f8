"""``iet-agc``: ``run`` wraps ``flwr run . --stream`` so it works as typed in a fresh shell.

Flower 1.41's local SuperLink builds a fresh per-run environment with ``uv`` (gigabytes for
torch) unless FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 is set when it starts. This tool
sets it, restarts a local SuperLink started without it (or from another environment), checks the settings before
submitting, streams the logs, and exits non-zero when the run fails (``flwr run`` exits 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from evaluation.cli import register as register_evaluation
from strategies.checkpoint import CheckpointError, load_checkpoint

from .config import settings_from_run_config
from .resume import resumed_settings, run_folder_lock
from .sweep import register as register_sweep

ENV_FLAG = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


def _project_defaults(app_dir: Path) -> dict:
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def _parse_overrides(run_config: list[str]) -> dict:
    """``--run-config`` values as flwr reads them: a TOML file path or ``key=value`` pairs.

    Each pair is parsed on its own, so a syntax error names its key; a file's names the file and line.
    """
    merged: dict = {}
    for item in run_config:
        path = Path(item)
        if path.suffix == ".toml" and "=" not in item:
            if not path.is_file():
                raise ValueError(f"--run-config: file {item} does not exist")
            try:
                text = path.read_bytes().decode()
                merged.update(tomllib.loads(text))
            except UnicodeDecodeError as err:
                raise ValueError(f"--run-config: {item}: not UTF-8 text ({err})") from None
            except tomllib.TOMLDecodeError as err:
                line = re.search(r"at line (\d+)", str(err))
                where = ""
                if line and 0 < int(line.group(1)) <= len(text.splitlines()):
                    key = text.splitlines()[int(line.group(1)) - 1].partition("=")[0].strip()
                    where = f"line {line.group(1)}" + (f" ({key})" if key else "") + ": "
                raise ValueError(f"--run-config: {item}: {where}invalid TOML ({err})") from None
            continue
        pairs: dict = {}
        for pair in _split_pairs(item):
            key, sep, value = pair.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise ValueError(f"--run-config: expected key=value, got {pair!r}")
            try:
                parsed = tomllib.loads(f"{key} = {value}")
            except tomllib.TOMLDecodeError as err:
                reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))  # our one-line document
                raise ValueError(f"--run-config: {key}: invalid TOML value {value!r} ({reason})") from None
            for name, parsed_value in parsed.items():  # one entry (a dotted key makes a table)
                if name in pairs:
                    raise ValueError(f"--run-config: {name}: given twice in {item!r}")
                pairs[name] = parsed_value
        merged.update(pairs)
    return merged


def _split_pairs(text: str) -> list[str]:
    """``'a=1 b="x y"'`` -> ``['a=1', 'b="x y"']``: split before each ``key=`` that follows whitespace."""
    return [p.strip() for p in re.split(r"\s+(?=[\w.-]+\s*=)", text.strip()) if p.strip()]


def _stale_superlinks() -> dict[int, str]:
    """Local simulation SuperLinks (Linux /proc) that would run our app wrongly, with the reason.

    Two ways: started without the flag (it builds a per-run environment), or started from another
    Python environment (the ServerApp would import that environment's packages, not ours).
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
    return stale


def _stop(stale: dict[int, str]) -> None:
    for pid, reason in stale.items():
        print(f"[iet-agc] stopping local SuperLink {pid}: {reason}", flush=True)
        os.kill(pid, signal.SIGTERM)
    pids, deadline = list(stale), time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)


def _run_status(run_id: str, app_dir: Path, env: dict) -> tuple[str, str]:
    out = subprocess.run(
        ["flwr", "ls", "--run-id", run_id, "--format", "json"], cwd=app_dir, env=env, capture_output=True, text=True
    )
    try:
        run = json.loads(out.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        return "unknown", out.stdout[-500:] + out.stderr[-500:]


def cmd_run(args: argparse.Namespace) -> int:
    app_dir = Path(args.app).resolve()
    try:
        overrides = _parse_overrides(args.run_config)
        defaults = _project_defaults(app_dir)
        if args.resume is not None:
            overrides = _resume_overrides(Path(args.resume), overrides)
        elif "out-dir" not in overrides:  # runs land beside the user, not in the SuperLink's cwd
            overrides["out-dir"] = str((Path.cwd() / defaults.get("out-dir", "runs")).resolve())
        settings = settings_from_run_config(defaults, overrides)
        if settings.min_nodes > args.supernodes:  # the run would wait for nodes forever
            raise ValueError(f"min-nodes: must be <= --supernodes ({args.supernodes}), got {settings.min_nodes}")
        if args.supernodes < 1:
            raise ValueError(f"--supernodes: must be >= 1, got {args.supernodes}")
    except CheckpointError as err:
        print(f"iet-agc run: --resume: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, tomllib.TOMLDecodeError) as err:
        print(f"iet-agc run: invalid settings: {err}", file=sys.stderr)
        return 2
    env = {**os.environ, ENV_FLAG: "1"}
    if sys.platform.startswith("linux"):
        _stop(_stale_superlinks())
    else:
        print(
            f"[iet-agc] note: a local SuperLink started earlier without {ENV_FLAG}=1 keeps building a "
            "per-run environment; stop it once if so (it restarts on the next run)",
            flush=True,
        )
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else _toml(v)}" for k, v in overrides.items())
    cmd = ["flwr", "run", str(app_dir), "--stream", "--run-config", config]
    gpus = args.gpus if args.gpus is not None else _default_gpus()
    federation = f"num-supernodes={args.supernodes}" + (f" client-resources-num-gpus={gpus}" if gpus else "")
    cmd += ["--federation-config", federation, *args.flwr_args]
    print("[iet-agc] " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id = None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if run_id is None and (m := re.search(r"started run (\d+)", line)):
            run_id = m.group(1)
    code = proc.wait()
    if code or run_id is None:
        return code or 1
    status, details = _run_status(run_id, app_dir, env)
    if status != "finished:completed":
        print(f"iet-agc run: run {run_id} ended as {status}: {details}", file=sys.stderr)
        return 1
    return 0


def _resume_overrides(run_dir: Path, given: dict) -> dict:
    """The run's own settings from its checkpoint, with the user's changes where a resume allows them."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run folder (no such directory)")
    ckpt = load_checkpoint(run_dir)
    with run_folder_lock(run_dir):  # refused here, before submitting, if a run still writes it
        pass
    merged = resumed_settings(ckpt.settings, given, defaults={})
    merged["resume"] = str(run_dir.resolve())
    print(f"[iet-agc] resuming {run_dir} after round {ckpt.server_round} of {merged['num-rounds']}", flush=True)
    return merged


def _default_gpus() -> float:
    """One GPU per running ClientApp when CUDA is visible: Ray hides GPUs from actors asked for none."""
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iet-agc", description="IET-AGC+ on Flower: run and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the Flower app in local simulation (flwr run . --stream, done right)")
    run.add_argument("app", nargs="?", default=".", help="app folder holding pyproject.toml (default: .)")
    run.add_argument(
        "--run-config", action="append", default=[], help="a preset TOML file or 'key=value ...' (repeatable)"
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its last checkpoint, with its own settings "
        "(--run-config may change only run-length and evaluation keys)",
    )
    run.add_argument("--supernodes", type=int, default=2, help="simulated SuperNodes (default 2)")
    run.add_argument(
        "--gpus",
        type=float,
        default=None,
        help="GPUs per running ClientApp in simulation (default: 1 if CUDA is available, else 0; 0.5 = two share one)",
    )
    run.set_defaults(func=cmd_run)  # options it does not know are passed on to flwr run
    register_evaluation(sub)
    register_sweep(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.flwr_args = unknown  # `iet-agc run` passes options of flwr run's own through, in any position
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
