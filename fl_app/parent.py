"""Stopping a ServerApp whose SuperLink is gone (Flower's SuperExec outlives it by seconds)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def parent_gone() -> Callable[[], str | None]:
    """A stop check: the SuperLink that runs this ServerApp is gone.

    Flower's SuperExec starts the ServerApp and exits a few seconds after its SuperLink (it
    watches the pid given as ``--parent-pid``). A simulated run would meanwhile go on unseen,
    writing its run folder; so check that pid (read from the parent's command line, Linux) and
    the parent itself before each round.
    """
    parent = os.getppid()
    watched = _flower_parent_pid(parent)

    def check() -> str | None:
        if os.getppid() != parent or (watched is not None and not _alive(watched)):
            return f"the SuperLink that started this ServerApp (pid {watched or parent}) is gone"
        return None

    return check


def _flower_parent_pid(pid: int) -> int | None:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return int(args[args.index(b"--parent-pid") + 1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed SuperLink its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    """The process state letter from /proc (Linux); empty where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
