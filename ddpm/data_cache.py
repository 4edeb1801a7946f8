"""A decoded copy of a data set on the machine's disk, memory-mapped when a process loads it again.

In a deployment Flower starts a fresh ClientApp process for every message, so without this copy
each shard and round decodes the data set again (thousands of JPEGs for an image folder, the
pickled CIFAR batches, scikit-learn's digits). The copy lives in ``<cache dir>/<key>/``: one
``.npy`` file per array and ``meta.json`` with the data set's fingerprint, so a message's
fingerprint check costs nothing. The key covers everything the decoded arrays depend on: the
loader's arguments and the source files' names, sizes and modification times, so an edited,
added or removed image is a new key and never a stale copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1  # bump when the stored layout changes: older copies are then simply not found
META = "meta.json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/iet-agc/decoded`` (``~/.cache/iet-agc/decoded``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iet-agc" / "decoded"


def file_signature(files: Iterable[Path], root: Path) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, size, mtime in ns) of each file: what decides a changed source."""
    out = []
    for f in files:
        st = f.stat()
        out.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def cache_key(fields: Mapping[str, Any]) -> str:
    """A stable name for the copy made from ``fields`` (loader arguments and source signature)."""
    blob = json.dumps({"format": FORMAT, **fields}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def read(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays (memory-mapped copy-on-write: no read until used, writable without a copy) and
    the metadata of a complete copy, or None where there is none or it does not match its meta."""
    try:
        meta = json.loads((folder / META).read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c") for name in meta["arrays"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, arr in arrays.items():
        want = meta["arrays"][name]
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            return None
    return arrays, meta


def write(folder: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bool:
    """Store a copy: written under a temporary name, then renamed, so a reader sees all or nothing.

    Two processes making the same copy at once (several ClientApps on one node) both write; the
    first rename wins and the other's files are removed. Returns False where the copy could not
    be written (a read-only or full disk): the data set is then used without one.
    """
    full = {**meta, "arrays": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()}}
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError:
        return False
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
        (tmp / META).write_text(json.dumps(full, indent=1))
        os.rename(tmp, folder)
        return True
    except OSError:
        return folder.is_dir()  # another process renamed its copy first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
