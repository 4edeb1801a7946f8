"""``iet-agc sweep``: every (cell, seed) of a sweep file missing from ``results.csv``, run in this
process, resumable, summarised over seeds.

Each cell and seed is one run (flwr.simulation in this process, ``fl_app.simulation``); its final
evaluation becomes one row of ``results.csv``, written as soon as the run ends, so an interrupted
sweep continues where it stopped (a finished cell is recognised by its row and the hash of its
settings; a cell stopped mid-run is resumed from its checkpoint). The file and its checks:
``sweep_file``; the tables and plots: ``sweep_report``. A ``results.csv`` that cannot be read (not
CSV, a key column missing, a seed that is no integer) is refused naming it, before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ddpm.files import atomic_write
from fl_app.config import eval_config, settings_from_run_config
from fl_app.run_folder import run_folders
from fl_app.simulation import run_in_process, stop_recording

from .inputs import InputError, fail, parse_pairs, read_table
from .stopping import Stopped, exit_on_signals
from .sweep_file import (
    MAX_SEEDS,
    REFERENCE,
    Sweep,
    config_hash,
    finished_run,
    load_sweep,
    run_row,
    saved_hash,
)
from .sweep_report import METRICS_PLOT, SUMMARY, TRADEOFF, write_outputs

RESULTS = "results.csv"


def run_sweep(
    sweep: Sweep,
    runner: Callable[[Mapping[str, Any]], None] = run_in_process,
    progress: bool = True,
    reference: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """Run every (cell, seed) without a current row in ``results.csv``; write the table, the summary
    and the plots after each run. With [pretrain], the base itself is a row too (``REFERENCE``:
    ``reference``, default ``evaluate_base``, per seed). Returns the results frame."""
    from tqdm import tqdm

    results = read_results(sweep.out / RESULTS)
    sweep.out.mkdir(parents=True, exist_ok=True)
    if sweep.pretrain is not None:
        sweep = run_base(sweep, runner, progress)
        results = reference_rows(sweep, results, reference or evaluate_base, progress)
    todo = []
    for cell in sweep.cells:
        for seed in sweep.seeds:
            key = config_hash(sweep.config(cell, seed))
            mine = (results["cell"] == cell.name) & (results["seed"] == seed)
            for i in results.index[mine & (results["config_hash"] != key)]:
                if _trained_as(results.at[i, "run"], key):  # made before a setting was added
                    results.at[i, "config_hash"] = key
            if not (mine & (results["config_hash"] == key)).any():
                todo.append((cell, seed, key))
    skipped = len(sweep.cells) * len(sweep.seeds) - len(todo)
    bar = tqdm(todo, desc="sweep", unit="run", disable=not progress, file=sys.stderr)
    if skipped and progress:
        bar.write(f"[iet-agc] sweep: {skipped} runs already in {sweep.out / RESULTS}, {len(todo)} to go")
    for cell, seed, key in bar:
        bar.set_postfix_str(f"{cell.name} seed {seed}")
        finished, wall = run_once(sweep.config(cell, seed), runner, f"cell {cell.name!r}, seed {seed}")
        row = {"cell": cell.name, "row": cell.row, "seed": seed, **cell.params, **run_row(finished)}
        row["wall_minutes"] = wall
        row.update(config_hash=key, run=str(finished))
        results = results[~((results["cell"] == cell.name) & (results["seed"] == seed))]
        results = pd.concat([results, pd.DataFrame([row])], ignore_index=True)
        write_results(results, sweep.out / RESULTS)
        write_outputs(sweep, results)
    if not todo:
        write_outputs(sweep, results)
    return results


def _trained_as(run: Any, key: str) -> bool:
    """The row's run folder trained with the settings hashed as ``key``. Its settings.toml is read
    with today's defaults, so a setting added since (at its default, the behaviour before it
    existed) does not make a finished run stale; a changed value does."""
    try:
        return isinstance(run, str) and saved_hash(Path(run)) == key
    except (OSError, ValueError):  # InputError too: a folder gone or unreadable is run again
        return False


def run_once(config: Mapping[str, Any], runner: Callable[[Mapping[str, Any]], None], what: str) -> tuple[Path, float]:
    """The finished run of ``config``: found, resumed from its checkpoint, or run. Returns its folder
    and the minutes spent here (NaN when it had finished before)."""
    key, folder = config_hash(config), Path(config["out-dir"])
    finished = finished_run(config)
    if finished is not None:
        return finished, float("nan")
    _, stopped = run_folders(folder)
    if stopped is not None and saved_hash(stopped) == key:
        config = {**config, "resume": str(stopped)}
    started = time.monotonic()
    runner(config)
    finished = finished_run(config)
    if finished is None:
        raise RuntimeError(f"{what}: the run left no finished run folder in {folder}")
    return finished, (time.monotonic() - started) / 60


def run_base(
    sweep: Sweep, runner: Callable[[Mapping[str, Any]], None] = run_in_process, progress: bool = True
) -> Sweep:
    """The [pretrain] base run, once: skipped when ``<out>/base`` holds it finished with these
    settings. Returns the sweep with ``init_from`` = its ``pipeline/``."""
    config = sweep.base_config()
    if progress and finished_run(config) is None:
        print(f"[iet-agc] sweep: pretraining the base model in {config['out-dir']} first", file=sys.stderr, flush=True)
    finished, _ = run_once(config, runner, "the base run ([pretrain])")
    pipeline = finished / "pipeline"
    if not pipeline.is_dir():
        raise RuntimeError(f"the base run ([pretrain]): {finished} holds no pipeline/ to fine-tune")
    return dataclasses.replace(sweep, init_from=str(pipeline))


def reference_rows(
    sweep: Sweep, results: pd.DataFrame, evaluate: Callable[[Mapping[str, Any]], dict[str, Any]], progress: bool = True
) -> pd.DataFrame:
    """``results`` with a current ``REFERENCE`` row per seed: the base evaluated without fine-tuning,
    what the cells' copying and quality are read against. Evaluated once per seed and base."""
    for seed in sweep.seeds:
        config = sweep.reference_config(seed)
        key = config_hash(config)
        mine = (results["cell"] == REFERENCE) & (results["seed"] == seed)
        if (mine & (results["config_hash"] == key)).any():
            continue
        if progress:
            print(f"[iet-agc] sweep: evaluating the base itself, seed {seed}", file=sys.stderr, flush=True)
        row = {"cell": REFERENCE, "row": "", "seed": seed, **evaluate(config), "config_hash": key}
        row["run"] = config["out-dir"]
        results = pd.concat([results[~mine], pd.DataFrame([row])], ignore_index=True)
        write_results(results, sweep.out / RESULTS)
    return results


