"""Pictures of a run: closest generated/training pairs, ratio and skip-count histograms, the curves.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch), so they work headless and from any thread.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid, save_image

from ddpm.data import to_unit_range

from .columns import QUALITY_FIGURES
from .mq import Neighbours


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_sample_grid(images: torch.Tensor, path: Path | str, count: int = 64) -> Path:
    """The first ``count`` images in [0, 1] as an 8-wide grid; tiny images (8x8 digits) enlarged."""
    shown = images[:count].float()
    if shown.shape[-1] < 32:
        shown = torch.nn.functional.interpolate(shown, scale_factor=32 // shown.shape[-1], mode="nearest")
    save_image(shown, path, nrow=8)
    return Path(path)


def save_pair_grid(
    generated: torch.Tensor,
    train: torch.Tensor,
    neighbours: Neighbours,
    path: Path | str,
    num_pairs: int = 32,
    columns: int = 8,
) -> Path:
    """Grid of the ``num_pairs`` generated images with the smallest eq. 12 ratio, each beside its
    nearest training image (left: generated, right: training), sorted by ratio, ratio under each pair."""
    ratio = neighbours.ratio
    order = torch.argsort(ratio, stable=True)[:num_pairs]
    k = int(order.numel())
    if k == 0:
        raise ValueError("no generated images to draw")
    gen, ref = to_unit_range(generated[order]).cpu(), to_unit_range(train[neighbours.nearest[order]]).cpu()
    columns = min(columns, k)
    rows = math.ceil(k / columns)
    fig = _figure(columns * 1.5, rows * 1.15 + 0.5)
    for j in range(k):
        ax = fig.add_subplot(rows, columns, j + 1)
        pair = make_grid(torch.stack([gen[j], ref[j]]), nrow=2, padding=1, pad_value=1.0)
        ax.imshow(pair.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        tid = int(neighbours.nearest[order[j]])
        ax.set_xlabel(f"{float(ratio[order[j]]):.3f}  #{tid}", fontsize=7, labelpad=2)
    fig.suptitle("closest pairs: generated | nearest training image (#id); ratio (eq. 12) below", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    return Path(path)


def save_prompt_pair_grid(
    generated: torch.Tensor,
    train: torch.Tensor,
    nearest: torch.Tensor,
    score: torch.Tensor,
    prompts: Sequence[str],
    path: Path | str,
    *,
    measure: str,
    closest_first: str = "high",
    num_pairs: int = 16,
    columns: int = 4,
) -> Path:
    """The text family's pairs grid: the ``num_pairs`` generations closest to a training image, each
    beside its nearest one (left: generated, right: training #id) under its prompt, ``measure``'s
    value below. ``score`` orders them: ``closest_first = "high"`` for SSCD cosines (most similar
    first), ``"low"`` for the eq. 12 ratio of pixels."""
    if closest_first not in ("high", "low"):
        raise ValueError(f"closest_first: must be high or low, got {closest_first!r}")
    if not (len(prompts) == generated.shape[0] == nearest.numel() == score.numel()):
        raise ValueError(
            f"need a prompt, a nearest id and a score per generated image: {generated.shape[0]} images, "
            f"{len(prompts)} prompts, {nearest.numel()} ids, {score.numel()} scores"
        )
    order = torch.argsort(score.float(), descending=closest_first == "high", stable=True)[:num_pairs]
    k = int(order.numel())
    if k == 0:
        raise ValueError("no generated images to draw")
    gen, ref = to_unit_range(generated[order]).cpu(), to_unit_range(train[nearest[order]]).cpu()
    columns = min(columns, k)
    rows = math.ceil(k / columns)
    fig = _figure(columns * 2.6, rows * 1.9 + 0.5)
    for j in range(k):
        i = int(order[j])
        ax = fig.add_subplot(rows, columns, j + 1)
        pair = make_grid(torch.stack([gen[j], ref[j]]), nrow=2, padding=1, pad_value=1.0)
        ax.imshow(pair.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        text = prompts[i] if len(prompts[i]) <= 70 else prompts[i][:67] + "..."
        ax.set_title(textwrap.fill(text, 35), fontsize=6)
        ax.set_xlabel(f"{measure} {float(score[i]):.3f}  #{int(nearest[i])}", fontsize=7, labelpad=2)
    fig.suptitle(f"closest pairs by {measure}: generated (prompt above) | nearest training image (#id)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_ratio_histogram(
    ratio: torch.Tensor,
    holdout_ratio: torch.Tensor | None,
    path: Path | str,
    thresholds: Sequence[float] = (0.4, 0.5, 0.6),
    quantiles: Mapping[float, float] | None = None,
) -> Path:
    """Density of the eq. 12 ratio of generated images vs held-out real images, with the MQ
    thresholds (dashed) and the held-out quantiles behind copy_p (dotted)."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0.0, 1.0, 51)
    ax.hist(ratio.numpy(), bins=bins, density=True, alpha=0.6, label=f"generated ({ratio.numel()})")
    if holdout_ratio is not None and holdout_ratio.numel():
        label = f"held-out real ({holdout_ratio.numel()})"
        ax.hist(holdout_ratio.numpy(), bins=bins, density=True, alpha=0.5, label=label)
    for t in thresholds:
        ax.axvline(t, color="black", linestyle="--", linewidth=0.8)
    for p, q in (quantiles or {}).items():
        ax.axvline(q, color="tab:red", linestyle=":", linewidth=1.0)
        ax.annotate(
            f"held-out {p * 100:g} %", (q, ax.get_ylim()[1] * 0.98), fontsize=7, color="tab:red", rotation=90, va="top"
        )
    ax.set_xlabel("nearest / mean of n nearest squared distances (eq. 12)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_skip_histogram(counts: np.ndarray, path: Path | str) -> Path:
    """Histogram of how often each training sample was skipped (AGC skip counts, one per sample id)."""
    counts = np.asarray(counts).reshape(-1)
    if counts.size == 0:
        raise ValueError("counts: empty")
    if not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise ValueError("counts: must be finite and non-negative")
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    top = float(counts.max())
    if np.all(counts == np.round(counts)) and top <= 100:
        bins = np.arange(int(top) + 2) - 0.5  # one bar per integer count
    else:
        bins = 50
    ax.hist(counts, bins=bins, color="tab:blue")
    ax.set_xlabel("times skipped")
    ax.set_ylabel("training samples")
    ax.set_title(f"skip counts of {counts.size} training samples (mean {counts.mean():.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def curve_panels(rounds: pd.DataFrame) -> list[tuple[str, dict[str, pd.Series]]]:
    """The panels of ``curves.png`` from a ``rounds.csv`` table: (title, {column: values by round}).

    Train loss; skip and augmentation rates; MQ per delta; copy_1/copy_5; the quality figure (FID
    where it was measured, else digit_fd); samples moved by MSR. Evaluation columns keep only the
    rounds that were evaluated; a column never measured is left out (its panel stays empty).
    """
    if rounds.empty or "round" not in rounds:
        raise ValueError("rounds: no rounds to plot")
    quality = next((c for c in QUALITY_FIGURES if c in rounds and rounds[c].notna().any()), "fid")
    groups = [
        ("train loss (kept samples, eq. 8)", ["train_loss"]),
        ("share of drawn samples", ["skip_rate", "aug_rate"]),
        ("MQ_delta: near-copies (lower: less memorization)", [c for c in rounds if c.startswith("mq_")]),
        ("copy_1 / copy_5 (unseen real images: 0.01 / 0.05)", [c for c in rounds if c.startswith("copy_")]),
        (f"{quality} (lower: better images)", [quality]),
        ("samples moved by MSR", ["moved"]),
    ]
    panels = []
    for title, columns in groups:
        series = {}
        for column in columns:
            values = pd.to_numeric(rounds[column], errors="coerce") if column in rounds else None
            if values is not None and values.notna().any():
                series[column] = pd.Series(values.to_numpy(), index=rounds["round"].to_numpy()).dropna()
        panels.append((title, series))
    return panels


def plot_curves(rounds: pd.DataFrame, path: Path | str) -> Path:
    """``curves.png``: the panels of ``curve_panels`` in a 2 x 3 grid against the round (one round
    axis for all panels, integer ticks)."""
    panels = curve_panels(rounds)
    fig = _figure(13.0, 6.4)
    first, last = int(rounds["round"].min()), int(rounds["round"].max())
    for i, (title, series) in enumerate(panels, 1):
        ax = fig.add_subplot(2, 3, i)
        ax.set_xlim(first - 0.5, last + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for column, values in series.items():
            sparse = len(values) < len(rounds)  # evaluated rounds only: mark the points
            ax.plot(values.index, values.to_numpy(), marker="o" if sparse else None, markersize=4, label=column)
        if not series:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif len(series) > 1:
            ax.legend(fontsize=8)
        if title.startswith("copy_"):
            for level in (0.01, 0.05):
                ax.axhline(level, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
