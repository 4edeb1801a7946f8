"""Captions of an image folder, one tuple per image in id order (the first caption is the default).

Two sources: Hugging Face's ``imagefolder`` convention (``metadata.jsonl`` in the folder, one JSON
object a line with ``file_name`` and ``text``) and the captions JSON of Somepalli et al.'s DCR
releases (LAION-10k: ``{"<image path>": ["<caption>", ...], ...}``, keyed by the image's path on
the authors' machine, the original caption first). Both are checked against the folder's images:
every image needs a caption and every caption an image, or a ValueError names the file and entry.
The functions here are pure: they take the images' relative paths, never decode an image.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import torch

METADATA = "metadata.jsonl"  # Hugging Face's imagefolder: captions beside the images
TEXT = "text"  # its caption column (diffusers' train_text_to_image.py default)
Captions = tuple[tuple[str, ...], ...]


class Captioned(Protocol):
    """Anything with per-image captions (``ddpm.data.ImageSet``)."""

    captions: Captions | None


def as_captions(value: Any, where: str) -> tuple[str, ...]:
    """One image's captions: a non-empty string, or a non-empty list of them, as a tuple.

    ``where`` names the file and entry in the ValueError raised for anything else."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list | tuple) and items and all(isinstance(c, str) and c.strip() for c in items):
        return tuple(items)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:60] + "..."
    raise ValueError(f"{where}: a caption must be a non-empty string or a non-empty list of them, got {shown}")


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no caption
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{key}: {path}: cannot be read as UTF-8 text ({err})") from None


def _aligned(found: Mapping[int, tuple[str, ...]], names: Sequence[str], where: str) -> Captions:
    """The captions in id order; images without one are a ValueError naming a few of them."""
    missing = [names[i] for i in range(len(names)) if i not in found]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{where}: no caption for {len(missing)} of {len(names)} images ({shown})")
    return tuple(found[i] for i in range(len(names)))


