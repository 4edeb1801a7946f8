"""The ``iet-agc`` command's inputs: ``key=value`` pairs (one rule for every subcommand), image
sets, output paths and devices, each checked before the long work starts.

A bad input ends the command with one line ``iet-agc <subcommand>: error: <option, key or file>:
<reason>`` on stderr and exit code 2, as argparse does for bad arguments (``fail``).
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: `iet-agc run` does not need it
    import torch

import numpy as np

from ddpm.files import error_text as _reason

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class InputError(ValueError):
    """A user input the command cannot work with; the message names it (option, key or file) and says why."""


def fail(command: str, err: Exception) -> int:
    """Report ``err`` as the one line ``iet-agc <command>: error: <err>`` on stderr; exit code 2."""
    print(f"iet-agc {command}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    return 2


# ---- key=value pairs ----------------------------------------------------------------------
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")  # flwr 1.41's pattern for one key=value pair
STRUCTURED = ("'", '"', "[", "{")  # a value begun as a TOML string, array or table must be valid TOML


def parse_pairs(items: str | Iterable[str], option: str) -> dict[str, Any]:
    """``'a=1 b="x y" c=cifar10'`` -> ``{'a': 1, 'b': 'x y', 'c': 'cifar10'}``: the one ``key=value``
    rule of ``iet-agc run --run-config``, ``evaluate --set`` and ``sweep --set``.

    Pairs are found with flwr's pattern (quote a value with spaces); each value is TOML, and a value
    TOML does not read (``dataset=cifar10``, ``data-root=/data/x``) is that text, for the settings'
    own checks to judge (``lr=1e-3x``: "lr: must be a finite number"), unless it begins as a TOML
    string, array or table (``'``, ``"``, ``[``, ``{``): then the TOML error is the answer.
    Several items (a repeated option) merge, the later winning; a key given twice in one item, and
    text flwr would silently skip (``a = 1``, a stray word), are refused naming ``option``.
    """
    merged: dict[str, Any] = {}
    for text in [items] if isinstance(items, str) else items:
        merged.update(_pairs(text, option))
    return merged


def _pairs(text: str, option: str) -> dict[str, Any]:
    pairs: dict[str, Any] = {}
    leftover = PAIR.sub(" ", text).strip()
    if leftover:
        raise InputError(f"{option}: expected key=value pairs (no spaces around =), cannot read {leftover!r}")
    for key, value in PAIR.findall(text):
        try:
            parsed = tomllib.loads(f"{key} = {value}")
        except tomllib.TOMLDecodeError as err:
            if value.startswith(STRUCTURED):
                reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))  # our one-line document
                raise InputError(f"{option}: {key}: invalid TOML value {value!r} ({reason})") from None
            parsed = {key: value}
        for name, parsed_value in parsed.items():  # one entry (a dotted key makes a table)
            if name in pairs:
                raise InputError(f"{option}: {name}: given twice in {text!r}")
            pairs[name] = parsed_value
    return pairs


def parse_run_config(values: list[str]) -> dict[str, Any]:
    """``--run-config`` as ``flwr run`` reads it: one TOML file, or ``key=value`` pairs (repeatable,
    later wins); never both. A syntax error names its key (or the file and line)."""
    files = [v for v in values if v.endswith(".toml")]  # flwr's test for a file
    if files and len(values) > 1:
        raise InputError(
            f"--run-config: a TOML file ({files[0]}) cannot be combined with other --run-config values "
            "(flwr run refuses both): put your changes into a copy of the file, or give key=value pairs only"
        )
    if files:
        return _read_toml(files[0])
    return parse_pairs(values, "--run-config")


def _read_toml(item: str) -> dict:
    path = Path(item).expanduser()
    if not path.is_file():
        raise InputError(f"--run-config: file {item} does not exist")
    return read_toml(path, what=f"--run-config: {item}")


# ---- reading files ------------------------------------------------------------------------
# Every file a command reads goes through these: a file that is missing, a folder, unreadable, not
# UTF-8, too large, bad TOML or a table that is no CSV (or lacks a column) is an InputError that
# names the file (``what``, default its path) and says what is wrong, never a traceback.
def read_text(path: Path | str, *, what: str | None = None, max_bytes: int | None = None) -> str:
    """The UTF-8 text of the file ``path``; ``max_bytes`` refuses a larger file before reading it."""
    path = Path(path)
    what = what or str(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise InputError(f"{what}: is a folder, not a file")
        if not stat.S_ISREG(mode):  # a pipe or a device would be read forever
            raise InputError(f"{what}: is not a regular file")
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise InputError(f"{what}: {size / 2**20:.1f} MiB, larger than any such file ({max_bytes // 2**20} MiB)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what}: does not exist") from None
    except OSError as err:
        raise InputError(f"{what}: cannot read it ({_reason(err)})") from None
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{what}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line})") from None


def read_toml(path: Path | str, *, what: str | None = None, max_bytes: int | None = None) -> dict[str, Any]:
    """The TOML document in the file ``path``; a syntax error names its line (and key)."""
    what = what or str(path)
    text = read_text(path, what=what, max_bytes=max_bytes)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = re.search(r"at line (\d+)", str(err))
        where = ""
        if line and 0 < int(line.group(1)) <= len(text.splitlines()):
            key = text.splitlines()[int(line.group(1)) - 1].partition("=")[0].strip()
            key = key[:40] if key.isprintable() else ""
            where = f"line {line.group(1)}" + (f" ({key})" if key else "") + ": "
        raise InputError(f"{what}: {where}invalid TOML ({err})") from None


def read_table(
    path: Path | str,
    *,
    columns: Iterable[str] = (),
    min_rows: int = 0,
    dtype: dict[str, Any] | None = None,
    what: str | None = None,
):
    """The CSV table in the file ``path`` as a pandas DataFrame, with every one of ``columns`` and at
    least ``min_rows`` rows."""
    import io

    import pandas as pd

    what = what or str(path)
    text = read_text(path, what=what)
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=dtype)
    except pd.errors.EmptyDataError:
        raise InputError(f"{what}: empty (no header line)") from None
    except (pd.errors.ParserError, ValueError, TypeError) as err:
        raise InputError(f"{what}: cannot read it as CSV ({_reason(err)})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(str(c)[:40] for c in frame.columns[:12]) + (", ..." if len(frame.columns) > 12 else "")
        raise InputError(f"{what}: no column {', '.join(missing)} (its columns: {found})")
    if len(frame) < min_rows:
        raise InputError(f"{what}: {len(frame)} rows, expected at least {min_rows}")
    return frame


# ---- paths --------------------------------------------------------------------------------
def _probe(option: str, spec: str, test: Callable[[Path], Any]) -> Any:
    """``test(Path(spec).expanduser())``; what the file system refuses (a name too long, an unknown
    ``~user``, a NUL byte) is an InputError naming ``option``."""
    try:
        return test(Path(spec).expanduser())
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(f"{option}: cannot use {spec!r} ({_reason(err)})") from None


def check_output(option: str, spec: str, *, folder: bool) -> Path:
    """The output ``spec`` (a folder, or a file in one) can be made and written; returns its path.

    Checked before any work: it is not a folder where a file goes (or a file where a folder goes),
    and the nearest existing folder above it is a folder and writable. Missing folders are made later.
    """

    def nearest(path: Path) -> Path:
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    path = _probe(option, spec, lambda p: p)
    if _probe(option, spec, Path.is_dir) != folder and _probe(option, spec, Path.exists):
        raise InputError(f"{option}: {spec} exists and is {'not ' if folder else ''}a folder")
    existing = _probe(option, spec, lambda p: nearest(p if folder else p.parent))
    if not existing.is_dir():
        raise InputError(f"{option}: cannot write {spec}: {existing} is not a folder")
    target = path if path.exists() else existing
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        raise InputError(f"{option}: cannot write {spec}: {target} is not writable")
    return path


# ---- reading image sets -------------------------------------------------------------------
def load_images(spec: str, name: str) -> torch.Tensor:
    """A ``.npy`` array (N,C,H,W or N,H,W,C or N,H,W; uint8 0..255 or float 0..1) or an image folder,
    as an (N, C, H, W) uint8 or float32 tensor. Raises InputError naming ``--name`` for bad input."""
    option = f"--{name}"
    path = _probe(option, spec, lambda p: p)
    if _probe(option, spec, Path.is_dir):
        return _read_folder(path, option)
    if not _probe(option, spec, Path.exists):
        raise InputError(f"{option}: {spec} does not exist")
    if path.suffix.lower() != ".npy":
        raise InputError(f"{option}: {spec} is neither a .npy file nor a folder of images")
    try:  # mapped first: a header that declares more data than the file holds allocates nothing
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = _reason(err)
        if "mmap length is greater than file size" in reason:
            reason = "its header declares more data than the file holds (truncated?)"
        raise InputError(f"{option}: cannot read {spec}: {reason}") from None
    if not isinstance(mapped, np.ndarray):  # an .npz archive named .npy
        mapped.close()
        raise InputError(f"{option}: {spec} is an .npz archive, not one .npy array")
    try:
        array = np.array(mapped)
    except MemoryError:
        raise InputError(f"{option}: {spec} ({mapped.nbytes / 2**30:.1f} GiB) does not fit in memory") from None
    finally:
        del mapped
    return _from_array(array, option)


def _from_array(array: np.ndarray, option: str) -> torch.Tensor:
    import torch

    if array.ndim == 3:  # (N, H, W) grey
        array = array[:, None]
    if array.ndim != 4:
        raise InputError(f"{option}: expected N,C,H,W or N,H,W,C images, got shape {array.shape}")
    if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # N,H,W,C -> N,C,H,W
    elif array.shape[1] not in (1, 3):
        raise InputError(f"{option}: cannot find a channel axis of size 1 or 3 in shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(f"{option}: empty set (shape {array.shape})")
    if 0 in array.shape[2:]:
        raise InputError(f"{option}: images of height or width 0 (shape {array.shape})")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{option}: expected uint8 (0..255) or float (0..1) values, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{option}: contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 1:
        raise InputError(f"{option}: float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(array)


def read_image(path: Path, option: str):
    """``ddpm.data.read_image`` for a command-line option: its error as an InputError naming both."""
    from ddpm.data import read_image as decode

    try:
        return decode(path)
    except ValueError as err:
        raise InputError(f"{option}: {err}") from None


def _read_folder(root: Path, option: str) -> torch.Tensor:
    import torch

    from ddpm.data import IMAGE_SUFFIXES, image_files

    try:
        files = image_files(root)
    except OSError as err:
        raise InputError(f"{option}: cannot list {root}: {_reason(err)}") from None
    if not files:
        raise InputError(f"{option}: empty set: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    images, first = [], None
    for path in files:  # reading files, not the metric
        img = read_image(path, option)
        if first is None:
            first = (path, img.size)
        elif img.size != first[1]:
            (w0, h0), (w, h) = first[1], img.size
            raise InputError(f"{option}: {path} is {w}x{h} but {first[0]} is {w0}x{h0}; use images of one resolution")
        images.append(img)
    grey = all(img.mode in GREY_MODES for img in images)
    arrays = []
    for path, img in zip(files, images, strict=True):
        try:
            arrays.append(np.asarray(img.convert("L" if grey else "RGB")))
        except (OSError, ValueError) as err:  # a colour space without a conversion
            raise InputError(f"{option}: {path}: cannot convert mode {img.mode} ({_reason(err)})") from None
    stacked = np.stack(arrays)
    return torch.from_numpy(stacked[:, None] if grey else stacked.transpose(0, 3, 1, 2).copy())


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``--thresholds``: the settings' rule for ``mq-thresholds``, as an InputError."""
    from fl_app.settings import parse_thresholds as settings_thresholds

    try:
        return settings_thresholds(text, "--thresholds")
    except ValueError as err:
        raise InputError(str(err)) from None


def usable_device(name: str, option: str = "--device") -> torch.device:
    """The torch device for ``name`` (auto, cpu, cuda[:N], mps, xpu[:N]), if this machine has it."""
    from ddpm.device import usable_device as device_here

    try:
        return device_here(name, option)
    except ValueError as err:
        raise InputError(str(err)) from None


# ---- wiring -------------------------------------------------------------------------------
def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a bad argument as one line ``<prog>: error: <option>: <reason>`` (exit 2),
    without the usage block, and refuse unknown arguments itself (as a subcommand, argparse would
    leave them to the top-level parser, which prints its own usage)."""
    prog = parser.prog

    def error(message: str):
        parser.exit(2, f"{prog}: error: {' '.join(message.removeprefix('argument ').split())}\n")

    def parse_known_args(args=None, namespace=None):
        namespace, extras = type(parser).parse_known_args(parser, args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)} (see {prog} --help)")
        return namespace, extras

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser
