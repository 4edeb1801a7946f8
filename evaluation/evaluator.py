"""The server-side evaluator: DDIM samples -> MQ (eq. 12-13), copy_1/copy_5, FID (or why it is
missing), digit_fd on digits, the closest-pair grid, the ratio histogram and a Markdown report
(evaluation/report.py); each evaluation returns an ``Evaluation``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import UNet2DModel
from torch import nn

from ddpm.data import ImageSet
from ddpm.family import PIXEL_DDPM, DiffusionFamily, Sampling
from ddpm.files import atomic_write
from ddpm.precision import Precision, choose, fill_batch_size, resolve_precision

from .bootstrap import QualityScore
from .columns import FID_AUTHORS
from .config import EvalConfig
from .digit_fd import DigitFD, load_digit_fd
from .fid import FIDUnavailable, cache_dir, fid_score
from .mq import Neighbours, copy_scores, holdout_quantiles, mq_counts, nearest_neighbours
from .plots import plot_ratio_histogram, save_pair_grid, save_prompt_pair_grid, save_sample_grid
from .report import write_report

log = logging.getLogger("flwr.iet_agc.evaluation")  # a child of Flower's logger (flwr run --stream, flwr log)
INCEPTION_SIZE = 23_885_392  # pytorch-fid's FID Inception's parameters (auto's rule, when no sampling ran)

RUN_FACTS = ("n_generated", "fid_reason", "unavailable", "report")  # what metrics.json adds to the metrics


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's results: the metric columns, the images measured (and their class labels,
    when conditional), their nearest training images, the quality figures computed and the report."""

    metrics: dict[str, float | None]
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor | None  # the class label of each image; None: unconditional
    neighbours: Neighbours
    scores: dict[str, QualityScore]  # "fid", "digit_fd": those that could be computed
    report: Path  # eval_<tag>.md
    prompts: list[str] | None = None  # the text-conditional family: each image's prompt; None otherwise


class ImageScorer(Protocol):
    """More columns of an evaluation, from the generated images (N, 3, H, W) in [0, 1], their
    prompts (None: not text-conditional) and the data set: the hook where the text-conditional
    metrics (Sim Score and its background, CLIP score; issue 20) join ``rounds.csv``. A scorer
    returns its columns (None: unavailable, its reason in its own log line); name them with a
    prefix that ``evaluation.columns.EVAL_PREFIXES`` lists so that a sweep's results carry them.
    Optional: ``report_lines(metrics) -> list[str]`` (its bullets in ``eval_*.md``: the values, or
    why they are missing) and ``pairs() -> (nearest training index, similarity) | None`` (the text
    family's pairs grid then shows those neighbours; ``evaluation.text_metrics.SimScorer``'s)."""

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str] | None, data: ImageSet
    ) -> dict[str, float | None]: ...


class Evaluator(Protocol):
    """Called by the ServerApp after chosen rounds with the global model; returns the ``Evaluation``
    (Flower gets its metrics, the run's ``samples.png`` the last one's images). ``fid_reason`` says
    why FID is unavailable ("" when it is not)."""

    fid_reason: str

    def __call__(self, server_round: int, model: UNet2DModel) -> Evaluation: ...


