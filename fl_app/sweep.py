"""``iet-agc sweep``: a grid of runs over seeds, in-process, resumable, summarised over seeds.

A sweep file (TOML) names a base preset, the run-config values every cell shares (``[set]``),
named rows (``[rows.NAME]``), a cross product (``[grid]``) and/or one-at-a-time variations around
the base (``[vary]``), and the ``seeds``. With ``[pretrain]`` the sweep first trains a base model
once (``<out>/base/``, skipped when done) and fine-tunes it in every cell (its ``pipeline/`` is each
cell's ``init-from``); the base trains on the spare digits of the same split. Each cell and seed
is one run (flwr.simulation in this process); its final evaluation becomes one row of
``results.csv``, written as soon as the run ends, so an interrupted sweep continues where it
stopped (a finished cell is recognised by its row and the hash of its settings; a cell stopped
mid-run is resumed from its checkpoint).
``summary.md`` holds mean ± sd over seeds, ``tradeoff.png`` copy_5 against the quality figure,
``metrics.png`` each metric against the swept value.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ddpm.files import atomic_write
from ddpm.settings import Settings
from strategies.checkpoint import CheckpointError, load_checkpoint
from strategies.replies import record_bytes

from .config import settings_from_run_config

SECTIONS = ("base", "seeds", "quality", "out", "set", "pretrain", "rows", "grid", "vary")
RESERVED = ("seed", "out-dir", "resume")  # the sweep sets these itself
QUALITY = ("digit_fd", "fid")
RESULTS, SUMMARY, TRADEOFF, METRICS_PLOT = "results.csv", "summary.md", "tradeoff.png", "metrics.png"
RUN_COLUMNS = ("skip_rate", "aug_rate", "moved", "round_MB", "minutes")  # per-run figures beside the evaluation
BASE_FOLDER = "base"  # <out>/base/: the run [pretrain] makes before the cells
REFERENCE = "base (not fine-tuned)"  # the results row of the base itself, evaluated as a cell is
# what makes the split and the base's shape: the base and every cell must agree on them
SPLIT_KEYS = ("dataset", "image-size", "train-size", "holdout-size", "data-seed", "class-conditional")
PLOTTED = ("copy_1", "copy_5", "mq_0.5")  # plus the quality figure


class SweepError(ValueError):
    """A sweep file the runner refuses; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: its name, the run-config values it sets beyond the base, and the
    values of the swept keys (the x axes of the plots)."""

    name: str
    changes: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    row: str = ""  # the named row it belongs to ("" without named rows)


@dataclass(frozen=True)
class Sweep:
    """A checked sweep file: base run config, cells, seeds, the quality figure and the output folder."""

    path: Path
    base: dict[str, Any]
    shared: dict[str, Any]  # [set] and --set: in every cell's changes
    cells: list[Cell]
    seeds: list[int]
    quality: str
    out: Path
    swept: list[str]  # grid and vary keys, in file order
    pretrain: dict[str, Any] | None = None  # [pretrain]: the base run's values over base and [set]
    init_from: str = ""  # the finished base run's pipeline folder, once there is one
    extra: dict[str, Any] = field(default_factory=dict)  # --set: over [pretrain] too

    def config(self, cell: Cell, seed: int) -> dict[str, Any]:
        """The run config of one run: base < cell < seed and its own output folder (and the base)."""
        config = {**self.base, **cell.changes, "seed": seed, "out-dir": str(self.run_folder(cell, seed))}
        if self.pretrain is not None:
            config["init-from"] = self.init_from or pending_base(self.out)
        return config

    def base_config(self) -> dict[str, Any]:
        """The base run's config: base < [set] < [pretrain] (its ``seed``, default 0) < --set, in ``<out>/base``."""
        values = {**self.base, **self.shared, "seed": 0, **(self.pretrain or {}), **self.extra}
        return {**values, "out-dir": str(self.out / BASE_FOLDER)}

    def reference_config(self, seed: int) -> dict[str, Any]:
        """The base's reference evaluation: the cells' shared settings (their split, hold-out and
        evaluation), the finished base's pipeline as it is (no adapter), this seed."""
        folder = self.out / "reference" / f"seed{seed}"
        return {
            **self.base,
            **self.shared,
            "seed": seed,
            "init-from": self.init_from,
            "adapter": "none",
            "out-dir": str(folder),
        }

    def run_folder(self, cell: Cell, seed: int) -> Path:
        return self.out / "cells" / slug(cell.name) / f"seed{seed}"