def evaluate_base(config: Mapping[str, Any]) -> dict[str, Any]:
    """The final evaluation of a cell, on the base pipeline as it is: its samples against the
    cells' training images (``metrics.json`` and the evaluator's pictures in ``out-dir``)."""
    from ddpm.base import load_base_unet
    from ddpm.data import load_dataset
    from ddpm.device import resolve_device
    from evaluation.evaluator import RUN_FACTS, MemorizationEvaluator, evaluate_saved

    settings = settings_from_run_config(config)
    data = load_dataset(**settings.dataset_kwargs())
    device = resolve_device(settings.device)
    evaluator = MemorizationEvaluator(eval_config(settings), data, Path(settings.out_dir), device)
    summary = evaluate_saved(evaluator, load_base_unet(settings.init_from), f"{settings.init_from}, not fine-tuned")
    return {k: v for k, v in summary.items() if k not in RUN_FACTS and v is not None}


KEY_COLUMNS = ("cell", "seed", "config_hash", "run")


def read_results(path: Path) -> pd.DataFrame:
    """``results.csv``, or an empty frame with its key columns when there is none yet. A table this
    sweep cannot use (not UTF-8 or CSV, a key column missing, a cell without a name, a seed that is
    no integer) is an InputError naming it: moved aside, its finished runs are found again in their
    folders."""
    if not (path.exists() or path.is_symlink()):
        empty = {"cell": str, "seed": int, "config_hash": str, "run": str}
        return pd.DataFrame({k: pd.Series(dtype=t) for k, t in empty.items()})
    hint = "; move it aside to rebuild it from the finished run folders"
    try:
        frame = read_table(path, columns=KEY_COLUMNS, dtype={"cell": str, "row": str, "config_hash": str, "seed": str})
    except InputError as err:
        raise InputError(f"{err}{hint}") from None
    seeds = pd.to_numeric(frame["seed"], errors="coerce")
    bad = frame.index[seeds.isna() | (seeds % 1 != 0) | (seeds < 0) | frame["cell"].isna()]
    if len(bad):
        i = bad[0]
        seed = frame.at[i, "seed"]
        what = f"seed {'empty' if pd.isna(seed) else repr(seed)}"
        what = "a row without a cell name" if pd.isna(frame.at[i, "cell"]) else what
        raise InputError(f"{path}: line {i + 2}: {what}, not a results row{hint}")
    return frame.assign(seed=seeds.astype(int))