class MemorizationEvaluator:
    """Generates ``eval-num-images`` images and reports MQ, copy_1/copy_5, FID and (digits) digit_fd.

    Metric keys: ``mq_<delta>`` per threshold, ``copy_1``/``copy_5`` when the data set has
    held-out images, ``fid`` (None when unavailable, reason in ``fid_reason``), ``digit_fd`` on
    digits, ``fid_authors`` (the authors' double-normalised FID) for a text-conditional family,
    and the scorers' columns; each quality figure with ``_lo``/``_hi`` (95 % split-sample interval over the generated
    images) and ``_floor`` (the same figure for as many held-out real images; None without them).
    Each evaluation also writes ``samples_<tag>.png``, ``pairs_<tag>.png``, ``ratios_<tag>.png``
    and ``eval_<tag>.md`` to ``out_dir``. ``fid_reason`` and ``digit_fd_reason`` belong to the
    evaluator, not to one evaluation: FID off by setting, or failed once (not retried this run).

    Parameters
    ----------
    config : EvalConfig
        What an evaluation reads (``eval_config(settings)`` in the app): image count, batch size,
        DDIM steps, seed, n and the deltas of MQ, FID's switch, weights and cache.
    data : ImageSet
        The training images (MQ's and FID's reference) and the held-out real images (the copy
        scores' calibration, the floors, digit_fd's classifier); none held out: no copy scores.
    out_dir : Path
        Where each evaluation's pictures and report go (made when missing).
    device : torch.device
        Where sampling, the nearest-neighbour search, the Inception network and the interval's splits run.
    family : DiffusionFamily (default: PIXEL_DDPM)
        The model family: how a model samples and what conditions it. The text-conditional family
        samples each image from a prompt drawn from the training captions (its ``draw_prompts``
        with the run's seed) at its resolution (``image-size``); MQ and the copy scores compare
        those pixels with the training images as for any family.
    scorers : Sequence[ImageScorer] (default: ())
        More metrics, each adding its columns to every evaluation (``ImageScorer``).
    """

    def __init__(
        self,
        config: EvalConfig,
        data: ImageSet,
        out_dir: Path,
        device: torch.device,
        family: DiffusionFamily = PIXEL_DDPM,
        scorers: Sequence[ImageScorer] = (),
    ) -> None:
        self.config, self.data, self.out_dir, self.device = config, data, Path(out_dir), torch.device(device)
        self.family, self.scorers = family, tuple(scorers)
        self.fid_reason = "" if config.fid else "disabled by setting fid = false"
        self.digit_fd_reason = ""
        self.cache = cache_dir(config.fid_cache_dir)
        self._holdout_ratio: torch.Tensor | None = None
        self._digit_fd: DigitFD | None = None
        self._fid_floor: dict[tuple[bool, int], float | None] = {}  # per (authors' variant, count): Inception is slow
        self._batch: int | None = None  # eval-batch-size auto, once found
        self._precision: Precision | None = None  # what the last sampling ran in (FID's features follow it)

    def __call__(self, server_round: int, model: UNet2DModel) -> Evaluation:
        """Samples ``model`` and evaluates the images as ``round<NNN>``."""
        images, labels = self.generate(model)
        tag, title, prompts = f"round{server_round:03d}", f"round {server_round}", self.prompts()
        labels = None if prompts is not None else labels  # token ids are no class labels: the prompts say it
        return self.evaluate_images(images, tag, title, labels=labels, prompts=prompts)

    def prompts(self) -> list[str] | None:
        """The prompts ``generate`` samples with, image i's i-th (the text-conditional family's
        ``draw_prompts`` with the run's seed); None for a family without prompts."""
        draw = getattr(self.family, "draw_prompts", None)
        return None if draw is None else draw(self.config.eval_num_images, self.config.seed)

    def generate(self, model: UNet2DModel) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``eval-num-images`` DDIM samples in [0, 1], seeded by the run's seed, and their class labels: a
        class-conditional model gets labels drawn uniformly over its classes (None: unconditional)."""
        s = self.config
        labels = self.family.draw_condition(model, s.eval_num_images, s.seed)
        precision = self._precision = choose(s.precision, s.channels_last, s.compile, self.device, model)
        how = Sampling(s.sample_steps, self.batch_size(model, precision), s.seed, self.device, precision)
        return self.family.sample(model, s.eval_num_images, how, condition=labels), labels

    def batch_size(self, model: nn.Module, precision: Precision) -> int:
        """``eval-batch-size``, or (0, auto) what fills the device (``fill_batch_size``), found once."""
        if self.config.eval_batch_size:
            return self.config.eval_batch_size
        if self._batch is None:
            self._batch = fill_batch_size(lambda b: self._probe(model, precision, b), self.device)
            log.info("eval-batch-size auto: %d images per DDIM batch on %s", self._batch, self.device)
        return self._batch

    @torch.no_grad()
    def _probe(self, model: nn.Module, precision: Precision, batch: int) -> None:
        """One forward of ``model`` at ``batch`` images (its memory sizes the auto batch); a
        family whose model is no ``UNet2DModel`` (Stable Diffusion's: text encoder, guidance and
        VAE decoder around the UNet) samples one DDIM step of ``batch`` images instead."""
        if not isinstance(model, UNet2DModel):
            self.family.sample(model, batch, Sampling(1, batch, 0, self.device, precision))
            return
        model = model.to(self.device).eval()
        cfg = model.config
        x = torch.zeros(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=self.device)
        t = torch.zeros(batch, dtype=torch.long, device=self.device)
        labels = self.family.draw_condition(model, batch, 0)
        extra = {} if labels is None else {"class_labels": labels.to(self.device)}
        with precision.autocast(self.device):
            model(x, t, **extra)

    # ---- the metrics ---------------------------------------------------------------------
    def evaluate_images(
        self,
        images: torch.Tensor,
        tag: str = "final",
        title: str = "",
        *,
        labels: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Evaluation:
        """All metrics, pictures and the report for generated ``images`` in [0, 1] (N, C, H, W);
        ``labels``: their class labels, when the model is conditional (the report notes them);
        ``prompts``: the text each image was sampled from (text-conditional)."""
        s, data = self.config, self.data
        self.out_dir.mkdir(parents=True, exist_ok=True)
        neighbours = nearest_neighbours(
            images,
            data.images,
            n=s.mq_neighbours,
            device=self.device,
            desc="nearest neighbours of the generated images",
        )
        ratio = neighbours.ratio
        metrics: dict[str, float | None] = dict(mq_counts(ratio, s.thresholds))
        holdout_ratio = self.holdout_ratio()
        if holdout_ratio is not None:
            metrics.update(copy_scores(ratio, holdout_ratio))
        scores = self._quality(images, text=prompts is not None)
        for name, score in scores.items():
            metrics.update(_columns(name, score))
        scores = {name: score for name, score in scores.items() if score is not None}
        for scorer in self.scorers:  # the text-conditional metrics (Sim Score, CLIP score) plug in here
            metrics.update(scorer(images, prompts, data))
        pictures = self._pictures(images, tag, neighbours, holdout_ratio, prompts)
        report = write_report(
            self.out_dir / f"eval_{tag}.md",
            title or tag,
            s,
            data,
            metrics,
            neighbours,
            holdout_ratio,
            pictures,
            labels=labels,
            notes=self._prompt_notes(prompts, images.shape[0]),
            scores=scores,
            fid_reason=self.fid_reason,
            digit_fd_reason=self.digit_fd_reason,
            digit_fd_accuracy=self._digit_fd.accuracy if self._digit_fd is not None else math.nan,
            text_lines=self._text_lines(metrics) if prompts is not None else (),
        )
        listed = None if prompts is None else list(prompts)
        return Evaluation(metrics, images, labels, neighbours, scores, report, listed)

    def _quality(self, images: torch.Tensor, text: bool) -> dict[str, QualityScore | None]:
        """FID; the authors' double-normalised FID for the text-conditional family (``text``);
        digit_fd on digits."""
        scores = {"fid": self._fid(images)}
        if text:
            scores[FID_AUTHORS] = self._fid(images, authors=True)
        if self.data.name == "digits":
            scores["digit_fd"] = self._digit_score(images)
        return scores

    def _pictures(
        self,
        images: torch.Tensor,
        tag: str,
        neighbours: Neighbours,
        holdout_ratio: torch.Tensor | None,
        prompts: Sequence[str] | None,
    ) -> dict[str, str]:
        """samples, pairs and ratios PNGs; the text family's pairs carry each generation's prompt and
        its nearest training image by SSCD (a scorer's ``pairs()``), by pixels when SSCD is unavailable."""
        s, pairs = self.config, self.out_dir / f"pairs_{tag}.png"
        if prompts is None:
            save_pair_grid(images, self.data.images, neighbours, pairs)
        else:
            found = self._sscd_pairs()
            nearest, score = found if found is not None else (neighbours.nearest, neighbours.ratio)
            measure, first = ("SSCD cosine", "high") if found is not None else ("pixel ratio (eq. 12)", "low")
            save_prompt_pair_grid(
                images, self.data.images, nearest, score, prompts, pairs, measure=measure, closest_first=first
            )
        quantiles = holdout_quantiles(holdout_ratio) if holdout_ratio is not None else None
        histogram = self.out_dir / f"ratios_{tag}.png"
        return {
            "samples": save_sample_grid(images, self.out_dir / f"samples_{tag}.png").name,
            "pairs": pairs.name,
            "ratios": plot_ratio_histogram(neighbours.ratio, holdout_ratio, histogram, s.thresholds, quantiles).name,
        }

    def _sscd_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(nearest training index, similarity) per generation from the first scorer that has them
        (``SimScorer.pairs``: SSCD's best matches), or None."""
        for scorer in self.scorers:
            pairs = getattr(scorer, "pairs", None)
            found = pairs() if callable(pairs) else None
            if found is not None:
                return found
        return None

    def _text_lines(self, metrics: dict[str, float | None]) -> list[str]:
        """The report's text-to-image metrics: each scorer's lines (its values, or why it is unavailable)."""
        lines = [line for scorer in self.scorers for line in getattr(scorer, "report_lines", lambda m: [])(metrics)]
        return lines or ["- Sim Score and CLIP score: no scorer was given to this evaluation"]

    def _prompt_notes(self, prompts: Sequence[str] | None, num: int) -> list[str]:
        """The report's note on how text-conditional samples were prompted ([] without prompts)."""
        if prompts is None:
            return []
        guidance = getattr(self.family, "guidance_scale", None)
        guided = f"classifier-free guidance {guidance:g} against the empty prompt" if guidance else "no guidance"
        return [
            f"Text-conditional: each image's prompt drawn with replacement from the first captions of the "
            f"{len(self.data)} training images (seed {self.config.seed}), {guided}; {len(set(prompts))} distinct "
            f"prompts among the {num} images. MQ and the copy scores compare the generated pixels with the "
            "training images, as for an unconditional model.",
            "",
        ]

    def holdout_ratio(self) -> torch.Tensor | None:
        """Eq. 12 ratio of every held-out real image against the training set (computed once)."""
        if self._holdout_ratio is None and len(self.data.holdout):
            n = self.config.mq_neighbours
            self._holdout_ratio = nearest_neighbours(
                self.data.holdout,
                self.data.images,
                n,
                device=self.device,
                desc="nearest neighbours of the held-out images",
            ).ratio
        return self._holdout_ratio

    def _fid(self, images: torch.Tensor, authors: bool = False) -> QualityScore | None:
        """pytorch-fid's FID, or (``authors``) the authors' double-normalised variant, with its
        interval and floor; None when FID is off or its weights cannot be had (``fid_reason``)."""
        if self.fid_reason:  # disabled, or already failed this run: do not retry the download
            return None
        batch = self._batch or self.config.eval_batch_size or 256
        batch = batch if self.device.type == "cuda" else min(batch, 50)
        precision = self._precision or Precision(resolve_precision(self.config.precision, self.device, INCEPTION_SIZE))
        n, key = images.shape[0], (authors, images.shape[0])
        floor01 = self.data.holdout if len(self.data.holdout) >= 2 and key not in self._fid_floor else None
        try:
            score = fid_score(
                images,
                self.data.images,
                self.config.fid_weights,
                self.device,
                floor01=floor01,
                batch_size=batch,
                reference_key=f"{self.data.name}-{self.data.fingerprint}",
                cache=str(self.cache),
                seed=self.config.seed,
                precision=precision,
                authors_variant=authors,
            )
        except (FIDUnavailable, ValueError) as err:
            self.fid_reason = str(err)
            log.warning("FID unavailable: %s", err)
            return None
        if floor01 is not None:
            self._fid_floor[key] = score.floor
        floor_n = min(n, len(self.data.holdout)) if self._fid_floor.get(key) is not None else 0
        return dataclasses.replace(score, floor=self._fid_floor.get(key), floor_n=floor_n)

    def _digit_score(self, images: torch.Tensor) -> QualityScore | None:
        if self._digit_fd is None and not self.digit_fd_reason:
            try:
                labels = self.data.holdout_labels
                if labels is None:
                    raise ValueError("the digit classifier needs labelled held-out digits")
                self._digit_fd = load_digit_fd(
                    self.data.images, self.data.labels, self.data.holdout, labels, self.cache, self.config.seed
                )
            except ValueError as err:
                self.digit_fd_reason = str(err)
                log.warning("digit_fd unavailable: %s", err)
        if self._digit_fd is None:
            return None
        try:
            return self._digit_fd.score(images, seed=self.config.seed)
        except ValueError as err:  # e.g. a single generated image has no covariance
            log.warning("digit_fd unavailable: %s", err)
            return None


def _columns(name: str, score: QualityScore | None) -> dict[str, float | None]:
    """``score``'s rounds.csv columns, all None when it could not be computed."""
    if score is None:
        return {name: None, f"{name}_lo": None, f"{name}_hi": None, f"{name}_floor": None}
    return score.columns(name)


def evaluate_saved(evaluator: MemorizationEvaluator, model: UNet2DModel, title: str) -> dict[str, Any]:
    """A saved model's final evaluation (``iet-agc evaluate``, a sweep's base): sample, measure, and
    write ``metrics.json`` in the evaluator's folder. Progress goes to stderr, keeping stdout for the
    caller's one line.

    Parameters
    ----------
    evaluator : MemorizationEvaluator
        Samples and measures; its ``out_dir`` receives the pictures, ``eval_final.md`` and ``metrics.json``.
    model : UNet2DModel
        The saved model's UNet (adapters folded in).
    title : str
        The report's title, e.g. the pipeline folder and the number of images.

    Returns what ``metrics.json`` holds: the metrics and ``RUN_FACTS`` (image count, ``fid_reason``,
    ``unavailable``: each scorer's reason by its name, e.g. ``{"Sim Score": "sscd-weights is empty: ..."}``,
    report path).
    """
    with contextlib.redirect_stdout(sys.stderr):
        images, labels = evaluator.generate(model)
        prompts = evaluator.prompts()
        labels = None if prompts is not None else labels
        result = evaluator.evaluate_images(images, "final", title, labels=labels, prompts=prompts)
    summary = {
        **result.metrics,
        "n_generated": int(images.shape[0]),
        "fid_reason": evaluator.fid_reason,
        "unavailable": {
            getattr(s, "name", type(s).__name__): s.reason for s in evaluator.scorers if getattr(s, "reason", "")
        },
        "report": str(result.report),
    }
    text = json.dumps(summary, indent=1) + "\n"
    atomic_write(evaluator.out_dir / "metrics.json", lambda tmp: tmp.write_text(text))
    return summary
