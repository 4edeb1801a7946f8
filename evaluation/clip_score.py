"""CLIP score (the paper's Table II alignment metric): 100 x the cosine of an image and its prompt.

As DCR's ``utils_ret.gen_clipscore`` (somepago/DCR, copied unchanged into liuxiao-guan/IET-AGC_SD)
computes it: OpenAI's CLIP ViT-B/16, the image embedding's and the prompt's (truncated to 77
tokens) cosine, averaged over the generations, no clipping at 0. Its images are the Sim Score's
tensors (``Resize(256), CenterCrop(224), Normalize(0.5, 0.5)``: DCR's ``ret_transform``), not
CLIP's own preprocessing (bicubic resize, CLIP's mean and std); ``crops="dcr"`` (default)
reproduces that, ``crops="processor"`` uses the model's ``CLIPImageProcessor`` (the usual CLIP
score, e.g. torchmetrics', which also clips at 0: not done here). DCR returns the mean cosine;
the paper reports it x 100 (31.27), as this module does. The model is a transformers ``CLIPModel``
(``openai/clip-vit-base-patch16`` is the same network as ``clip.load("ViT-B/16")``; DCR ran it in
fp16 on CUDA, this module in fp32) from a local folder or the Hub; when it cannot be had (offline,
missing or broken folder) ``CLIPUnavailable`` says why and callers record CLIP score as unavailable.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm.files import error_text

from .config import CLIP_MODEL  # OpenAI's ViT-B/16 in transformers' format (DCR: clip.load("ViT-B/16"))
from .crops import dcr_crops, rgb_unit

log = logging.getLogger("flwr.iet_agc.evaluation")

CROPS = ("dcr", "processor")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"


class CLIPUnavailable(RuntimeError):
    """The CLIP model, tokenizer or image processor could not be loaded; the message says why."""


@dataclass(frozen=True)
class CLIPScorer:
    """A CLIP model with its tokenizer (and, for ``crops="processor"``, its image processor)."""

    model: torch.nn.Module  # transformers.CLIPModel, in eval mode on ``device``
    tokenizer: object  # a transformers CLIP tokenizer
    image_processor: object | None  # transformers.CLIPImageProcessor; None with crops="dcr"
    source: str  # the folder or Hub id (with the Hub commit when known)
    crops: str
    device: str


def _from_pretrained(cls, name: str, what: str, label: str, options: dict):
    try:
        return cls.from_pretrained(name, **options)
    except Exception as err:  # transformers raises OSError, ValueError, safetensors' errors, ...: report, never crash
        raise CLIPUnavailable(f"{label}: cannot load its {what} ({type(err).__name__}: {error_text(err)})") from err


def load_clip(
    name_or_path: str = CLIP_MODEL,
    device: str = "cpu",
    *,
    crops: str = "dcr",
    local_files_only: bool = False,
    cache_dir: str = "",
) -> CLIPScorer:
    """A ``CLIPScorer`` from a local folder (``save_pretrained``'s layout) or a Hub id.

    A name that is not a Hub id (``owner/name``) is a folder and must exist. ``local_files_only``
    and ``cache_dir`` are passed to ``from_pretrained`` (offline, the Hub id resolves from the
    cache or not at all). Raises CLIPUnavailable naming the model and the reason.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    if crops not in CROPS:
        raise ValueError(f"crops: must be one of {', '.join(CROPS)}, got {crops!r}")
    label = f"CLIP model {name_or_path}"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        name = str(path)
    elif path.exists():
        raise CLIPUnavailable(f"{label}: not a folder (a CLIP model is a save_pretrained folder or a Hub id)")
    elif not HUB_ID.match(str(name_or_path)):
        raise CLIPUnavailable(f"{label}: no such folder (and not a Hub id)")
    else:
        name = str(name_or_path)
    options = {"local_files_only": local_files_only} | ({"cache_dir": cache_dir} if cache_dir else {})
    model = _from_pretrained(CLIPModel, name, "model", label, options)
    tokenizer = _from_pretrained(AutoTokenizer, name, "tokenizer", label, options)
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) != vocab:  # transformers 5 makes an empty CLIP tokenizer from a folder without one
        raise CLIPUnavailable(f"{label}: its tokenizer has {len(tokenizer)} tokens, its text model {vocab}")
    processor = (
        _from_pretrained(CLIPImageProcessor, name, "image processor", label, options) if crops != "dcr" else None
    )
    commit = getattr(model.config, "_commit_hash", None)
    source = f"{name}@{commit}" if commit and not path.is_dir() else name
    log.info("CLIP model %s (crops %s)", source, crops)
    return CLIPScorer(model.to(device).eval(), tokenizer, processor, source, crops, str(device))


def clip_inputs(images: torch.Tensor, scorer: CLIPScorer) -> torch.Tensor:
    """The pixel values CLIP sees: DCR crops sized to the model (224 -> Resize 256, as DCR), or
    the model's image processor on [0, 1] RGB images."""
    size = scorer.model.config.vision_config.image_size
    if scorer.crops == "dcr":
        return dcr_crops(images.to(scorer.device), resize=size * 8 // 7, crop=size)
    out = scorer.image_processor(images=rgb_unit(images.cpu()), do_rescale=False, return_tensors="pt")
    return out["pixel_values"].to(scorer.device)


def _embedding(out: object) -> torch.Tensor:
    """``get_*_features``'s projected embedding: transformers 5 returns it as ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_scores(images: torch.Tensor, prompts: list[str], scorer: CLIPScorer, batch_size: int = 64) -> torch.Tensor:
    """100 x cos(image embedding, prompt embedding) per (image, prompt) pair, as (N,) float32 on the CPU.

    ``images``: (N, C, H, W) uint8 or [0, 1]; ``prompts``: N captions (truncated to the text
    model's positions, 77 for CLIP, end token kept). Batched by ``batch_size`` pairs.
    """
    if images.shape[0] != len(prompts) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"need one prompt (a str) per image: {images.shape[0]} images, {len(prompts)} prompts")
    model, tokenizer = scorer.model, scorer.tokenizer
    length = min(int(tokenizer.model_max_length), model.config.text_config.max_position_embeddings)
    scores = []
    for s in range(0, images.shape[0], batch_size):
        pixels = clip_inputs(images[s : s + batch_size], scorer)
        text = tokenizer(
            prompts[s : s + batch_size], padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        ).to(scorer.device)
        image_emb = _embedding(model.get_image_features(pixel_values=pixels))
        text_emb = _embedding(
            model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        )
        cos = (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)
        scores.append(100.0 * cos.cpu())
    return torch.cat(scores) if scores else torch.empty(0)


def clip_score(images: torch.Tensor, prompts: list[str], scorer: CLIPScorer, batch_size: int = 64) -> float:
    """The mean of ``clip_scores``: the paper's CLIP score (DCR's ``gen_clipscore`` x 100)."""
    scores = clip_scores(images, prompts, scorer, batch_size)
    if scores.numel() == 0:
        raise ValueError("no images to score")
    return float(scores.double().mean())
