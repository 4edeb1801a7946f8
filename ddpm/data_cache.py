"""A decoded copy of a data set on the machine's disk, memory-mapped when a process loads it again.

In a deployment Flower starts a fresh ClientApp process for every message, so without this copy
each shard and round decodes the data set again (thousands of JPEGs for an image folder, the
pickled CIFAR batches, scikit-learn's digits). The copy lives in ``<cache dir>/<key>/``: one
``.npy`` file per array and ``meta.json`` with the data set's fingerprint, so a message's
fingerprint check costs nothing. The key covers everything the decoded arrays depend on: the
loader's arguments and the source files' names, sizes and modification times, so an edited,
added or removed image is a new key and never a stale copy.

The copy proves its own content: ``meta.json`` holds each array's SHA-256, checked whenever an
array file is not the very file last checked (``verified.json``: its inode, size, mtime and
ctime; ctime moves on every write, rename or chmod and cannot be set back from user space). An
array replaced under kept metadata is therefore hashed, found different, removed and decoded
again from the sources; an untouched copy costs a few ``stat`` calls per message.

Beside the arrays a copy may hold documents: JSON values (an image folder's captions) in
``<name>.json``, each named by its SHA-256 in ``meta.json`` and hashed on every read (they are read
whole anyway), so a replaced document is refused like a replaced array.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 2  # bump when the stored layout changes: older copies are then simply not found (2: content hashes)
META = "meta.json"
VERIFIED = "verified.json"  # the stat of each array file when its hash last matched
RESERVED = ("meta", "verified")  # names a document cannot take


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


def content_hash(arr: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order (read straight from a memory map, no copy)."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return hashlib.sha256(memoryview(flat)).hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stamps(folder: Path, names: Iterable[str]) -> dict[str, list[int]]:
    return {name: _stamp(folder / f"{name}.npy") for name in names}


def _save_stamps(folder: Path, names: Iterable[str]) -> None:
    try:  # best effort: without it the next reader hashes again
        (folder / VERIFIED).write_text(json.dumps(_stamps(folder, names)))
    except OSError:
        pass


def read(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays (memory-mapped copy-on-write: no read until used, writable without a copy) and
    the metadata of a complete copy whose content is its own (see the module), or None; the
    metadata's ``documents`` then maps each document's name to its value. A copy that is damaged or
    whose content is not what its metadata says is removed (warning), so that the caller's decoded
    replacement takes its place."""
    try:
        meta = json.loads((folder / META).read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c") for name in meta["arrays"]}
        stamps = _stamps(folder, arrays)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return _discard(folder, f"unreadable ({type(err).__name__}: {err})")
    try:
        verified = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        verified = {}
    for name, arr in arrays.items():
        want = meta["arrays"][name]
        if list(arr.shape) != want.get("shape") or str(arr.dtype) != want.get("dtype"):
            return _discard(folder, f"{name}.npy has shape {list(arr.shape)} {arr.dtype}, its metadata says otherwise")
        if verified.get(name) != stamps[name] and content_hash(arr) != want.get("sha256"):
            return _discard(folder, f"{name}.npy does not hold the content its metadata's SHA-256 names")
    documents = _read_documents(folder, meta.get("documents", {}))
    if isinstance(documents, str):
        return _discard(folder, documents)
    if verified != stamps:
        _save_stamps(folder, arrays)
    return arrays, {**meta, "documents": documents} if documents else meta


def _read_documents(folder: Path, described: Any) -> dict[str, Any] | str:
    """Each document's value, or why the copy cannot be trusted (a missing, changed or damaged file)."""
    out = {}
    try:
        for name, want in described.items():
            blob = (folder / f"{name}.json").read_bytes()
            if hashlib.sha256(blob).hexdigest() != want["sha256"]:
                return f"{name}.json does not hold the content its metadata's SHA-256 names"
            out[name] = json.loads(blob)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"a document is unreadable ({type(err).__name__}: {err})"
    return out


def _discard(folder: Path, why: str) -> None:
    """Remove a copy that cannot be trusted, saying why (the data set is decoded again)."""
    warnings.warn(f"decoded data set copy {folder}: {why}; removing it and decoding again", RuntimeWarning, 2)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def write(
    folder: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], documents: Mapping[str, Any] | None = None
) -> bool:
    """Store a copy: written under a temporary name, then renamed, so a reader sees all or nothing.

    ``documents``: JSON values stored beside the arrays (``<name>.json``), returned by ``read`` in
    the metadata's ``documents``; a name may not be one of ``RESERVED``.

    Two processes making the same copy at once (several ClientApps on one node) both write; the
    first rename wins and the other's files are removed. Returns False where the copy could not
    be written (a read-only or full disk): the data set is then used without one.
    """
    described = {
        n: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": content_hash(a)} for n, a in arrays.items()
    }
    full = {**meta, "arrays": described}
    blobs = {name: json.dumps(value, ensure_ascii=False).encode() for name, value in (documents or {}).items()}
    if taken := sorted(set(blobs) & set(RESERVED)):
        raise ValueError(f"document names {taken} are taken by the copy's own files")
    if blobs:
        full["documents"] = {name: {"sha256": hashlib.sha256(b).hexdigest()} for name, b in blobs.items()}
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError:
        return False
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
        for name, blob in blobs.items():
            (tmp / f"{name}.json").write_bytes(blob)
        (tmp / META).write_text(json.dumps(full, indent=1))
        os.rename(tmp, folder)
        _save_stamps(folder, arrays)  # hashed from memory just now: the files need no second read
        return True
    except OSError:
        return folder.is_dir()  # another process renamed its copy first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
