"""Writing a file so that a reader never sees half of it: a temporary sibling, then a rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    An interruption leaves the old file or the new one; two processes writing the same path each
    rename a whole file (the last one wins). ``suffix`` keeps an extension some writers insist on
    (``np.savez`` appends ``.npz`` to a name without it). The folder is made if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def error_text(err: BaseException) -> str:
    """An exception's message on one line (an OSError: its strerror and file name), for error messages."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())
