"""A sweep file (TOML) read and checked before anything runs: its cells, seeds and base run.

A sweep file names a base preset, the run-config values every cell shares (``[set]``), named rows
(``[rows.NAME]``), a cross product (``[grid]``) and/or one-at-a-time variations around the base
(``[vary]``), and the ``seeds``. With ``[pretrain]`` the sweep first trains a base model once
(``<out>/base/``) and fine-tunes it in every cell; the base trains on the spare digits of the same
split. Every (cell, seed) run's settings are checked here; a refusal names the file and the key.

A sweep has at most ``MAX_CELLS`` cells, ``MAX_SEEDS`` seeds and ``MAX_RUNS`` cells x seeds, refused
before any cell is expanded or checked. Every file read (the sweep file, its base preset, a run
folder's settings.toml and rounds.csv) goes through ``inputs``: a bad one names the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.columns import QUALITY_FIGURES
from fl_app.config import settings_from_run_config
from fl_app.run_folder import run_folders, run_result
from fl_app.settings import Settings
from fl_app.trackers import TRACKER_KEYS, default_tracker_dir, tracker_name

from .inputs import InputError, read_table, read_toml

SECTIONS = ("base", "seeds", "quality", "out", "set", "pretrain", "rows", "grid", "vary")
RESERVED = ("seed", "out-dir", "resume")  # the sweep sets these itself
QUALITY = QUALITY_FIGURES  # the figure a sweep plots copying against
BASE_FOLDER = "base"  # <out>/base/: the run [pretrain] makes before the cells
REFERENCE = "base (not fine-tuned)"  # the results row of the base itself, evaluated as a cell is
# what makes the split and the base's shape: the base and every cell must agree on them
SPLIT_KEYS = ("dataset", "image-size", "train-size", "holdout-size", "data-seed", "class-conditional")
# the most one sweep may ask for: a typo (a grid of 10 keys x 10 values) must not queue 10^10 runs
MAX_CELLS = 1000  # rows x grid points + vary values, before duplicates are dropped
MAX_SEEDS = 100
MAX_RUNS = 10_000  # cells x seeds
MAX_FILE_BYTES = 2**20  # a sweep file or base preset: far more than any real one
ROUND_COLUMNS = ("skip_rate", "aug_rate", "moved", "seconds")  # what a run's row is made from


class SweepError(InputError):
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
        return self.tracked(config, cell.name, seed)

    def tracked(self, config: dict[str, Any], cell: str, seed: int) -> dict[str, Any]:
        """With a ``tracker``, a run of the sweep's group (its folder's name) in one store for the whole
        sweep (``<out>/mlflow``, ...), named after its cell and seed, which are its tags too."""
        tracker = config.get("tracker", "none")
        if tracker == "none":
            return config
        value = re.sub(r"[;\x00-\x1f]", ",", cell)[:500]
        tags = ";".join(t for t in (config.get("tracker-tags", ""), f"cell={value}", f"seed={seed}") if t)
        defaults = {
            "tracker-group": tracker_name(self.out.name),
            "tracker-run-name": tracker_name(f"{cell}-seed{seed}"),
            "tracker-dir": str(default_tracker_dir(tracker, self.out)),
        }
        return {**config, **{k: v for k, v in defaults.items() if not config.get(k)}, "tracker-tags": tags}

    def base_config(self) -> dict[str, Any]:
        """The base run's config: base < [set] < [pretrain] (its ``seed``, default 0) < --set, in ``<out>/base``."""
        values = {**self.base, **self.shared, "seed": 0, **(self.pretrain or {}), **self.extra}
        return self.tracked({**values, "out-dir": str(self.out / BASE_FOLDER)}, BASE_FOLDER, 0)

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
    ``resume``) and how it is tracked (``tracker-*``). A finished row counts only while its cell's
    settings are unchanged."""
    where = ("out-dir", "resume", *TRACKER_KEYS)
    values = {k: v for k, v in config.items() if k not in where}
    resolved = Settings.from_run_config(values).to_run_config()
    kept = {k: v for k, v in sorted(resolved.items()) if k not in where}
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
    _check_cell_count(where, rows, grid, vary)
    given = "--seeds" if seeds is not None else "seeds"
    seed_list = _seed_list(list(seeds) if seeds is not None else doc.get("seeds", [0]), where, given)
    if pretrain is not None:
        _check_pretrain_places(where, base, shared, pretrain, rows, grid, vary, extra or {})
    _check_given(extra or {}, {**base, **fill})
    _check(where, "set", {**base, **shared, **fill})
    for name, changes in rows.items():
        _check(where, f"rows.{name}", {**base, **shared, **fill, **changes})
    for section, table in (("grid", grid), ("vary", vary)):
        for key, values in table.items():
            for value in values:
                _check(where, f"{section}.{key}", {**base, **shared, **fill, key: value})
    expanded = expand_cells(rows, grid, vary, lambda changes: config_hash({**base, **shared, **fill, **changes}))
    cells = _selected([Cell(c.name, {**shared, **fill, **c.changes}, c.params, c.row) for c in expanded], only, where)
    if len(cells) * len(seed_list) > MAX_RUNS:
        raise SweepError(
            f"{where}: {len(cells)} cells x {len(seed_list)} seeds = {len(cells) * len(seed_list)} runs; "
            f"a sweep runs at most {MAX_RUNS} (MAX_RUNS): split it into several sweep files, or pick --cells/--seeds"
        )
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
        doc = read_toml(path, max_bytes=MAX_FILE_BYTES)
    except InputError as err:
        raise SweepError(str(err)) from None
    unknown = [k for k in doc if k not in SECTIONS]
    if unknown:
        raise SweepError(f"{where}: {unknown[0]}: unknown key; a sweep file has {', '.join(SECTIONS)}")
    return doc


def _check_cell_count(where: str, rows: Mapping[str, Any], grid: Mapping[str, list], vary: Mapping[str, list]) -> None:
    """At most MAX_CELLS cells (named rows x grid points + vary values), counted before any is made."""
    named, points, alone = max(len(rows), 1), math.prod(len(v) for v in grid.values()), sum(map(len, vary.values()))
    if named * points + alone > MAX_CELLS:
        raise SweepError(
            f"{where}: asks for {named * points + alone} cells ({named} rows x {points} grid points + {alone} vary "
            f"values); a sweep has at most {MAX_CELLS} cells (MAX_CELLS): split it into several sweep files"
        )


def _seed_list(seed_list: object, where: str, given: str = "seeds") -> list[int]:
    """The sweep's seeds: a non-empty list of at most MAX_SEEDS distinct integers >= 0."""
    if isinstance(seed_list, list) and len(seed_list) > MAX_SEEDS:
        raise SweepError(f"{where}: {given}: {len(seed_list)} seeds; a sweep has at most {MAX_SEEDS} (MAX_SEEDS)")
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
    finished = finished_run(sweep.base_config())
    return dataclasses.replace(sweep, init_from=str(finished / "pipeline")) if finished else sweep


