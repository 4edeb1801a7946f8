"""The Markdown report of one evaluation (``eval_<tag>.md``): what was compared, MQ and the copy
scores, FID and digit_fd with their intervals and floors (or why they are missing), the pictures
and the closest pairs. Functions of the evaluation's values; the evaluator calls ``write_report``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ddpm.data import ImageSet

from .bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, QualityScore
from .columns import FID_AUTHORS
from .config import EvalConfig
from .mq import COPY_LEVELS, Neighbours, holdout_quantiles

PAIRS_LISTED = 10  # rows of the closest-pairs table


def write_report(
    target: Path,
    title: str,
    config: EvalConfig,
    data: ImageSet,
    metrics: Mapping[str, float | None],
    neighbours: Neighbours,
    holdout_ratio: torch.Tensor | None,
    pictures: Mapping[str, str],
    *,
    labels: torch.Tensor | None,
    notes: Sequence[str] = (),
    scores: Mapping[str, QualityScore],
    fid_reason: str,
    digit_fd_reason: str,
    digit_fd_accuracy: float,
    text_lines: Sequence[str] = (),
) -> Path:
    """Writes the report to ``target`` and returns it. ``pictures`` maps samples/pairs/ratios to file
    names beside it; ``scores`` holds the quality figures that were computed, the reasons say why
    the others are missing; ``digit_fd_accuracy`` is the digit classifier's (NaN without one);
    ``notes``: lines on how the images were conditioned (the text-conditional family's prompts);
    ``text_lines``: the text-to-image metrics' bullets (Sim Score, CLIP score, or why they are missing)."""
    s, num = config, neighbours.ratio.numel()
    lines = [
        f"# Evaluation, {title}",
        "",
        f"{num} generated images (DDIM, {s.sample_steps} steps, seed {s.seed}) against the {len(data)} "
        f"training images of `{data.name}` ({data.fingerprint}); {len(data.holdout)} held-out real images.",
        "",
        *label_lines(labels, num, s.seed),
        *notes,
        *memorization_lines(metrics, neighbours.ratio, holdout_ratio, s.thresholds, s.mq_neighbours),
        *quality_lines(metrics, num, scores, fid_reason, digit_fd_reason, digit_fd_accuracy),
        *(["", "## Text-to-image metrics (the paper's Table II)", "", *text_lines] if text_lines else []),
        *picture_lines(pictures, neighbours, text=bool(text_lines)),
    ]
    target.write_text("\n".join(lines) + "\n")
    return target


def label_lines(labels: torch.Tensor | None, num: int, seed: int) -> list[str]:
    """The note on class labels: how they were drawn, when the ``num`` samples are conditional."""
    if labels is None or labels.numel() != num:
        return []
    classes = int(torch.unique(labels).numel())
    return [
        "Class-conditional: each image's label drawn uniformly from the model's classes "
        f"(seed {seed}); {classes} distinct labels among the {num} images. "
        "MQ compares against the whole training set, as for an unconditional model.",
        "",
    ]


def memorization_lines(
    metrics: Mapping[str, float | None],
    ratio: torch.Tensor,
    holdout_ratio: torch.Tensor | None,
    thresholds: tuple[float, ...],
    mq_neighbours: int,
) -> list[str]:
    """The MQ table (one row per threshold) and the calibrated copy scores."""
    num = ratio.numel()
    lines = [
        "## Memorization",
        "",
        f"MQ (eq. 12-13): a generated image counts when its squared distance to the nearest training image is "
        f"below delta times the mean squared distance to its n = {mq_neighbours} nearest (images in [0, 1]).",
        "",
        "| delta | MQ (count) | share |",
        "|---|---|---|",
    ]
    for t in thresholds:
        count = int(metrics[f"mq_{t:g}"])
        lines.append(f"| {t:g} | {count} | {count / max(num, 1):.2%} |")
    lines.append("")
    if holdout_ratio is not None:
        quant = holdout_quantiles(holdout_ratio)
        parts = [
            f"`copy_{p * 100:g}` = {metrics[f'copy_{p * 100:g}']:.4f} (held-out {p:.0%} quantile {quant[p]:.4f})"
            for p in COPY_LEVELS
        ]
        lines += [
            "Calibrated score: share of generated images whose ratio is below the given quantile of the "
            "ratios of held-out real images (never seen in training). A model whose samples are no closer to "
            "the training set than unseen real images scores about 0.01 and 0.05; copies push it towards 1.",
            "",
            "- " + "\n- ".join(parts),
            f"- median ratio: generated {float(ratio.median()):.4f}, held-out {float(holdout_ratio.median()):.4f}",
            "",
        ]
    else:
        lines += ["No held-out images: `copy_1`/`copy_5` not computed.", ""]
    return lines


def quality_lines(
    metrics: Mapping[str, float | None],
    num: int,
    scores: Mapping[str, QualityScore],
    fid_reason: str,
    digit_fd_reason: str,
    digit_fd_accuracy: float,
) -> list[str]:
    """FID and digit_fd (digit_fd when ``metrics`` has it), with intervals and floors or why they are missing."""
    lines = ["## Quality", ""]
    if "fid" in scores:
        lines.append(
            f"- FID: {with_interval(scores['fid'])} (pytorch-fid Inception pool3, {num} generated vs training set)"
        )
    else:
        lines.append(f"- FID: unavailable ({fid_reason})")
    if FID_AUTHORS in metrics:
        lines.append(authors_fid_line(scores.get(FID_AUTHORS), num, fid_reason))
    if "digit_fd" in metrics:
        if "digit_fd" in scores:
            lines.append(
                f"- digit_fd: {with_interval(scores['digit_fd'])} (not FID: Fréchet distance on the features "
                f"of a small digit classifier trained on a third of the hold-out split, {digit_fd_accuracy:.1%} "
                "accurate on the training split; generated vs training images)"
            )
        else:
            lines.append(f"- digit_fd: unavailable ({digit_fd_reason or 'too few generated images'})")
    if scores:
        lines.append(
            f"- interval: {DEFAULT_LEVEL:.0%} split-sample interval over the generated images (the figure +- z sd, "
            f"sd from {DEFAULT_RESAMPLES} random splits into halves and quarters): how far the figure moves between "
            "independent sets of as many generated images, the sample count alone. Floor: the same figure for as "
            "many held-out real images (never trained on), what a generator drawing from the data would score; "
            "Fréchet distances shrink as the count grows, so compare figures at equal counts."
        )
    return lines


def authors_fid_line(score: QualityScore | None, num: int, fid_reason: str) -> str:
    """The bullet of the authors' FID (``fid_authors``), labelled apart from pytorch-fid's."""
    what = (
        "the authors' FID (DCR's metrics/fid.py: inputs normalised twice, the Inception network sees [-3, 1]; "
        "NOT comparable with the FID above; the paper's 16.3)"
    )
    if score is None:
        return f"- fid_authors: unavailable ({fid_reason or 'too few generated images'}); {what}"
    return f"- fid_authors: {with_interval(score)}, {what}, {num} generated vs training set"


def picture_lines(pictures: Mapping[str, str], neighbours: Neighbours, text: bool = False) -> list[str]:
    """The pictures and the table of the ``PAIRS_LISTED`` closest pairs, by ratio (``text``: the
    pairs grid shows each generation's prompt and its nearest training image by SSCD, or by pixels)."""
    ratio = neighbours.ratio
    grid = (
        "Closest pairs (generated with its prompt | nearest training image by SSCD cosine, or by the pixel "
        "ratio when SSCD is unavailable)"
        if text
        else "Closest pairs (generated | nearest training image), sorted by ratio"
    )
    lines = [
        "",
        "## Pictures",
        "",
        f"{grid}:\n\n![pairs]({pictures['pairs']})",
        "",
        f"Ratios, generated vs held-out:\n\n![ratios]({pictures['ratios']})",
        "",
        f"Samples:\n\n![samples]({pictures['samples']})",
        "",
        "## Closest pairs",
        "",
        "| rank | generated # | training id | ratio | squared distance |",
        "|---|---|---|---|---|",
    ]
    order = torch.argsort(ratio, stable=True)[:PAIRS_LISTED]
    for rank, i in enumerate(order.tolist(), 1):
        tid, dist = int(neighbours.nearest[i]), float(neighbours.dist[i, 0])
        lines.append(f"| {rank} | {i} | {tid} | {float(ratio[i]):.4f} | {dist:.4g} |")
    return lines


def with_interval(score: QualityScore) -> str:
    """``4.900 (95 % interval 3.1-7.2; floor 2.0 with 500 held-out images)``."""
    floor = f"floor {score.floor:.3f} with {score.floor_n} held-out images" if score.floor is not None else "no floor"
    return f"{score.value:.3f} ({DEFAULT_LEVEL:.0%} interval {score.lo:.3f}-{score.hi:.3f}; {floor})"
