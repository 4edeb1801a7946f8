"""The run's checkpoint: everything the server needs to continue after the last completed round.

``RUN_DIR/checkpoint/round-NNNNNN/`` holds the global weights (``weights.safetensors``: all of
them, or when fine-tuning with an adapter only the adapter's trainable tensors, the base being
reloaded from ``init-from`` and checked by its fingerprint), the
ledger's arrays (``ledger.safetensors``: shards and cumulative skip counts), a server optimizer's
state where the aggregation keeps one (``aggregator.safetensors``: FedAvgM, FedAdam), ``state.json``
(the ledger's other values with MSR's RNG state, the rows written so far, the settings, the run
key) and, written last, ``manifest.json``: the round, the run key, the size and sha256 of every
other file, and the size and sha256 of the tables a resume carries on (``CARRIED_TABLES``, as they
were when the checkpoint was written). Nothing is unpickled. A checkpoint is written into a
temporary folder and renamed into place, so a crash leaves either the previous checkpoint or the
new one, never half of one.

Reading checks it all (``load_checkpoint``): a file edited, truncated, missing or added, a table's
rows up to the round changed, a checkpoint of another run (its key is not the run folder's
``run-key``), a folder renamed or a checkpoint older than the rows already written: CheckpointError
naming the file. The checksums catch accidents and hand edits, not a forger (they are not keyed).
Format 1 (before manifests) is still read, with the checks that need no checksum, and
``Checkpoint.format`` says so: the caller warns.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

CHECKPOINT_DIR = "checkpoint"
AGGREGATOR_FILE = "aggregator.safetensors"
MANIFEST = "manifest.json"
RUN_KEY_FILE = "run-key"  # RUN_DIR/run-key: the run's key, written with its first checkpoint
ROUNDS_TABLE = "rounds.csv"  # rewritten from state.json's rows on resume: read only for its last round
CARRIED_TABLES = ("assignments.csv", "moved.csv", "shards.csv", "dropped.csv")  # kept up to the round on resume
# the tables of numbers only, whose last line's first field is the last round written (dropped.csv's
# reasons are text, which may hold a line break)
ORDER_TABLES = (ROUNDS_TABLE, "assignments.csv", "moved.csv", "shards.csv")
FORMAT = 2  # 2: manifest.json; 1 (no checksums) is still read
LEGACY_FORMATS = (1,)
_ROUND_FOLDER = re.compile(r"round-(\d{6})")


class CheckpointError(ValueError):
    """A run folder without a usable checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    server_round: int
    weights: dict[str, np.ndarray]
    ledger_meta: dict
    ledger_arrays: dict[str, np.ndarray]
    rows: list[dict]
    settings: dict
    run_key: str
    fingerprint: str  # the training data set's, checked again on resume
    base_fingerprint: str = ""  # the initial model's when fine-tuning (init-from): weights hold only what trains
    aggregator: dict[str, np.ndarray] = field(default_factory=dict)  # a server optimizer's state (FedAvgM, FedAdam)
    # read back only (save measures them): each carried table's bytes when the checkpoint was written
    tables: dict[str, int] = field(default_factory=dict)
    format: int = FORMAT  # read back: a legacy format's files were not checked against checksums


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _prefix_digest(path: Path, size: int) -> str:
    """sha256 of the first ``size`` bytes of ``path``."""
    h, left = hashlib.sha256(), size
    with open(path, "rb") as fh:
        while left > 0 and (chunk := fh.read(min(left, 1 << 22))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def read_run_key(run_dir: Path) -> str | None:
    """The run folder's own key (``RUN_DIR/run-key``), None when it has none (a format-1 run)."""
    try:
        return (Path(run_dir) / RUN_KEY_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def _claim_run_key(run_dir: Path, run_key: str) -> None:
    """Write ``RUN_DIR/run-key`` (atomically) if missing; a folder of another run is refused."""
    key = read_run_key(run_dir)
    if key is None:
        tmp = Path(run_dir) / f".{RUN_KEY_FILE}.tmp-{os.getpid()}"
        _write(tmp, f"{run_key}\n".encode())
        os.replace(tmp, Path(run_dir) / RUN_KEY_FILE)
    elif key != run_key:
        raise CheckpointError(
            f"{Path(run_dir) / RUN_KEY_FILE}: this folder is run {key}; refusing to write a checkpoint of run {run_key}"
        )


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically under ``run_dir``, its manifest last; older checkpoints are removed
    afterwards. The run folder's ``run-key`` is written with the first checkpoint."""
    run_dir = Path(run_dir)
    _claim_run_key(run_dir, ckpt.run_key)
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"round-{ckpt.server_round:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {
        "format": FORMAT,
        "round": ckpt.server_round,
        "run-key": ckpt.run_key,
        "fingerprint": ckpt.fingerprint,
        "base-fingerprint": ckpt.base_fingerprint,
        "ledger": ckpt.ledger_meta,
        "rows": [{k: _json_safe(v) for k, v in row.items()} for row in ckpt.rows],
        "settings": ckpt.settings,
    }
    arrays = {"weights.safetensors": ckpt.weights, "ledger.safetensors": ckpt.ledger_arrays}
    for name, values in {**arrays, **({AGGREGATOR_FILE: ckpt.aggregator} if ckpt.aggregator else {})}.items():
        save_file({k: np.ascontiguousarray(v) for k, v in values.items()}, tmp / name)
    _write(tmp / "state.json", json.dumps(state, indent=1).encode())
    files = {}
    for file in sorted(tmp.iterdir()):  # hashed as written, read back from the page cache
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
        files[file.name] = {"bytes": file.stat().st_size, "sha256": _prefix_digest(file, file.stat().st_size)}
    tables = {}
    for name in CARRIED_TABLES:  # appended before the checkpoint: they hold exactly the rows up to this round
        if (run_dir / name).is_file():
            size = (run_dir / name).stat().st_size
            tables[name] = {"bytes": size, "sha256": _prefix_digest(run_dir / name, size)}
    manifest = {
        "format": FORMAT,
        "round": ckpt.server_round,
        "run-key": ckpt.run_key,
        "files": files,
        "tables": tables,
    }
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    if final.exists():  # the same round written again (a resumed run redid it)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in root.glob("round-*"):
        if old.name < final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint folder of a run, or CheckpointError naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run folder (no such directory)")
    found = sorted(p for p in (run_dir / CHECKPOINT_DIR).glob("round-*") if p.is_dir())
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoint ({CHECKPOINT_DIR}/round-*) in this run folder")
    return found[-1]


# ---- reading, every check first -------------------------------------------------------------
def _json(path: Path, data: bytes | None = None) -> dict:
    try:
        value = json.loads(path.read_bytes() if data is None else data)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: unreadable checkpoint (not a JSON object)")
    return value


def _checked_files(path: Path, manifest: dict) -> bytes:
    """The files the manifest lists, each checked against its size and sha256, none missing, none
    added; the contents of ``state.json`` (what was hashed is what is parsed)."""
    files = manifest.get("files")
    required = ("weights.safetensors", "ledger.safetensors", "state.json")
    if not isinstance(files, dict) or any(name not in files for name in required):
        raise CheckpointError(f"{path / MANIFEST}: unreadable checkpoint (it does not list {', '.join(required)})")
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if extra := sorted(present - set(files)):
        raise CheckpointError(f"{path / extra[0]}: not in {MANIFEST} (a file added to the checkpoint)")
    state = b""
    for name, want in sorted(files.items()):
        file = path / name
        if name not in present:
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        try:
            size, digest = int(want["bytes"]), str(want["sha256"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path / MANIFEST}: unreadable checkpoint ({type(err).__name__}: {err})") from None
        if (found := file.stat().st_size) != size:
            raise CheckpointError(f"{file}: {found} bytes, {MANIFEST} says {size} (truncated or edited)")
        try:
            if name == "state.json":
                state = file.read_bytes()
                found_digest = hashlib.sha256(state).hexdigest()
            else:  # streamed: the arrays are read again by safetensors
                found_digest = _prefix_digest(file, size)
        except OSError as err:
            raise CheckpointError(f"{file}: unreadable checkpoint ({type(err).__name__}: {err})") from None
        if found_digest != digest:
            raise CheckpointError(f"{file}: changed since it was written (its sha256 is not the one in {MANIFEST})")
    return state


def _last_round(table: Path) -> int | None:
    """The round of a table's last row (its first column), None for a table without rows."""
    try:
        with open(table, "rb") as fh:
            start = max(0, fh.seek(0, os.SEEK_END) - (1 << 16))
            fh.seek(start)
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines[1:] if start else lines):  # from a middle, the first line may be a part
        head = line.split(b",", 1)[0].strip()
        if head.isdigit():  # the header is no round, nor a partial last line of a table being rewritten
            return int(head)
    return None


def _check_name(path: Path, r: object, source: str) -> None:
    named = _ROUND_FOLDER.fullmatch(path.name)
    if named is None or int(named.group(1)) != r:
        raise CheckpointError(
            f"{path}: the folder's name does not match the round it holds ({r!r}, {source}): renamed or out of order"
        )


def _check_belongs(run_dir: Path, path: Path, state: dict, fmt: int) -> None:
    """The checkpoint is this run's, named for its round, and not older than the rows written."""
    state_file = path / "state.json"
    try:
        r, key, rows = int(state["round"]), str(state["run-key"]), list(state["rows"])
        row_rounds = [row.get("round") for row in rows]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{state_file}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    _check_name(path, r, "state.json")
    if row_rounds != list(range(1, r + 1)):
        raise CheckpointError(f"{state_file}: its rows are for rounds {row_rounds}, not 1..{r}")
    own = read_run_key(run_dir)
    if own is None and fmt >= 2:
        raise CheckpointError(f"{run_dir / RUN_KEY_FILE}: missing (the run folder's key, written with its checkpoints)")
    if own is not None and own != key:
        raise CheckpointError(
            f"{path}: a checkpoint of run {key} (state.json), but this folder is run {own} ({run_dir / RUN_KEY_FILE}): "
            "another run's checkpoint"
        )
    for name in ORDER_TABLES:  # a crash between the tables and the checkpoint: one round ahead
        last = _last_round(run_dir / name)
        if last is not None and last > r + 1:
            raise CheckpointError(
                f"{path}: round {r}, but {run_dir / name} already holds round {last}: "
                "a checkpoint older than the run's rows (out of order)"
            )


def _check_tables(run_dir: Path, path: Path, manifest: dict) -> dict[str, int]:
    """Each carried table's rows up to the round, as the manifest recorded them; their sizes."""
    sizes = {}
    tables = manifest.get("tables")
    if not isinstance(tables, dict):
        raise CheckpointError(f"{path / MANIFEST}: unreadable checkpoint (no tables)")
    for name, want in sorted(tables.items()):
        table = run_dir / name
        try:
            size, digest = int(want["bytes"]), str(want["sha256"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path / MANIFEST}: unreadable checkpoint ({type(err).__name__}: {err})") from None
        if name not in CARRIED_TABLES:
            raise CheckpointError(f"{path / MANIFEST}: unreadable checkpoint (unknown table {name})")
        if not table.is_file():
            raise CheckpointError(f"{table}: missing (it had {size} bytes when checkpoint {path.name} was written)")
        if table.stat().st_size < size:
            raise CheckpointError(
                f"{table}: {table.stat().st_size} bytes, fewer than the {size} it had when checkpoint {path.name} "
                "was written (truncated)"
            )
        if _prefix_digest(table, size) != digest:
            raise CheckpointError(f"{table}: its rows up to checkpoint {path.name} changed since it was written")
        sizes[name] = size
    return sizes


def _verified(run_dir: Path) -> tuple[Path, dict, dict[str, int], int]:
    """(the newest checkpoint folder, its state, the carried tables' sizes, its format), every
    check passed."""
    run_dir = Path(run_dir)
    path = latest_checkpoint(run_dir)
    if not (path / MANIFEST).is_file():
        state = _json(path / "state.json")
        if state.get("format") not in LEGACY_FORMATS:
            raise CheckpointError(f"{path / MANIFEST}: missing (checkpoint format {state.get('format')!r})")
        _check_belongs(run_dir, path, state, int(state["format"]))
        for name in ("weights.safetensors", "ledger.safetensors"):
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: missing")
        return path, state, {}, int(state["format"])
    manifest = _json(path / MANIFEST)
    if manifest.get("format") != FORMAT:
        found = manifest.get("format")
        raise CheckpointError(f"{path / MANIFEST}: unreadable checkpoint (format {found!r}, expected {FORMAT})")
    _check_name(path, manifest.get("round"), MANIFEST)
    state = _json(path / "state.json", _checked_files(path, manifest))
    if state.get("format") != FORMAT or state.get("round") != manifest.get("round"):
        raise CheckpointError(f"{path / 'state.json'}: its format or round is not the one in {MANIFEST}")
    if state.get("run-key") != manifest.get("run-key"):
        raise CheckpointError(f"{path / 'state.json'}: its run key is not the one in {MANIFEST}")
    _check_belongs(run_dir, path, state, FORMAT)
    return path, state, _check_tables(run_dir, path, manifest), FORMAT


def legacy_warning(run_dir: Path, ckpt: Checkpoint) -> str:
    """What a resume says of a checkpoint of an older format (read without checksums)."""
    return (
        f"{Path(run_dir) / CHECKPOINT_DIR}/round-{ckpt.server_round:06d}: format {ckpt.format} carries no checksums, "
        f"so an edit to its files cannot be told; resuming anyway (the next checkpoint is format {FORMAT})"
    )


def checkpoint_settings(run_dir: Path) -> dict:
    """The settings of the run whose newest checkpoint is in ``run_dir``, every check of
    ``load_checkpoint`` passed (the ServerApp reads them before it takes the run folder's lock)."""
    path, state, _, _ = _verified(run_dir)
    try:
        return dict(state["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}/state.json: unreadable checkpoint ({type(err).__name__}: {err})") from None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the newest checkpoint of ``run_dir``, every check passed (see the module's docstring);
    CheckpointError naming the file otherwise."""
    path, state, tables, fmt = _verified(run_dir)
    try:
        return Checkpoint(
            int(state["round"]),
            load_file(path / "weights.safetensors"),
            state["ledger"],
            load_file(path / "ledger.safetensors"),
            list(state["rows"]),
            dict(state["settings"]),
            str(state["run-key"]),
            str(state["fingerprint"]),
            str(state.get("base-fingerprint", "")),
            load_file(path / AGGREGATOR_FILE) if (path / AGGREGATOR_FILE).is_file() else {},
            tables,
            fmt,
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
