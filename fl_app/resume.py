"""Continuing a run from its checkpoint: which settings may change, and a lock so that only one
process writes a run folder at a time."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Keys that do not change what is trained: run length, evaluation, where and how patiently it runs.
# Not here on purpose, among others: the data split (train-size, holdout-size, data-seed, data-split:
# other training or held-out images, a new fingerprint) and seed.
RESUMABLE_KEYS = (
    "num-rounds",
    "eval-every",
    "eval-num-images",
    "eval-batch-size",
    "sample-steps",
    "mq-neighbours",
    "fid",
    "fid-weights",
    "fid-cache-dir",
    "sscd-weights",  # the text family's Sim Score and CLIP score: measured, never trained on
    "clip-model",
    "holdout-root",
    "data-root",  # where this machine keeps the data; the data set's fingerprint must still match
    "captions",  # where this machine keeps the captions JSON; the fingerprint covers the captions
    "guidance-scale",  # how the evaluation samples (classifier-free guidance), not what trains
    "device",
    "precision",  # how the network computes (a resume may move to another device), not what trains
    "channels-last",
    "compile",
    "round-timeout",
    "min-nodes",
    "max-failed-rounds",
    "node-max-failures",
    "max-update-ratio",  # which replies count as faulty, as node-max-failures
    "messages-per-node",
    "shards-per-message",  # how shards travel, never what they train (packed results are identical)
    "out-dir",
    "init-from",  # where this machine keeps the base; the base's fingerprint must still match
    "save-adapter",
    "tracker",  # where the run is logged: a resume continues the same tracked run, or starts one
    "tracker-dir",
    "tracker-uri",
    "tracker-project",
    "tracker-run-name",
    "tracker-group",
    "tracker-tags",
    "resume",
)


def resumed_settings(saved: Mapping[str, Any], given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """The saved run's settings with the ``given`` changes that do not alter the result.

    A given key equal to the saved value, or equal to the app's default (``flwr run`` sends every
    default along), is no change. Any other change of a key outside ``RESUMABLE_KEYS`` raises
    ValueError naming the key.
    """
    merged = dict(saved)
    for key, value in given.items():
        if key in saved and value == saved[key]:
            continue
        if key in RESUMABLE_KEYS:
            merged[key] = value
        elif key in defaults and value == defaults[key]:
            merged.setdefault(key, value)  # a setting newer than the run takes its default
        else:
            used = repr(saved[key]) if key in saved else "its default"
            raise ValueError(
                f"{key}: cannot change when resuming (the run used {used}, given {value!r}); "
                f"only these keys may change: {', '.join(k for k in RESUMABLE_KEYS if k != 'resume')}"
            )
    return merged


def _in_use(run_dir: Path, fh) -> RuntimeError:
    fh.seek(0)
    holder = fh.read().strip() or "another process"
    return RuntimeError(f"{run_dir}: the run folder is in use by {holder}; stop it before resuming")


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` while a ServerApp writes the folder; a second writer is refused.

    The lock is released by the kernel when its process dies, SIGKILL included, and on leaving the
    block, an exception included (the ``.lock`` file itself stays: removing it would let two
    writers lock two files of one name).
    """
    path = Path(run_dir) / ".lock"
    fh = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, fh) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def check_run_folder_free(run_dir: Path) -> None:
    """Refuse (RuntimeError) a run folder whose ``.lock`` a process holds; creates, writes and keeps
    nothing (a folder without ``.lock`` has no writer)."""
    try:
        fh = open(Path(run_dir) / ".lock")  # noqa: SIM115 - closed below; read-only, flock needs no write access
    except FileNotFoundError:
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, fh) from None
