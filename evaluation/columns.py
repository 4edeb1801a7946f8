"""The evaluation's columns in rounds.csv and a sweep's results.csv: their names are made here only."""

from __future__ import annotations

from collections.abc import Iterable

QUALITY_FIGURES = ("fid", "digit_fd")  # Fréchet distances, each with <name>_lo, _hi, _floor
COPY_SCORES = ("copy_1", "copy_5")
# The text-conditional family's columns (the paper's Table II, computed as DCR's code does):
SIM_SCORE = "sim_score"  # 95th percentile of each generation's best SSCD cosine against the training images
SIM_BACKGROUND = "sim_background"  # the same of each training image against the other training images
SIM_SHARE = "sim_share_05"  # share of generations whose best cosine is above 0.5 (DCR's sim_gt_05pc)
SIM_COLUMNS = (SIM_SCORE, SIM_BACKGROUND, SIM_SHARE)
CLIP_SCORE = "clip_score"  # 100 x CLIP ViT-B/16 cosine of each generation and its prompt, averaged
FID_AUTHORS = "fid_authors"  # the authors' double-normalised FID (DCR's metrics/fid.py), with _lo, _hi, _floor
EVAL_PREFIXES = ("mq_", "copy_", *QUALITY_FIGURES, "sim_", "clip_")  # "fid" covers fid_authors


def mq_column(delta: float) -> str:
    """The column of MQ_delta (eq. 13): ``mq_0.5``."""
    return f"mq_{delta:g}"


def evaluation_columns(columns: Iterable[str]) -> list[str]:
    """The evaluation's columns among ``columns``, in order."""
    return [c for c in columns if c.startswith(EVAL_PREFIXES)]
