"""The text-conditional family's scorers (the paper's Table II): Sim Score with its background and
share above 0.5 (SSCD, ``evaluation/sscd.py``) and CLIP score (``evaluation/clip_score.py``), each
an ``ImageScorer`` of the evaluator (``MemorizationEvaluator(..., scorers=...)``).

A scorer whose network cannot be had (``sscd-weights`` empty or refused, ``clip-model`` offline or
broken) keeps the reason, returns its columns as None (empty in ``rounds.csv``) and says why in
every ``eval_*.md``; it never fails the run and never writes a zero. The training images' SSCD
features are computed once per (data set fingerprint, SSCD file) and cached under
``fid-cache-dir``/sscd; their background (train vs train, self excluded) once per scorer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from ddpm.data import ImageSet
from ddpm.files import error_text

from .clip_score import CLIPUnavailable, clip_score, load_clip
from .columns import CLIP_SCORE, SIM_BACKGROUND, SIM_COLUMNS, SIM_SCORE, SIM_SHARE
from .config import EvalConfig
from .fid import cache_dir
from .sscd import (
    COPY_THRESHOLD,
    SIM_PERCENTILE,
    Matches,
    SSCDNetwork,
    SSCDUnavailable,
    background_scores,
    cached_features,
    load_sscd,
    sim_scores,
    sscd_features,
    summarize,
)

log = logging.getLogger("flwr.iet_agc.evaluation")


class SimScorer:
    """Sim Score (DCR's ``sim_95pc``), its train-vs-train background and the share of generations
    above 0.5, from the SSCD TorchScript file ``weights`` (the ``sscd-weights`` setting).

    ``matches`` holds the last call's best match per generation (cosine, training index): the
    pairs grid's nearest training images. ``reason`` is "" when the network loaded.
    """

    name = "Sim Score"

    def __init__(self, weights: str, device: torch.device | str = "cpu", cache: str = "", batch_size: int = 64) -> None:
        self.device, self.batch_size, self.cache = str(device), batch_size, cache_dir(cache) / "sscd"
        self.network: SSCDNetwork | None = None
        self.reason = ""
        try:
            self.network = load_sscd(weights, self.device)
        except SSCDUnavailable as err:
            self.reason = str(err)
            log.warning("Sim Score unavailable: %s", err)
        self.matches: Matches | None = None
        self._train: tuple[str, torch.Tensor] | None = None  # (data fingerprint, features)
        self._background: dict[str, float] = {}

    def train_features(self, data: ImageSet) -> torch.Tensor:
        """The training images' L2-normalised SSCD features, cached on disk and in memory."""
        if self.network is None:
            raise ValueError(f"Sim Score unavailable: {self.reason}")
        if self._train is None or self._train[0] != data.fingerprint:
            key = f"{data.name}-{data.fingerprint}-sscd-{self.network.sha256[:16]}"
            feats = cached_features(data.images, key, self.network, self.cache, self.batch_size, self.device)
            self._train, self._background = (data.fingerprint, feats), {}
        return self._train[1]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None, data: ImageSet) -> dict[str, float | None]:
        """``sim_score``, ``sim_background`` (None with fewer than 2 training images) and ``sim_share_05``."""
        self.matches = None
        if self.network is None:
            return dict.fromkeys(SIM_COLUMNS)
        try:
            train = self.train_features(data)
            gen = sscd_features(images, self.network, self.batch_size, self.device)
            self.matches = sim_scores(gen, train, device=self.device)
            if not self._background and train.shape[0] >= 2:
                self._background = summarize(background_scores(train, device=self.device).scores, prefix="bg")
        except (ValueError, RuntimeError) as err:  # a network that fails on these images: say so, never crash
            self.reason = f"SSCD network {self.network.path}: {error_text(err)}"
            log.warning("Sim Score unavailable: %s", self.reason)
            return dict.fromkeys(SIM_COLUMNS)
        mine = summarize(self.matches.scores)
        return {
            SIM_SCORE: mine[f"sim_p{SIM_PERCENTILE:g}"],
            SIM_BACKGROUND: self._background.get(f"bg_p{SIM_PERCENTILE:g}"),
            SIM_SHARE: mine[f"sim_gt_{COPY_THRESHOLD:g}"],
        }

    def report_lines(self, metrics: Mapping[str, float | None]) -> list[str]:
        """The report's Sim Score bullets: the values and the network's file and sha256, or why not."""
        if self.network is None or metrics.get(SIM_SCORE) is None:
            return [f"- Sim Score: unavailable ({self.reason})"]
        bg = metrics.get(SIM_BACKGROUND)
        return [
            f"- Sim Score (`{SIM_SCORE}`): {metrics[SIM_SCORE]:.4f}, the {SIM_PERCENTILE:g}th percentile of each "
            "generation's best SSCD cosine against the training images (DCR: Resize 256, CenterCrop 224, "
            f"Normalize 0.5; the paper: 0.34 for IET-AGC+, 0.64 for plain fine-tuning); `{SIM_SHARE}` "
            f"{metrics[SIM_SHARE]:.4f} of the generations above {COPY_THRESHOLD:g}",
            f"- background (`{SIM_BACKGROUND}`): "
            + (f"{bg:.4f}" if bg is not None else "not computed (fewer than 2 training images)")
            + ", the same percentile of each training image against the other training images",
            f"- SSCD network: `{self.network.path}` (sha256 {self.network.sha256}, {self.network.dim}-d)",
        ]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(nearest training index, cosine) per generation of the last call; None without one."""
        return None if self.matches is None else (self.matches.index, self.matches.scores)


class ClipScorer:
    """CLIP score (DCR's ``gen_clipscore`` x 100) of each generation against its prompt, from the
    ``clip-model`` folder or Hub id (empty: off). ``reason`` is "" when the model loaded."""

    name = "CLIP score"

    def __init__(self, model: str, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        self.batch_size, self.scorer, self.reason = batch_size, None, ""
        if not str(model).strip():
            self.reason = "clip-model is empty: CLIP score is off"
            return
        try:
            self.scorer = load_clip(model, str(device))
        except CLIPUnavailable as err:
            self.reason = str(err)
            log.warning("CLIP score unavailable: %s", err)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None, data: ImageSet) -> dict[str, float | None]:
        """``clip_score``: None without the model or without prompts."""
        if self.scorer is None or prompts is None:
            return {CLIP_SCORE: None}
        try:
            return {CLIP_SCORE: clip_score(images, list(prompts), self.scorer, self.batch_size)}
        except (ValueError, RuntimeError) as err:
            self.reason = f"CLIP model {self.scorer.source}: {error_text(err)}"
            log.warning("CLIP score unavailable: %s", self.reason)
            return {CLIP_SCORE: None}

    def report_lines(self, metrics: Mapping[str, float | None]) -> list[str]:
        """The report's CLIP score bullet: the value and the model, or why not."""
        if self.scorer is None or metrics.get(CLIP_SCORE) is None:
            return [f"- CLIP score: unavailable ({self.reason or 'no prompts'})"]
        return [
            f"- CLIP score (`{CLIP_SCORE}`): {metrics[CLIP_SCORE]:.2f}, 100 x the cosine of each generation and its "
            f"prompt, averaged (CLIP `{self.scorer.source}` on DCR's crops; the paper: 31.27 with OpenAI's ViT-B/16)"
        ]


def text_scorers(config: EvalConfig, device: torch.device | str) -> list[SimScorer | ClipScorer]:
    """The text-conditional family's scorers from the evaluation's settings (``sscd-weights``,
    ``clip-model``; the SSCD features' cache under ``fid-cache-dir``)."""
    return [
        SimScorer(config.sscd_weights, device, config.fid_cache_dir),
        ClipScorer(config.clip_model, device),
    ]
