"""The server-side evaluator: DDIM samples -> MQ (eq. 12-13), copy_1/copy_5, FID (or why it is
missing), digit_fd on digits, the closest-pair grid, the ratio histogram and a Markdown report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import UNet2DModel

from ddpm.data import ImageSet
from ddpm.files import atomic_write
from ddpm.schedule import ddim_sample, draw_class_labels, model_classes
from ddpm.settings import Settings

from .bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, QualityScore
from .digit_fd import DigitFD, load_digit_fd
from .fid import FIDUnavailable, cache_dir, fid_score
from .mq import COPY_LEVELS, Neighbours, copy_scores, holdout_quantiles, mq_counts, nearest_neighbours
from .plots import plot_ratio_histogram, save_pair_grid, save_sample_grid

log = logging.getLogger("flwr.iet_agc.evaluation")  # a child of Flower's logger (flwr run --stream, flwr log)

PAIRS_LISTED = 10
RUN_FACTS = ("n_generated", "fid_reason", "report")  # what metrics.json adds to the metrics


class Evaluator(Protocol):
    """Called by the ServerApp after chosen rounds with the global model; returns metric columns.

    The ServerApp also reads the last evaluation's images (``samples.png`` of the run) and why FID
    is unavailable ("" when it is not).
    """

    last_images: torch.Tensor | None
    fid_reason: str

    def __call__(self, server_round: int, model: UNet2DModel) -> dict[str, float | None]: ...


class MemorizationEvaluator:
    """Generates ``eval-num-images`` images and reports MQ, copy_1/copy_5, FID and (digits) digit_fd.

    Keys returned: ``mq_<delta>`` per threshold, ``copy_1``/``copy_5`` when the data set has
    held-out images, ``fid`` (None when unavailable, reason in ``fid_reason``), ``digit_fd`` on
    digits; each quality figure with ``_lo``/``_hi`` (95 % bootstrap interval over the generated
    images) and ``_floor`` (the same figure for as many held-out real images; None without them).
    Each call also writes ``samples_<tag>.png``, ``pairs_<tag>.png``, ``ratios_<tag>.png``
    and ``eval_<tag>.md`` to ``out_dir``.
    """

    def __init__(self, settings: Settings, data: ImageSet, out_dir: Path, device: torch.device) -> None:
        self.settings, self.data, self.out_dir, self.device = settings, data, Path(out_dir), torch.device(device)
        self.fid_reason = "" if settings.fid else "disabled by setting fid = false"
        self.digit_fd_reason = ""
        self.last_images: torch.Tensor | None = None
        self.last_labels: torch.Tensor | None = None  # the class labels of the last samples, when conditional
        self.last_neighbours: Neighbours | None = None
        self.last_report: Path | None = None
        self.cache = cache_dir(settings.fid_cache_dir)
        self._holdout_ratio: torch.Tensor | None = None
        self._digit_fd: DigitFD | None = None
        self._fid_floor: dict[int, float | None] = {}  # per generated count: Inception on the hold-out is slow
        self.scores: dict[str, QualityScore] = {}  # the last evaluation's quality figures

    def __call__(self, server_round: int, model: UNet2DModel) -> dict[str, float | None]:
        return self.evaluate_images(self.generate(model), f"round{server_round:03d}", f"round {server_round}")

    def generate(self, model: UNet2DModel) -> torch.Tensor:
        """``eval-num-images`` DDIM samples in [0, 1], seeded by the run's seed; a class-conditional
        model gets labels drawn uniformly over its classes (kept in ``last_labels``)."""
        s = self.settings
        classes = model_classes(model)
        self.last_labels = None if classes is None else draw_class_labels(s.eval_num_images, classes, s.seed)
        return ddim_sample(
            model,
            s.eval_num_images,
            steps=s.sample_steps,
            batch_size=s.eval_batch_size,
            seed=s.seed,
            device=self.device,
            class_labels=self.last_labels,
        )

    # ---- the metrics ---------------------------------------------------------------------
    def evaluate_images(self, images: torch.Tensor, tag: str = "final", title: str = "") -> dict[str, float | None]:
        """All metrics, pictures and the report for generated ``images`` in [0, 1] (N, C, H, W)."""
        s, data = self.settings, self.data
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_images = images
        neighbours = nearest_neighbours(
            images,
            data.images,
            n=s.mq_neighbours,
            device=self.device,
            desc="nearest neighbours of the generated images",
        )
        self.last_neighbours = neighbours
        ratio = neighbours.ratio
        metrics: dict[str, float | None] = dict(mq_counts(ratio, s.thresholds))
        holdout_ratio = self.holdout_ratio()
        if holdout_ratio is not None:
            metrics.update(copy_scores(ratio, holdout_ratio))
        self.scores = {}
        metrics.update(self._columns("fid", self._fid(images)))
        if data.name == "digits":
            metrics.update(self._columns("digit_fd", self._digit_score(images)))
        pictures = {
            "samples": save_sample_grid(images, self.out_dir / f"samples_{tag}.png").name,
            "pairs": save_pair_grid(images, data.images, neighbours, self.out_dir / f"pairs_{tag}.png").name,
            "ratios": plot_ratio_histogram(
                ratio,
                holdout_ratio,
                self.out_dir / f"ratios_{tag}.png",
                s.thresholds,
                holdout_quantiles(holdout_ratio) if holdout_ratio is not None else None,
            ).name,
        }
        self.last_report = self._write_report(tag, title or tag, metrics, neighbours, holdout_ratio, pictures)
        return metrics

    def holdout_ratio(self) -> torch.Tensor | None:
        """Eq. 12 ratio of every held-out real image against the training set (computed once)."""
        if self._holdout_ratio is None and len(self.data.holdout):
            n = self.settings.mq_neighbours
            self._holdout_ratio = nearest_neighbours(
                self.data.holdout,
                self.data.images,
                n,
                device=self.device,
                desc="nearest neighbours of the held-out images",
            ).ratio
        return self._holdout_ratio

    def _columns(self, name: str, score: QualityScore | None) -> dict[str, float | None]:
        if score is None:
            return {name: None, f"{name}_lo": None, f"{name}_hi": None, f"{name}_floor": None}
        self.scores[name] = score
        return score.columns(name)

    def _fid(self, images: torch.Tensor) -> QualityScore | None:
        if self.fid_reason:  # disabled, or already failed this run: do not retry the download
            return None
        batch = self.settings.eval_batch_size if self.device.type == "cuda" else min(self.settings.eval_batch_size, 50)
        n = images.shape[0]
        floor01 = self.data.holdout if len(self.data.holdout) >= 2 and n not in self._fid_floor else None
        try:
            score = fid_score(
                images,
                self.data.images,
                self.settings.fid_weights,
                self.device,
                floor01=floor01,
                batch_size=batch,
                reference_key=f"{self.data.name}-{self.data.fingerprint}",
                cache=str(self.cache),
                seed=self.settings.seed,
            )
        except (FIDUnavailable, ValueError) as err:
            self.fid_reason = str(err)
            log.warning("FID unavailable: %s", err)
            return None
        if floor01 is not None:
            self._fid_floor[n] = score.floor
        floor_n = min(n, len(self.data.holdout)) if self._fid_floor.get(n) is not None else 0
        return dataclasses.replace(score, floor=self._fid_floor.get(n), floor_n=floor_n)

    def _digit_score(self, images: torch.Tensor) -> QualityScore | None:
        if self._digit_fd is None and not self.digit_fd_reason:
            try:
                labels = self.data.holdout_labels
                if labels is None:
                    raise ValueError("the digit classifier needs labelled held-out digits")
                self._digit_fd = load_digit_fd(
                    self.data.images, self.data.labels, self.data.holdout, labels, self.cache, self.settings.seed
                )
            except ValueError as err:
                self.digit_fd_reason = str(err)
                log.warning("digit_fd unavailable: %s", err)
        if self._digit_fd is None:
            return None
        try:
            return self._digit_fd.score(images, seed=self.settings.seed)
        except ValueError as err:  # e.g. a single generated image has no covariance
            log.warning("digit_fd unavailable: %s", err)
            return None

    # ---- the report ----------------------------------------------------------------------
    def _label_lines(self, num: int) -> list[str]:
        """The report's note on class labels: how they were drawn, when the samples are conditional."""
        labels = self.last_labels
        if labels is None or labels.numel() != num:
            return []
        classes = int(torch.unique(labels).numel())
        return [
            "Class-conditional: each image's label drawn uniformly from the model's classes "
            f"(seed {self.settings.seed}); {classes} distinct labels among the {num} images. "
            "MQ compares against the whole training set, as for an unconditional model.",
            "",
        ]

    def _write_report(
        self,
        tag: str,
        title: str,
        metrics: dict[str, float | None],
        neighbours: Neighbours,
        holdout_ratio: torch.Tensor | None,
        pictures: dict[str, str],
    ) -> Path:
        s, data = self.settings, self.data
        num = neighbours.ratio.numel()
        lines = [
            f"# Evaluation, {title}",
            "",
            f"{num} generated images (DDIM, {s.sample_steps} steps, seed {s.seed}) against the {len(data)} "
            f"training images of `{data.name}` ({data.fingerprint}); {len(data.holdout)} held-out real images.",
            "",
            *self._label_lines(num),
            *self._memorization_lines(metrics, neighbours.ratio, holdout_ratio),
            *self._quality_lines(metrics, num),
            *self._picture_lines(pictures, neighbours),
        ]
        target = self.out_dir / f"eval_{tag}.md"
        target.write_text("\n".join(lines) + "\n")
        return target

    def _memorization_lines(
        self, metrics: dict[str, float | None], ratio: torch.Tensor, holdout_ratio: torch.Tensor | None
    ) -> list[str]:
        """The report's MQ table and calibrated copy scores."""
        s, num = self.settings, ratio.numel()
        lines = [
            "## Memorization",
            "",
            f"MQ (eq. 12-13): a generated image counts when its squared distance to the nearest training image is "
            f"below delta times the mean squared distance to its n = {s.mq_neighbours} nearest (images in [0, 1]).",
            "",
            "| delta | MQ (count) | share |",
            "|---|---|---|",
        ]
        for t in s.thresholds:
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

    def _quality_lines(self, metrics: dict[str, float | None], num: int) -> list[str]:
        """The report's FID and digit_fd, with their intervals and floors (or why they are missing)."""
        lines = ["## Quality", ""]
        if "fid" in self.scores:
            lines.append(
                f"- FID: {_with_interval(self.scores['fid'])} (pytorch-fid Inception pool3, {num} generated vs "
                "training set)"
            )
        else:
            lines.append(f"- FID: unavailable ({self.fid_reason})")
        if "digit_fd" in metrics:
            if "digit_fd" in self.scores:
                acc = self._digit_fd.accuracy if self._digit_fd is not None else math.nan
                lines.append(
                    f"- digit_fd: {_with_interval(self.scores['digit_fd'])} (not FID: Fréchet distance on the features "
                    f"of a small digit classifier trained on a third of the hold-out split, {acc:.1%} accurate on the "
                    "training split; generated vs training images)"
                )
            else:
                lines.append(f"- digit_fd: unavailable ({self.digit_fd_reason or 'too few generated images'})")
        if self.scores:
            lines.append(
                f"- interval: {DEFAULT_LEVEL:.0%} percentile bootstrap over the generated images ({DEFAULT_RESAMPLES} "
                "resamples): how far the figure moves from the sample count alone. Floor: the same figure for as "
                "many held-out real images (never trained on), what a generator drawing from the data would score; "
                "Fréchet distances shrink as the count grows, so compare figures at equal counts."
            )
        return lines

    def _picture_lines(self, pictures: dict[str, str], neighbours: Neighbours) -> list[str]:
        """The report's pictures and its table of the closest pairs."""
        ratio = neighbours.ratio
        lines = [
            "",
            "## Pictures",
            "",
            f"Closest pairs (generated | nearest training image), sorted by ratio:\n\n![pairs]({pictures['pairs']})",
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


def _with_interval(score: QualityScore) -> str:
    """``4.900 (95 % interval 3.1-7.2; floor 2.0 with 500 held-out images)``."""
    floor = f"floor {score.floor:.3f} with {score.floor_n} held-out images" if score.floor is not None else "no floor"
    return f"{score.value:.3f} ({DEFAULT_LEVEL:.0%} interval {score.lo:.3f}-{score.hi:.3f}; {floor})"


def evaluate_saved(evaluator: MemorizationEvaluator, model: UNet2DModel, title: str) -> dict[str, Any]:
    """A saved model's final evaluation (``iet-agc evaluate``, a sweep's base): sample, measure, and
    write ``metrics.json`` in the evaluator's folder. Returns what it holds: the metrics and
    ``RUN_FACTS``. Progress goes to stderr, keeping stdout for the caller's one line."""
    with contextlib.redirect_stdout(sys.stderr):
        images = evaluator.generate(model)
        metrics = evaluator.evaluate_images(images, "final", title)
    summary = {
        **metrics,
        "n_generated": int(images.shape[0]),
        "fid_reason": evaluator.fid_reason,
        "report": str(evaluator.last_report),
    }
    text = json.dumps(summary, indent=1) + "\n"
    atomic_write(evaluator.out_dir / "metrics.json", lambda tmp: tmp.write_text(text))
    return summary