def _base(spec: Any, sweep_path: Path) -> dict[str, Any]:
    """The base preset: ``default`` (the embedded default) or a preset file, relative to the sweep file."""
    if not isinstance(spec, str) or not spec:
        raise SweepError(f"{sweep_path}: base: must be 'default' or a preset file, got {spec!r}")
    if spec == "default":
        return {}
    preset = (sweep_path.parent / spec).expanduser()
    try:
        values = read_toml(preset, what=f"{sweep_path}: base: preset {preset}", max_bytes=MAX_FILE_BYTES)
    except InputError as err:
        raise SweepError(str(err)) from None
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


def _check_given(extra: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """``--set`` values on the base, before the file's sections: a refusal names the key alone, as
    ``iet-agc run`` and ``evaluate`` do for the same pair."""
    for key in RESERVED:
        if key in extra:
            raise SweepError(f"--set: {key}: set by the sweep itself (use --seeds and --out)")
    try:
        Settings.from_run_config({**base, **extra})
    except ValueError as err:
        raise SweepError(str(err)) from None


def finished_run(config: Mapping[str, Any]) -> Path | None:
    """The run folder under ``config``'s out-dir that finished with these settings, or None."""
    finished, _ = run_folders(Path(config["out-dir"]))
    return finished if finished is not None and saved_hash(finished) == config_hash(config) else None


def saved_settings(run_dir: Path) -> dict[str, Any]:
    """The run config a run folder was made with (its settings.toml), without where it wrote; an
    InputError names the file."""
    saved = read_toml(run_dir / "settings.toml", max_bytes=MAX_FILE_BYTES)
    return {k: v for k, v in saved.items() if k not in ("out-dir", "resume")}


def saved_hash(run_dir: Path) -> str:
    """``config_hash`` of a run folder's settings.toml; settings it cannot hold name the file."""
    saved = saved_settings(run_dir)
    try:
        return config_hash(saved)
    except ValueError as err:
        raise InputError(f"{run_dir / 'settings.toml'}: {err}") from None


def run_row(run_dir: Path) -> dict[str, Any]:
    """``run_result`` of a finished run folder, its rounds.csv read and checked first (an InputError
    names the file: unreadable, not CSV, a column or every row missing, values that are no numbers)."""
    rounds = run_dir / "rounds.csv"
    read_table(rounds, columns=ROUND_COLUMNS, min_rows=1)
    try:
        return run_result(run_dir)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise InputError(f"{rounds}: cannot make the run's row ({type(err).__name__}: {err})") from None