def pending_base(out: Path) -> str:
    """A cell's ``init-from`` until the base run has finished (checked, never loaded)."""
    return str(out / BASE_FOLDER / "pipeline")


def slug(name: str) -> str:
    """A folder name for a cell: ``agc+iet`` -> ``agcpiet``, other unsafe characters -> ``_``."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name.replace("+", "p")) or "_"


def config_hash(config: Mapping[str, Any]) -> str:
    """Names what a run trains with: every resolved setting but where it writes (``out-dir``,
    ``resume``). A finished row counts only while its cell's settings are unchanged."""
    values = {k: v for k, v in config.items() if k not in ("out-dir", "resume")}
    resolved = Settings.from_run_config(values).to_run_config()
    kept = {k: v for k, v in sorted(resolved.items()) if k not in ("out-dir", "resume")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- reading and checking a sweep file ------------------------------------------------------
def expand_cells(
    rows: Mapping[str, Mapping[str, Any]],
    grid: Mapping[str, Sequence[Any]],
    vary: Mapping[str, Sequence[Any]],
    same: Callable[[dict[str, Any]], Any] | None = None,
) -> list[Cell]:
    """The cells of a sweep, in file order, without duplicates.

    Named rows (or one unnamed ``base`` row) times every point of the grid's cross product, then
    each ``vary`` value alone on the base. A cell whose ``same(changes)`` (default: the changes
    themselves; the sweep passes the hash of the resolved settings) equals an earlier cell's is
    dropped, so one-at-a-time variations share their base point.
    """
    named = list(rows.items()) or [("base", {})]
    keys = list(grid)
    cells: list[Cell] = []
    for (row, changes), point in itertools.product(named, itertools.product(*(grid[k] for k in keys))):
        values = dict(zip(keys, point, strict=True))
        label = ",".join(f"{k}={_show(v)}" for k, v in values.items())
        name = f"{row} {label}" if rows and label else (label or row)
        cells.append(Cell(name, {**changes, **values}, values, row if rows else ""))
    for key, values in vary.items():
        for value in values:
            cells.append(Cell(f"{key}={_show(value)}", {key: value}, {key: value}))
    same = same or (lambda changes: json.dumps(changes, sort_keys=True, default=str))
    unique: dict[Any, Cell] = {}
    for cell in cells:
        unique.setdefault(same(cell.changes), cell)
    return list(unique.values())


def _show(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def load_sweep(
    path: Path | str,
    *,
    seeds: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    out: Path | str | None = None,
) -> Sweep:
    """Read and check a sweep file; ``seeds``, ``only`` (cell names), ``extra`` (run-config values
    for every cell) and ``out`` override the file. Every cell's settings are checked here, before
    anything runs; a problem raises SweepError naming the file and the key."""
    path = Path(path)
    where = str(path)
    doc = _read_sweep_file(path)
    base = _base(doc.get("base", "default"), path)
    shared = {**_table(doc, "set", where), **dict(extra or {})}
    pretrain = _table(doc, "pretrain", where) if "pretrain" in doc else None
    out_dir = Path(out) if out is not None else Path(doc.get("out", f"runs/sweeps/{path.stem}"))
    # with a base run the sweep sets every cell's init-from; until the base exists, a stand-in
    fill = {"init-from": pending_base(out_dir)} if pretrain is not None else {}
    rows = _table(doc, "rows", where)
    for name, changes in rows.items():
        if not isinstance(changes, dict):
            raise SweepError(f"{where}: rows.{name}: must be a table of run-config values, got {changes!r}")
    grid, vary = _lists(doc, "grid", where), _lists(doc, "vary", where)
    if set(grid) & set(vary):
        raise SweepError(f"{where}: {sorted(set(grid) & set(vary))[0]}: in both [grid] and [vary]; pick one")
    seed_list = _seed_list(list(seeds) if seeds is not None else doc.get("seeds", [0]), where)
    if pretrain is not None:
        _check_pretrain_places(where, base, shared, pretrain, rows, grid, vary, extra or {})
    _check(where, "set", {**base, **shared, **fill})
    for name, changes in rows.items():
        _check(where, f"rows.{name}", {**base, **shared, **fill, **changes})
    for section, table in (("grid", grid), ("vary", vary)):
        for key, values in table.items():
            for value in values:
                _check(where, f"{section}.{key}", {**base, **shared, **fill, key: value})
    expanded = expand_cells(rows, grid, vary, lambda changes: config_hash({**base, **shared, **fill, **changes}))
    cells = _selected([Cell(c.name, {**shared, **fill, **c.changes}, c.params, c.row) for c in expanded], only, where)
    quality = doc.get("quality", "digit_fd" if {**base, **shared}.get("dataset", "digits") == "digits" else "fid")
    if quality not in QUALITY:
        raise SweepError(f"{where}: quality: must be one of {', '.join(QUALITY)}, got {quality!r}")
    sweep = Sweep(
        path, base, shared, cells, seed_list, quality, out_dir, [*grid, *vary], pretrain, "", dict(extra or {})
    )
    if pretrain is not None:
        sweep = _check_pretrain(sweep)
    _check_every_run(sweep, where)
    return sweep


def _read_sweep_file(path: Path) -> dict[str, Any]:
    """The sweep file's TOML, with only the known sections; a SweepError names the file."""
    where = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as err:
        raise SweepError(f"{where}: cannot read the sweep file ({err.strerror or err})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SweepError(f"{where}: invalid TOML ({err})") from None
    unknown = [k for k in doc if k not in SECTIONS]
    if unknown:
        raise SweepError(f"{where}: {unknown[0]}: unknown key; a sweep file has {', '.join(SECTIONS)}")
    return doc


def _seed_list(seed_list: object, where: str) -> list[int]:
    """The sweep's seeds: a non-empty list of distinct integers >= 0."""
    if (
        not isinstance(seed_list, list)
        or not seed_list
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seed_list)
    ):
        raise SweepError(f"{where}: seeds: must be a non-empty list of integers >= 0, got {seed_list!r}")
    if len(set(seed_list)) != len(seed_list):
        raise SweepError(f"{where}: seeds: must not repeat a seed, got {seed_list!r}")
    return seed_list


def _check_pretrain_places(
    where: str,
    base: Mapping[str, Any],
    shared: Mapping[str, Any],
    pretrain: Mapping[str, Any],
    rows: Mapping[str, Mapping[str, Any]],
    grid: Mapping[str, list],
    vary: Mapping[str, list],
    extra: Mapping[str, Any],
) -> None:
    """With [pretrain], no section sets init-from (the sweep does), and the base run's settings are
    valid; each section's values are checked where they are written, so an error names that place."""
    places = {"set": shared, "pretrain": pretrain, "grid": grid, "vary": vary}
    places.update({f"rows.{name}": changes for name, changes in rows.items()})
    for place, values in places.items():
        if "init-from" in values:
            raise SweepError(f"{where}: {place}: init-from: set by the sweep itself (the [pretrain] base run)")
    _check(where, "pretrain", {**base, **shared, **{k: v for k, v in pretrain.items() if k != "seed"}, **extra})


def _selected(cells: list[Cell], only: Sequence[str] | None, where: str) -> list[Cell]:
    """The cells ``--cells`` names (all without it), each with a folder name of its own."""
    if only:
        missing = [n for n in only if n not in {c.name for c in cells}]
        if missing:
            raise SweepError(f"{where}: --cells: no cell {missing[0]!r}; cells: {', '.join(c.name for c in cells)}")
        cells = [c for c in cells if c.name in only]
    if len({slug(c.name) for c in cells}) != len(cells):
        raise SweepError(f"{where}: rows: two cells share the folder name; rename one")
    return cells


def _check_every_run(sweep: Sweep, where: str) -> None:
    """Every (cell, seed) run's settings, with the checks against this machine (out-dir writable, ...)."""
    for cell in sweep.cells:
        for seed in sweep.seeds:
            config = sweep.config(cell, seed)
            if sweep.pretrain is not None and not sweep.init_from:  # no base to compare with yet
                config = {**config, "init-from": "", "adapter": "none"}
            try:
                settings_from_run_config(config)
            except ValueError as err:
                raise SweepError(f"{where}: cell {cell.name!r}, seed {seed}: {err}") from None


def _check_pretrain(sweep: Sweep) -> Sweep:
    """The base run's settings, and one split for the base and every cell: the base trains on the
    spare digits only, so it never sees a cell's training or held-out digits. Returns the sweep with
    ``init_from`` set when the base run has already finished."""
    where = str(sweep.path)
    try:
        base = settings_from_run_config(sweep.base_config()).to_run_config()
    except ValueError as err:
        raise SweepError(f"{where}: pretrain: {err}") from None
    if base["data-seed"] < 0:
        raise SweepError(
            f"{where}: set: data-seed: must be fixed (>= 0) with [pretrain], so that the base run and every "
            f"seed of every cell share one split of the digits, got {base['data-seed']}"
        )
    if base["data-split"] != "spare":
        raise SweepError(
            f'{where}: pretrain: data-split: must be "spare" (the base may not train on the cells\' training '
            f"digits), got {base['data-split']!r}"
        )
    for cell in sweep.cells:
        resolved = Settings.from_run_config(sweep.config(cell, sweep.seeds[0])).to_run_config()
        for key in SPLIT_KEYS:
            if resolved[key] != base[key]:
                raise SweepError(
                    f"{where}: cell {cell.name!r}: {key}: must equal the base run's ({base[key]!r}) so that they "
                    f"share one split, got {resolved[key]!r}"
                )
        if resolved["data-split"] != "train":
            raise SweepError(
                f'{where}: cell {cell.name!r}: data-split: must be "train" (fine-tuning on the training digits)'
            )
    finished = _finished(sweep.base_config())
    return dataclasses.replace(sweep, init_from=str(finished / "pipeline")) if finished else sweep


def _base(spec: Any, sweep_path: Path) -> dict[str, Any]:
    """The base preset: ``default`` (the embedded default) or a preset file, relative to the sweep file."""
    if not isinstance(spec, str) or not spec:
        raise SweepError(f"{sweep_path}: base: must be 'default' or a preset file, got {spec!r}")
    if spec == "default":
        return {}
    preset = (sweep_path.parent / spec).expanduser()
    try:
        values = tomllib.loads(preset.read_text())
    except OSError as err:
        raise SweepError(f"{sweep_path}: base: cannot read preset {preset} ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise SweepError(f"{sweep_path}: base: preset {preset} is not valid TOML ({err})") from None
    reserved = [k for k in values if k in RESERVED]
    for key in reserved:
        values.pop(key)
    _check(str(sweep_path), f"base ({preset})", values)
    return values


def _table(doc: Mapping[str, Any], section: str, where: str) -> dict[str, Any]:
    table = doc.get(section, {})
    if not isinstance(table, dict):
        raise SweepError(f"{where}: {section}: must be a table, got {table!r}")
    return table


def _lists(doc: Mapping[str, Any], section: str, where: str) -> dict[str, list[Any]]:
    table = _table(doc, section, where)
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: {section}.{key}: must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise SweepError(f"{where}: {section}.{key}: must not repeat a value, got {values!r}")
    return table


def _check(where: str, place: str, values: Mapping[str, Any]) -> None:
    """The settings' own pure checks (unknown keys, types, ranges), with the place in the file."""
    for key in RESERVED:
        if key in values and not place.startswith("base"):
            raise SweepError(f"{where}: {place}: {key}: set by the sweep itself (use seeds and --out)")
    try:
        Settings.from_run_config(values)
    except ValueError as err:
        raise SweepError(f"{where}: {place}: {err}") from None


# ---- one run ----------------------------------------------------------------------------
def run_cell(config: Mapping[str, Any]) -> None:
    """One run in this process: flwr.simulation with the app's ServerApp and ClientApp, two nodes."""
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import make_server_app

    run_simulation(
        server_app=make_server_app(dict(config)),
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )


def run_folders(folder: Path) -> tuple[Path | None, Path | None]:
    """(the finished run, the stopped run with a checkpoint) among the run folders under ``folder``."""
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    finished = [p for p in runs if (p / "report.md").is_file() and (p / "rounds.csv").is_file()]
    stopped = [p for p in runs if (p / "checkpoint").is_dir() and p not in finished]
    return (finished[-1] if finished else None), (stopped[-1] if stopped else None)


def run_result(run_dir: Path) -> dict[str, Any]:
    """The row of a finished run: the last round's evaluation and the run's mean skip/aug rates."""
    rounds = pd.read_csv(run_dir / "rounds.csv")
    last = rounds.iloc[-1]
    row = {k: last[k] for k in rounds.columns if k.startswith(("mq_", "copy_", "fid", "digit_fd"))}
    row["skip_rate"] = rounds["skip_rate"].mean()
    row["aug_rate"] = rounds["aug_rate"].mean()
    row["moved"] = rounds["moved"].mean()
    row["minutes"] = rounds["seconds"].sum() / 60
    row.update(traffic(run_dir))
    return row


def traffic(run_dir: Path) -> dict[str, int]:
    """``reply_bytes``: the weights record one message carries (the final checkpoint's weights are
    exactly what travels: all of them, or an adapter's); ``round_bytes``: a round's K records out
    and K back (the skip counts and metrics add a few KB). Empty without a checkpoint."""
    try:
        ckpt = load_checkpoint(run_dir)
    except CheckpointError:
        return {}
    reply = record_bytes(ckpt.weights)
    return {"reply_bytes": reply, "round_bytes": 2 * int(ckpt.settings["num-shards"]) * reply}


# ---- the sweep --------------------------------------------------------------------------
def run_sweep(
    sweep: Sweep,
    runner: Callable[[Mapping[str, Any]], None] = run_cell,
    progress: bool = True,
    reference: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """Run every (cell, seed) without a current row in ``results.csv``; write the table, the summary
    and the plots after each run. With [pretrain], the base itself is a row too (``REFERENCE``:
    ``reference``, default ``evaluate_base``, per seed). Returns the results frame."""
    from tqdm import tqdm

    sweep.out.mkdir(parents=True, exist_ok=True)
    results = read_results(sweep.out / RESULTS)
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
        row = {"cell": cell.name, "row": cell.row, "seed": seed, **cell.params, **run_result(finished)}
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
        return isinstance(run, str) and config_hash(_settings_of(Path(run))) == key
    except (OSError, ValueError, tomllib.TOMLDecodeError):
        return False


def _finished(config: Mapping[str, Any]) -> Path | None:
    """The run folder under ``config``'s out-dir that finished with these settings, or None."""
    finished, _ = run_folders(Path(config["out-dir"]))
    return finished if finished is not None and config_hash(_settings_of(finished)) == config_hash(config) else None


def run_once(config: Mapping[str, Any], runner: Callable[[Mapping[str, Any]], None], what: str) -> tuple[Path, float]:
    """The finished run of ``config``: found, resumed from its checkpoint, or run. Returns its folder
    and the minutes spent here (NaN when it had finished before)."""
    key, folder = config_hash(config), Path(config["out-dir"])
    finished = _finished(config)
    if finished is not None:
        return finished, float("nan")
    _, stopped = run_folders(folder)
    if stopped is not None and config_hash(_settings_of(stopped)) == key:
        config = {**config, "resume": str(stopped)}
    started = time.monotonic()
    runner(config)
    finished = _finished(config)
    if finished is None:
        raise RuntimeError(f"{what}: the run left no finished run folder in {folder}")
    return finished, (time.monotonic() - started) / 60


def run_base(sweep: Sweep, runner: Callable[[Mapping[str, Any]], None] = run_cell, progress: bool = True) -> Sweep:
    """The [pretrain] base run, once: skipped when ``<out>/base`` holds it finished with these
    settings. Returns the sweep with ``init_from`` = its ``pipeline/``."""
    config = sweep.base_config()
    if progress and _finished(config) is None:
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
    evaluator = MemorizationEvaluator(settings, data, Path(settings.out_dir), resolve_device(settings.device))
    summary = evaluate_saved(evaluator, load_base_unet(settings.init_from), f"{settings.init_from}, not fine-tuned")
    return {k: v for k, v in summary.items() if k not in RUN_FACTS and v is not None}


def _settings_of(run_dir: Path) -> dict[str, Any]:
    """The run config a run folder was made with (its settings.toml), as the sweep wrote it."""
    saved = tomllib.loads((run_dir / "settings.toml").read_text())
    return {k: v for k, v in saved.items() if k not in ("out-dir", "resume")}


def read_results(path: Path) -> pd.DataFrame:
    """``results.csv``, or an empty frame with its key columns."""
    if path.is_file():
        return pd.read_csv(path, dtype={"cell": str, "row": str, "config_hash": str})
    empty = {"cell": str, "seed": int, "config_hash": str, "run": str}
    return pd.DataFrame({k: pd.Series(dtype=t) for k, t in empty.items()})


def write_results(frame: pd.DataFrame, path: Path) -> None:
    """Written to a temporary file and renamed: an interruption leaves the old table or the new one."""
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


# ---- summaries ---------------------------------------------------------------------------
def summarize(results: pd.DataFrame, metrics: Iterable[str], order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per cell: ``n`` (seeds), and ``<metric>_mean`` / ``<metric>_sd`` (sample sd, ddof 1; NaN for
    one seed) for each metric present; cells in ``order`` (default: first appearance)."""
    present = [m for m in metrics if m in results]
    groups = results.groupby("cell", sort=False)
    summary = pd.DataFrame({"n": groups.size()})
    for m in present:
        values = groups[m]
        summary[f"{m}_mean"] = values.mean()
        summary[f"{m}_sd"] = values.std(ddof=1)
    if order is not None:
        summary = summary.reindex([c for c in order if c in summary.index])
    return summary


def markdown_table(summary: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> str:
    """``mean ± sd`` per metric and cell (just the mean for one seed; ``n/a`` where missing)."""

    def sig(x: float, n: int) -> str:  # n significant digits, never in exponent form below 1e6
        return f"{float(f'{x:.{n}g}'):g}"

    def cell(mean: float, sd: float) -> str:
        if mean != mean:
            return "n/a"
        return sig(mean, digits) if sd != sd else f"{sig(mean, digits)} ± {sig(sd, 2)}"

    present = [m for m in metrics if f"{m}_mean" in summary]
    table = pd.DataFrame(
        {m: [cell(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_sd"], strict=True)] for m in present},
        index=summary.index,
    )
    table.insert(0, "seeds", summary["n"].astype(int))
    return table.reset_index(names="cell").to_markdown(index=False)


def metric_columns(results: pd.DataFrame, quality: str) -> list[str]:
    """The summarised columns: memorization, quality with its interval width and floor, run figures."""
    if f"{quality}_hi" in results and f"{quality}_lo" in results:
        results[f"{quality}_width"] = results[f"{quality}_hi"] - results[f"{quality}_lo"]
    if "round_bytes" in results:
        results["round_MB"] = results["round_bytes"] / 1e6
    mq = [c for c in results if c.startswith("mq_")]
    ordered = ["copy_1", "copy_5", *mq, quality, f"{quality}_width", f"{quality}_floor", *RUN_COLUMNS]
    return [c for c in ordered if c in results]


def write_outputs(sweep: Sweep, results: pd.DataFrame) -> None:
    """``summary.md``, ``tradeoff.png`` and ``metrics.png`` from the results so far."""
    if results.empty:
        return
    results = results.copy()
    metrics = metric_columns(results, sweep.quality)
    summary = summarize(results, metrics, _order(sweep))
    q = sweep.quality
    lines = [
        f"# Sweep {sweep.path.name}",
        "",
        f"Mean ± sd over seeds ({', '.join(map(str, sweep.seeds))}); one run per cell and seed, final evaluation. "
        f"`{q}_width`: the 95 % bootstrap interval of {q} over the generated images (mean over seeds); "
        f"`{q}_floor`: {q} of as many held-out real images. `round_MB`: weights sent and received in a round "
        f"(K records each way). `minutes`: the run's rounds.",
        "",
        *_base_lines(sweep, q),
        markdown_table(summary, metrics),
        "",
        f"![trade-off]({TRADEOFF})",
        "",
        f"![metrics]({METRICS_PLOT})",
        "",
    ]
    (sweep.out / SUMMARY).write_text("\n".join(lines))
    plot_tradeoff(summary, q, sweep.out / TRADEOFF)
    plot_metrics(sweep, results, [*PLOTTED, q], sweep.out / METRICS_PLOT)


def _order(sweep: Sweep) -> list[str]:
    """The summary's rows: the base's reference row (with [pretrain]), then the cells in file order."""
    return ([REFERENCE] if sweep.pretrain is not None else []) + [c.name for c in sweep.cells]


def _base_lines(sweep: Sweep, quality: str) -> list[str]:
    """The base run's line in the summary: where it is and how good it is on its own (spare) digits."""
    if sweep.pretrain is None or not sweep.init_from:
        return []
    run = Path(sweep.init_from).parent
    r = run_result(run)
    got = ", ".join(f"{k} {r[k]:.3g}" for k in ("copy_5", quality) if k in r and r[k] == r[k])
    return [
        f"Every cell fine-tunes the base run `{run}` ([pretrain]: trained once on the spare digits, "
        f"neither training nor held-out ones; its own final evaluation: {got or 'n/a'}, {r['minutes']:.1f} min). "
        f"The row `{REFERENCE}` is that base evaluated as the cells are, against their training images, "
        f"without fine-tuning: what the cells' copying and quality are read against.",
        "",
    ]


_MARKERS = "osD^vP*Xh<>p"


def plot_tradeoff(summary: pd.DataFrame, quality: str, path: Path) -> Path:
    """copy_5 against the quality figure, one point per cell, error bars = sd over seeds."""
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(summary, quality)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff_figure(summary: pd.DataFrame, quality: str) -> Any:
    """The trade-off plot's figure: each cell a marker named in the legend (names printed beside
    points would overlap where cells land close together, e.g. LoRA and DiffFit near the origin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, row) in enumerate(summary.iterrows()):
        ax.errorbar(
            row.get(f"{quality}_mean", math.nan),
            row.get("copy_5_mean", math.nan),
            xerr=row.get(f"{quality}_sd"),
            yerr=row.get("copy_5_sd"),
            fmt=_MARKERS[i % len(_MARKERS)],
            capsize=3,
            label=str(name),
        )
    if f"{quality}_floor_mean" in summary:
        ax.axvline(summary[f"{quality}_floor_mean"].mean(), color="grey", ls=":", label=f"{quality} floor (real)")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"{quality} (lower = better quality)")
    ax.set_ylabel("copy_5 (lower = less copying)")
    ax.set_title("Memorization vs quality (mean ± sd over seeds)")
    fig.tight_layout()
    return fig


def plot_metrics(sweep: Sweep, results: pd.DataFrame, metrics: Sequence[str], path: Path) -> Path:
    """Each metric against each swept key (cells at the base value of the other keys), or against
    the named rows when nothing is swept; mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in results]
    axes_keys = sweep.swept or ["cell"]
    fig, axes = plt.subplots(
        len(axes_keys), len(metrics), figsize=(3.2 * len(metrics), 2.8 * len(axes_keys)), squeeze=False
    )
    for i, key in enumerate(axes_keys):
        frame = results if key == "cell" else _along(sweep, results, key)
        frame = frame.assign(row=frame["row"].fillna("") if "row" in frame else "")
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            if key == "cell":
                stats = frame.groupby("cell", sort=False)[metric].agg(["mean", "std"])
                stats = stats.reindex([c for c in _order(sweep) if c in stats.index])
                xs = range(len(stats))
                ax.errorbar(list(xs), stats["mean"], yerr=stats["std"], fmt="o", capsize=3)
                ax.set_xticks(list(xs), [str(n) for n in stats.index], rotation=35, ha="right", fontsize=7)
            else:
                for row, part in frame.groupby("row", sort=False):  # one line per named row
                    stats = part.groupby(key)[metric].agg(["mean", "std"])
                    xs = stats.index.astype(float) if _numeric(stats.index) else range(len(stats))
                    ax.errorbar(list(xs), stats["mean"], yerr=stats["std"], fmt="o-", capsize=3, label=row or None)
                if frame["row"].nunique() > 1 and i == j == 0:
                    ax.legend(fontsize=7)
                ax.set_xlabel(key)
            ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _along(sweep: Sweep, results: pd.DataFrame, key: str) -> pd.DataFrame:
    """Results of the cells that change ``key`` and leave every other swept key at the base value."""
    defaults = Settings.from_run_config({**sweep.base, **sweep.shared}).to_run_config()
    names = []
    for cell in sweep.cells:
        others = {k: v for k, v in cell.params.items() if k != key}
        if all(v == defaults.get(k) for k, v in others.items()):
            names.append(cell.name)
    frame = results[results["cell"].isin(names)].copy()
    if key not in frame:
        frame[key] = math.nan
    for cell in sweep.cells:  # a cell that does not sweep ``key`` sits at the base value
        frame.loc[(frame["cell"] == cell.name) & frame[key].isna(), key] = defaults.get(key)
    return frame


def _numeric(index: pd.Index) -> bool:
    try:
        index.astype(float)
    except (TypeError, ValueError):
        return False
    return True


# ---- the command ------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    """``iet-agc sweep``: check the whole sweep, then run what is missing."""
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        print(f"iet-agc sweep: --seeds: expected comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    try:
        extra = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise SweepError(f"--set: expected key=value, got {item!r}")
            try:
                extra.update(tomllib.loads(f"{key.strip()} = {value.strip()}"))
            except tomllib.TOMLDecodeError as err:
                raise SweepError(f"--set: {key.strip()}: invalid TOML value {value.strip()!r} ({err})") from None
        only = [c.strip() for c in args.cells.split(",")] if args.cells else None
        sweep = load_sweep(args.file, seeds=seeds, only=only, extra=extra, out=args.out)
    except SweepError as err:
        print(f"iet-agc sweep: {err}", file=sys.stderr)
        return 2
    print(
        f"[iet-agc] sweep {sweep.path}: {len(sweep.cells)} cells x {len(sweep.seeds)} seeds -> {sweep.out}",
        flush=True,
    )
    started = time.monotonic()
    try:
        run_sweep(sweep)
    except KeyboardInterrupt:
        print(f"\n[iet-agc] sweep interrupted; run the same command to continue ({sweep.out / RESULTS})", flush=True)
        sys.stderr.flush()
        # Flower's in-process ServerApp thread is not a daemon and would wait out the round timeout
        # for replies that never come; the run's checkpoint and results.csv are already on disk.
        os._exit(130)
    print(
        f"[iet-agc] sweep done in {(time.monotonic() - started) / 60:.1f} min: {sweep.out / SUMMARY}, "
        f"{sweep.out / TRADEOFF}, {sweep.out / METRICS_PLOT}",
        flush=True,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand to ``iet-agc``."""
    sw = sub.add_parser("sweep", help="run a grid of runs over seeds (resumable); mean ± sd tables and plots")
    sw.add_argument("file", help="sweep file (TOML), e.g. configs/sweeps/table3.toml")
    sw.add_argument("--seeds", default="", help="comma-separated seeds (default: the file's)")
    sw.add_argument("--cells", default="", help="comma-separated cell names to run (default: all)")
    sw.add_argument("--set", action="append", default=[], help="run-config key=value for every cell (repeatable)")
    sw.add_argument("--out", default=None, help="output folder (default: the file's out, or runs/sweeps/<name>)")
    sw.set_defaults(func=cmd_sweep)
