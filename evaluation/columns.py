"""The evaluation's columns in rounds.csv and a sweep's results.csv: their names are made here only."""

from __future__ import annotations

from collections.abc import Iterable

QUALITY_FIGURES = ("fid", "digit_fd")  # Fréchet distances, each with <name>_lo, _hi, _floor
COPY_SCORES = ("copy_1", "copy_5")
EVAL_PREFIXES = ("mq_", "copy_", *QUALITY_FIGURES)


def mq_column(delta: float) -> str:
    """The column of MQ_delta (eq. 13): ``mq_0.5``."""
    return f"mq_{delta:g}"


def evaluation_columns(columns: Iterable[str]) -> list[str]:
    """The evaluation's columns among ``columns``, in order."""
    return [c for c in columns if c.startswith(EVAL_PREFIXES)]
