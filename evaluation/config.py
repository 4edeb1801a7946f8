"""What the server-side evaluation reads: the few settings of sampling, MQ and FID, as plain values
(the app's ``eval_config(settings)`` makes one; a notebook can write one by hand)."""

from __future__ import annotations

from dataclasses import dataclass

CLIP_MODEL = "openai/clip-vit-base-patch16"  # OpenAI's ViT-B/16, the paper's CLIP score (evaluation/clip_score.py)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation of a model (the CPU preset's defaults).

    Parameters
    ----------
    eval_num_images : int (default: 500)
        Images generated per evaluation.
    eval_batch_size : int (default: 0)
        Images per DDIM batch (and per Inception batch on CUDA; at most 50 elsewhere); 0: auto
        (``ddpm.precision.fill_batch_size``: filling half the free GPU memory, 256 off CUDA).
    sample_steps : int (default: 50)
        DDIM steps.
    seed : int (default: 0)
        Seeds the initial noise (image i depends on (seed, i) alone), the class labels drawn for a
        conditional model and the interval's random splits.
    mq_neighbours : int (default: 50)
        n of eq. 12: the nearest training images in the ratio's denominator.
    thresholds : tuple[float, ...] (default: (0.4, 0.5, 0.6))
        The deltas of MQ_delta (eq. 13), each in (0, 1].
    fid : bool (default: True)
        Measure FID (needs the Inception weights: downloaded once, or ``fid_weights``).
    fid_weights : str (default: "")
        A local copy of pytorch-fid's Inception weights ("" downloads them once).
    fid_cache_dir : str (default: "")
        Where training-set FID statistics and the digit classifier are cached ("" is ``~/.cache/iet-agc``).
    precision : str (default: "auto")
        DDIM's and the Inception network's forward under autocast (``ddpm.precision``); the kNN
        and digit_fd's small classifier stay fp32.
    channels_last : str (default: "auto")
        NHWC weights while sampling (``ddpm.precision.resolve_channels_last``).
    compile : bool (default: False)
        ``torch.compile`` the network's forward while sampling.
    sscd_weights : str (default: "")
        The text-conditional family's SSCD TorchScript file (Sim Score); "": Sim Score unavailable.
    clip_model : str (default: CLIP_MODEL)
        The text-conditional family's CLIP model (a folder or a Hub id; CLIP score); "": off.
    """

    eval_num_images: int = 500
    eval_batch_size: int = 0
    sample_steps: int = 50
    seed: int = 0
    mq_neighbours: int = 50
    thresholds: tuple[float, ...] = (0.4, 0.5, 0.6)
    fid: bool = True
    fid_weights: str = ""
    fid_cache_dir: str = ""
    precision: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    sscd_weights: str = ""
    clip_model: str = CLIP_MODEL