def write_results(frame: pd.DataFrame, path: Path) -> None:
    """Written to a temporary file and renamed: an interruption leaves the old table or the new one."""
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


# ---- the command ------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    """``iet-agc sweep``: check the whole sweep, then run what is missing."""
    try:
        sweep = load_sweep(
            args.file,
            seeds=_seeds(args.seeds),
            only=_cells(args.cells),
            extra=parse_pairs(args.set, "--set"),
            out=args.out,
        )
        read_results(sweep.out / RESULTS)  # an unusable table is refused before anything runs
    except InputError as err:  # SweepError too
        return fail("sweep", err)
    print(
        f"[iet-agc] sweep {sweep.path}: {len(sweep.cells)} cells x {len(sweep.seeds)} seeds -> {sweep.out}",
        flush=True,
    )
    started = time.monotonic()

    def stopped(err: Stopped) -> None:
        print(
            f"\n[iet-agc] sweep stopped by {signal.Signals(err.signum).name} (exit {err.code}); "
            f"run the same command to continue ({sweep.out / RESULTS})",
            flush=True,
        )
        stop_recording()  # the run's checkpoint (its last whole round) and results.csv stay as they are

    with exit_on_signals(stopped):  # SIGINT or SIGTERM: Ray's processes end too, exit 130 or 143
        run_sweep(sweep)
    print(
        f"[iet-agc] sweep done in {(time.monotonic() - started) / 60:.1f} min: {sweep.out / SUMMARY}, "
        f"{sweep.out / TRADEOFF}, {sweep.out / METRICS_PLOT}",
        flush=True,
    )
    return 0


def _seeds(text: str) -> list[int] | None:
    """``--seeds``: comma-separated integers (the file's seeds without it)."""
    if text.count(",") >= MAX_SEEDS:
        raise InputError(f"--seeds: {text.count(',') + 1} seeds; a sweep has at most {MAX_SEEDS} (MAX_SEEDS)")
    try:
        return [int(s) for s in text.split(",")] if text else None
    except ValueError:
        raise InputError(f"--seeds: expected comma-separated integers, got {text[:80]!r}") from None


def _cells(text: str) -> list[str] | None:
    return [c.strip() for c in text.split(",")] if text else None


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand to ``iet-agc``."""
    sw = sub.add_parser("sweep", help="run a grid of runs over seeds (resumable); mean ± sd tables and plots")
    sw.add_argument("file", help="sweep file (TOML), e.g. configs/sweeps/table3.toml")
    sw.add_argument("--seeds", default="", help="comma-separated seeds (default: the file's)")
    sw.add_argument("--cells", default="", help="comma-separated cell names to run (default: all)")
    sw.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run-config values for every cell (repeatable)"
    )
    sw.add_argument("--out", default=None, help="output folder (default: the file's out, or runs/sweeps/<name>)")
    sw.set_defaults(func=cmd_sweep)