def read_metadata(path: Path, names: Sequence[str], key: str = "data-root") -> Captions:
    """The captions of ``metadata.jsonl`` at ``path`` for the images ``names`` (paths relative to
    the file's folder, in id order); ``key`` (the setting holding the folder) begins each error."""
    index = {name: i for i, name in enumerate(names)}
    found: dict[int, tuple[str, ...]] = {}
    first_line: dict[int, int] = {}
    for number, line in enumerate(_read_text(path, key).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{key}: {path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or TEXT not in row:
            raise ValueError(f"{where}: must be a JSON object with a string file_name and a {TEXT!r} caption")
        name = posixpath.normpath(row["file_name"].replace("\\", "/"))
        where = f"{where} (file_name {row['file_name']!r})"
        if name not in index:
            raise ValueError(f"{where}: no such image under {path.parent}")
        i = index[name]
        if i in found:
            raise ValueError(f"{where}: the image already has a caption on line {first_line[i]}")
        found[i], first_line[i] = as_captions(row[TEXT], where), number
    return _aligned(found, names, f"{key}: {path}")


def _parts(name: str) -> tuple[str, ...]:
    """A path's components, separators and a leading root or ``./`` aside (``C:`` too)."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", ".")]
    return tuple(parts[1:] if parts and parts[0].endswith(":") else parts)


def _stem(part: str, suffixes: Iterable[str]) -> str:
    stem, dot, suffix = part.rpartition(".")
    return stem if dot and stem and f".{suffix.lower()}" in suffixes else part


def _lookups(names: Sequence[str], suffixes: set[str]) -> list[dict[tuple[str, ...], int]]:
    """Path components -> image id, best first: a whole relative path, the same with its file's stem,
    a shorter tail of one, the same with the stem; -1 where several images share a key."""
    tables: list[dict[tuple[str, ...], int]] = [{}, {}, {}, {}]
    for i, name in enumerate(names):
        parts = _parts(name)
        stemmed = (*parts[:-1], _stem(parts[-1], suffixes))
        keys = [(0, parts), (1, stemmed)]
        keys += [(t, k[start:]) for start in range(1, len(parts)) for t, k in ((2, parts), (3, stemmed))]
        for t, key in keys:
            tables[t][key] = i if tables[t].get(key, i) == i else -1
    return tables


def _match(entries: Iterable[str], names: Sequence[str], suffixes: Iterable[str] = ()) -> dict[str, int]:
    """Each entry's image id (-1: several images fit; no entry: none does). An absolute entry (DCR's
    paths on the authors' machine) names the image whose relative path is its longest tail; a
    relative one (a file name, a stem, part of a path) may also be a tail of the image's path. Whole
    components only; an image suffix (``suffixes``, and the images' own) may differ or be left out
    (``000001`` or ``000001.jpg`` for ``000001.png``)."""
    suffixes = {s.lower() for s in suffixes} | {PurePosixPath(n).suffix.lower() for n in names}
    tables = _lookups(names, suffixes)
    out = {}
    for entry in entries:
        parts = _parts(entry)
        absolute = entry.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", entry) is not None
        for start in range(len(parts)):
            tail = parts[start:]
            keys = (tail, (*tail[:-1], _stem(tail[-1], suffixes)))
            hits = [table.get(keys[t % 2]) for t, table in enumerate(tables[:2] if absolute else tables)]
            hit = next((h for h in hits if h is not None), None)
            if hit is not None:
                out[entry] = hit
                break
    return out


def read_captions_json(
    path: Path, names: Sequence[str], root: Path, suffixes: Iterable[str] = (), key: str = "captions"
) -> Captions:
    """The captions of a DCR-style JSON object at ``path`` (image path, file name or stem -> caption or
    list of captions) for the images ``names`` under ``root`` (relative paths, in id order).

    DCR's keys are absolute paths on the authors' machine (``/fs/.../train/images_large/000000.png``);
    an entry belongs to the image whose relative path ends it. Every entry must name exactly one
    image and every image have exactly one entry; ``suffixes``: the image suffixes an entry may
    name instead of the image's own."""
    try:
        table = json.loads(_read_text(path, key))
    except json.JSONDecodeError as err:
        raise ValueError(f"{key}: {path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{key}: {path}: must be a non-empty JSON object of image -> caption(s)")
    owner = _match(table, names, suffixes)
    stray = [entry for entry in table if entry not in owner]
    if stray:
        shown = ", ".join(repr(s) for s in stray[:3]) + (", ..." if len(stray) > 3 else "")
        raise ValueError(f"{key}: {path}: {len(stray)} entries name no image under {root} ({shown})")
    found: dict[int, tuple[str, ...]] = {}
    first: dict[int, str] = {}
    for entry, i in owner.items():
        if i < 0:
            raise ValueError(f"{key}: {path}: entry {entry!r} names several images (give more of its path)")
        if i in found:
            raise ValueError(f"{key}: {path}: entries {first[i]!r} and {entry!r} both name the image {names[i]!r}")
        found[i], first[i] = as_captions(table[entry], f"{key}: {path}: entry {entry!r}"), entry
    return _aligned(found, names, f"{key}: {path}")


def first_captions(data: Captioned) -> list[str]:
    """The default caption of every training image (its first), in id order."""
    return [c[0] for c in _captions_of(data)]


def captions_for(data: Captioned, ids: Iterable[int], generator: torch.Generator | None = None) -> list[str]:
    """The captions of a batch of sample ids: each image's first, or with ``generator`` one of its
    captions drawn uniformly (the multiple-captions mitigation), reproducibly from that generator."""
    captions = _captions_of(data)
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < len(captions)]
    if bad:
        raise ValueError(f"sample ids must be in [0, {len(captions) - 1}], got {bad[:5]}")
    if generator is None:
        return [captions[i][0] for i in ids]
    counts = torch.tensor([len(captions[i]) for i in ids], dtype=torch.float64)
    picks = (torch.rand(len(ids), generator=generator, dtype=torch.float64) * counts).long().tolist()
    return [captions[i][min(k, len(captions[i]) - 1)] for i, k in zip(ids, picks, strict=True)]


def _captions_of(data: Captioned) -> Captions:
    if data.captions is None:
        name = getattr(data, "name", "this data set")
        raise ValueError(f"{name} has no captions (an image folder with {METADATA}, or a captions JSON)")
    return data.captions
