"""Text-conditional latent diffusion (Stable Diffusion) as a model family behind the seam.

A ``UNet2DConditionModel`` denoises the latents of a frozen ``AutoencoderKL`` (its latent scaled
by the VAE's ``scaling_factor``), cross-attending to the hidden states of a frozen CLIP text
encoder; it predicts epsilon or v (the checkpoint scheduler's ``prediction_type``; SD 2.1: v).
As the authors' fine-tuning (liuxiao-guan/IET-AGC_SD, on diffusers' ``train_text_to_image.py``),
the per-sample loss is the mean over the latent of the squared error against that target: AGC's
eq. 8 reads one value per sample. Images still travel as pixels in [-1, 1] (TAA augments pixels;
the family encodes them); a condition is a caption's token ids or its precomputed embedding.
Sampling is diffusers' own ``StableDiffusionPipeline`` with DDIM and classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from .base import is_hub_id
from .family import Condition, Sampling, Schedule
from .progress import progress

PREDICTION_TYPES = ("epsilon", "v_prediction")
LATENTS = ("mean", "sample")
TEXT_PIPELINES = ("StableDiffusionPipeline",)  # model_index.json's _class_name this family loads
# The parts a StableDiffusionPipeline folder must hold, and the config file that proves each one.
COMPONENTS = {
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "unet": "config.json",
    "scheduler": "scheduler_config.json",
}
IMAGE_STREAM = 5  # image i's initial latent noise: seeded by (seed, IMAGE_STREAM, i)


def image_seed(seed: int, i: int) -> int:
    """The seed of image i's own generator: a function of (seed, i) alone, distinct across pairs."""
    return int(np.random.SeedSequence([seed, IMAGE_STREAM, i]).generate_state(1, np.uint64)[0])


def _frozen(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with no tensor that trains (the VAE and the text encoder)."""
    return module.requires_grad_(False).eval()


def _on(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` moved (in place) to ``device`` when its weights are elsewhere."""
    if next(module.parameters()).device != torch.device(device):
        module.to(device)
    return module


@dataclass(frozen=True, eq=False)
class TextLatentDiffusion:
    """Stable Diffusion's family: a ``UNet2DConditionModel`` on a frozen VAE's latents, conditioned
    on a frozen CLIP text encoder's hidden states, saved as a ``StableDiffusionPipeline``.

    Parameters
    ----------
    vae : AutoencoderKL
        The checkpoint's VAE (frozen here: eval mode, no gradients).
    text_encoder : CLIPTextModel
        The checkpoint's text encoder (frozen here).
    tokenizer : CLIPTokenizer
        The checkpoint's tokenizer; captions are padded or truncated to its ``model_max_length``.
    scheduler : SchedulerMixin
        The checkpoint's scheduler: its betas and ``prediction_type`` (epsilon or v_prediction)
        make the training schedule, DDIM samples on them, and the export keeps it.
    prompts : Sequence[str] (default: ())
        The captions to draw evaluation prompts from (the training captions; ``draw_condition``).
    guidance_scale : float (default: 7.5)
        Classifier-free guidance when sampling (the paper's 7.5; <= 1: none).
    resolution : int | None (default: None)
        The side of sampled images in pixels; None: the UNet's ``sample_size`` times the VAE's factor.
    latent : str (default: "mean")
        ``mean``: a training image's latent is its posterior mean (deterministic, cacheable);
        ``sample``: a draw from the posterior at every step, as the authors' script.
    source : str (default: "a Stable Diffusion checkpoint")
        The checkpoint's folder or Hub id, named in errors.
    """

    vae: AutoencoderKL = field(repr=False)
    text_encoder: CLIPTextModel = field(repr=False)
    tokenizer: CLIPTokenizer = field(repr=False)
    scheduler: Schedule = field(repr=False)
    prompts: Sequence[str] = ()
    guidance_scale: float = 7.5
    resolution: int | None = None
    latent: str = "mean"
    source: str = "a Stable Diffusion checkpoint"
    name: str = "text-latent"
    prediction_type: str = field(init=False)

    def __post_init__(self) -> None:
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(
                f"init-from: the checkpoint {self.source!r} predicts {kind!r} (its scheduler's prediction_type); "
                f"the text-conditional family trains {' or '.join(PREDICTION_TYPES)}"
            )
        if self.latent not in LATENTS:
            raise ValueError(f"latent: must be one of {', '.join(LATENTS)}, got {self.latent!r}")
        object.__setattr__(self, "prediction_type", kind)
        object.__setattr__(self, "prompts", tuple(self.prompts))
        _frozen(self.vae)
        _frozen(self.text_encoder)

    @property
    def downsample(self) -> int:
        """The VAE's downsampling factor (diffusers' ``vae_scale_factor``): 8 for Stable Diffusion."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """What the VAE's latent is multiplied by before the UNet sees it (SD 1.x/2.x: 0.18215)."""
        return float(self.vae.config.scaling_factor)

    @property
    def max_length(self) -> int:
        """Tokens per caption: the tokenizer's ``model_max_length`` (CLIP's 77)."""
        return int(self.tokenizer.model_max_length)

    @property
    def text_width(self) -> int:
        """The width of the text encoder's hidden states (the UNet's ``cross_attention_dim``)."""
        return int(self.text_encoder.config.hidden_size)

    def train_scheduler(self) -> DDPMScheduler:
        """DDPM on the checkpoint's betas and prediction type, as diffusers' training script."""
        return DDPMScheduler.from_config(self.scheduler.config)

    def latent_shape(self, images: Tensor) -> tuple[int, ...]:
        """(B, latent_channels, H/f, W/f) of a batch of pixels, from the VAE's config alone."""
        *_, h, w = images.shape
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"{self.name}: images of {h}x{w} pixels do not divide by the VAE's factor {f}")
        return (images.shape[0], int(self.vae.config.latent_channels), h // f, w // f)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> the VAE's latent times ``scaling_factor``, in fp32 under any autocast.

        ``latent = "mean"`` (default) takes the posterior's mean: deterministic, so a node can
        compute it once and cache it. The authors' diffusers script draws ``latent_dist.sample()``
        at every step instead (``latent = "sample"``, from torch's global RNG); the two differ by
        the posterior's std times a standard normal draw, small for SD's VAE.
        """
        vae = _on(self.vae, images.device)
        with torch.autocast(images.device.type, enabled=False):
            posterior = vae.encode(images.float()).latent_dist
            z = posterior.mean if self.latent == "mean" else posterior.sample()
        return z * self.scaling_factor

    def noise_like(self, images: Tensor) -> Tensor:
        """Standard normal noise in the latent's shape (``latent_shape``), without running the VAE."""
        return torch.randn(self.latent_shape(images), device=images.device, dtype=images.dtype)

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Captions -> int64 token ids (B, ``max_length``), padded and truncated as SD's training."""
        return self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.long()

    @torch.no_grad()
    def embed(self, condition: Tensor, device: torch.device | str | None = None) -> Tensor:
        """A condition -> the UNet's ``encoder_hidden_states`` (B, L, D): the frozen text encoder's
        last hidden states of token ids (fp32), or precomputed embeddings as they are."""
        device = torch.device(device) if device is not None else condition.device
        if condition.is_floating_point():
            return condition.to(device)
        encoder = _on(self.text_encoder, device)
        with torch.autocast(device.type, enabled=False):
            return encoder(condition.to(device), return_dict=False)[0]

    def check_condition(self, model: nn.Module, condition: Condition, n: int) -> Condition:
        """The captions of ``n`` training images: int64 token ids (n, L) or float embeddings
        (n, L, D), L the tokenizer's ``max_length`` and D the text encoder's width (a list of
        strings is tokenized); a ValueError says what is expected."""
        width = getattr(getattr(model, "config", None), "cross_attention_dim", None) or self.text_width
        if any(w != self.text_width for w in (width if isinstance(width, (list, tuple)) else [width])):
            raise ValueError(
                f"{self.name}: the UNet cross-attends to {width} features, the text encoder gives {self.text_width}"
            )
        if condition is None:
            raise ValueError(f"{self.name}: text-conditional: expected the captions of {n} images as {self._want(n)}")
        if isinstance(condition, (list, tuple)) and all(isinstance(c, str) for c in condition):
            condition = self.tokenize(condition)
        condition = torch.as_tensor(condition)
        shape = tuple(condition.shape)
        if condition.is_floating_point() and shape == (n, self.max_length, self.text_width):
            return condition.float()
        integer = not condition.is_floating_point() and condition.dtype not in (torch.bool, torch.uint8)
        if not integer or shape != (n, self.max_length):
            raise ValueError(f"{self.name}: expected {self._want(n)}, got {condition.dtype} of shape {shape}")
        low, high = (int(condition.min()), int(condition.max())) if n else (0, 0)
        vocab = int(self.text_encoder.config.vocab_size)
        if not 0 <= low <= high < vocab:
            raise ValueError(f"{self.name}: token ids must be in [0, {vocab - 1}], got {low}..{high}")
        return condition.long()

    def _want(self, n: int) -> str:
        """What ``check_condition`` accepts for ``n`` images, in words."""
        ids = f"token ids (int64, shape ({n}, {self.max_length}))"
        return f"{ids} or text embeddings (float, ({n}, {self.max_length}, {self.text_width}))"

    def flip_condition(self, condition: Condition, flip: Tensor) -> Condition:
        return condition  # a caption does not flip with its image

    def per_sample_loss(
        self, model: nn.Module, scheduler: Schedule, x0: Tensor, t: Tensor, noise: Tensor, condition: Condition = None
    ) -> Tensor:
        """Mean over the latent of ``(pred - target)^2`` per sample (B,): the target is the noise
        (epsilon) or ``scheduler.get_velocity(z0, noise, t)`` (v_prediction); ``x0`` is the
        encoded latent z0, the UNet cross-attends to the condition's embedding."""
        if condition is None:
            raise ValueError(f"{self.name}: text-conditional: the loss needs the captions' token ids or embeddings")
        states = self.embed(condition, x0.device)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = model(noisy, t, encoder_hidden_states=states).sample.float()  # fp32 loss under autocast (AGC reads it)
        target = noise if self.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        return (pred - target.float()).pow(2).flatten(1).mean(1)

    def draw_prompts(self, num_images: int, seed: int) -> list[str]:
        """``num_images`` of ``prompts`` drawn with replacement (the paper: 4,000 from the training
        captions with seed 42) by a torch generator seeded ``seed``; prompt i depends on (seed, i) alone."""
        if not self.prompts:
            raise ValueError(
                f"{self.name}: no prompts to sample with; give the family the training captions (prompts=...) "
                "or pass the condition to sample"
            )
        picks = torch.randint(len(self.prompts), (num_images,), generator=torch.Generator().manual_seed(seed))
        return [self.prompts[i] for i in picks.tolist()]

    def draw_condition(self, model: nn.Module, num_images: int, seed: int) -> Condition:
        """The token ids of ``draw_prompts(num_images, seed)``."""
        return self.tokenize(self.draw_prompts(num_images, seed))

    def pipeline(self, model: nn.Module) -> StableDiffusionPipeline:
        """A ``StableDiffusionPipeline`` of the family's parts with ``model`` as its UNet and the
        checkpoint's scheduler (no safety checker), on the UNet's device."""
        if not isinstance(model, UNet2DConditionModel):
            raise TypeError(f"{self.name} exports a UNet2DConditionModel, got {type(model).__name__}")
        device = next(model.parameters()).device
        return StableDiffusionPipeline(
            vae=_on(self.vae, device),
            text_encoder=_on(self.text_encoder, device),
            tokenizer=self.tokenizer,
            unet=model,
            scheduler=type(self.scheduler).from_config(self.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def image_size(self, model: nn.Module) -> int:
        """The side of sampled images: ``resolution``, or the UNet's ``sample_size`` times the VAE's factor."""
        return self.resolution or int(model.config.sample_size) * self.downsample

    @torch.no_grad()
    def sample(self, model: nn.Module, num_images: int, how: Sampling, condition: Condition = None) -> Tensor:
        """``num_images`` images in [0, 1] (B, 3, H, W) by diffusers' ``StableDiffusionPipeline``
        with DDIM (``how.steps``, eta 0) and guidance ``guidance_scale`` against the empty prompt;
        without a condition the prompts are drawn (``draw_condition(model, n, how.seed)``).

        Image i starts from the noise of its own CPU generator seeded ``image_seed(how.seed, i)``
        (the same noise on every device), so it is the same whatever the batch size but for float
        rounding.
        """
        if condition is None:
            condition = self.draw_condition(model, num_images, how.seed)
        condition = self.check_condition(model, condition, num_images)
        device = torch.device(how.device)
        pipe = self.pipeline(model.to(device).eval())
        pipe.scheduler = DDIMScheduler.from_config(self.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        size = self.image_size(model)
        negative = self.embed(self.tokenize([""]), device)
        out = []
        how.precision.prepare(model)
        with progress(num_images, f"{self.name} DDIM sampling ({how.steps} steps)", "img") as bar:
            for start in range(0, num_images, how.batch_size):
                rows = range(start, min(num_images, start + how.batch_size))
                embeds = self.embed(condition[start : rows.stop], device)
                with how.precision.autocast(device):
                    images = pipe(
                        prompt_embeds=embeds,
                        negative_prompt_embeds=negative.expand(len(rows), -1, -1),
                        height=size,
                        width=size,
                        num_inference_steps=how.steps,
                        guidance_scale=self.guidance_scale,
                        generator=[torch.Generator().manual_seed(image_seed(how.seed, i)) for i in rows],
                        output_type="pt",
                    ).images
                out.append(images.float().clamp(0, 1).cpu())
                bar.update(len(rows))
        how.precision.release(model)
        return torch.cat(out) if out else torch.empty((0, 3, size, size))


def pipeline_class(init_from: str) -> str | None:
    """The ``_class_name`` in a pipeline's ``model_index.json`` (a folder, or a Hub id's file from
    the Hub or its cache), or None when there is none to read."""
    if is_hub_id(init_from):
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(init_from, "model_index.json"))
        except Exception:  # noqa: BLE001 - offline, unknown id, no access: not known to be a text pipeline
            return None
    else:
        index = Path(init_from).expanduser() / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _component_file(init_from: str, component: str, name: str) -> Path:
    """The path of ``component/name`` in a pipeline folder, or of the Hub's copy (downloaded, or cached)."""
    if not is_hub_id(init_from):
        return Path(init_from).expanduser() / component / name
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(init_from, f"{component}/{name}"))
    except Exception as err:  # noqa: BLE001 - offline, unknown id, no access: named below
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"init-from: cannot read {component}/{name} of {init_from!r} from the Hugging Face Hub "
            f"({type(err).__name__}: {first}); without network access give a local StableDiffusionPipeline folder"
        ) from None


def text_pipeline_configs(init_from: str) -> dict[str, dict]:
    """The configs of a Stable Diffusion checkpoint's VAE and UNet, read without any weight, after
    checking that every part (``COMPONENTS``) is there: a ValueError names ``init-from`` and the
    missing or unreadable file. What the settings check compares with ``image-size``."""
    configs = {}
    for component, name in COMPONENTS.items():
        path = _component_file(init_from, component, name)
        if component == "tokenizer" and not path.is_file():  # a slow tokenizer may ship vocab.json alone
            path = _component_file(init_from, component, "vocab.json")
        if not path.is_file():
            raise ValueError(
                f"init-from: the StableDiffusionPipeline {init_from!r} lacks its {component} "
                f"(no {component}/{name}); save the whole pipeline with save_pretrained"
            )
        if component in ("vae", "unet"):
            try:
                configs[component] = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"init-from: unreadable {path} ({err})") from None
    return configs


def latent_factors(configs: dict[str, dict]) -> tuple[int, int]:
    """(the VAE's downsampling factor, the UNet's) from ``text_pipeline_configs``: an image side
    must be a multiple of their product for the UNet's levels to line up (SD: 8 x 8 = 64)."""
    vae = 2 ** (len(configs["vae"].get("block_out_channels", [0])) - 1)
    unet = 2 ** (len(configs["unet"].get("block_out_channels", [0])) - 1)
    return vae, unet


def frozen_fingerprint(family: TextLatentDiffusion) -> str:
    """A SHA-256 prefix over what a node must share with the server besides the UNet: the VAE's and
    the text encoder's configs and tensors, the tokenizer's vocabulary and the scheduler's config."""
    h = hashlib.sha256()
    for part in (family.vae, family.text_encoder):
        config = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        state = part.state_dict()
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    backend = getattr(family.tokenizer, "backend_tokenizer", None)  # vocabulary, merges, normaliser
    words = backend.to_str() if backend is not None else json.dumps(sorted(family.tokenizer.get_vocab().items()))
    h.update(words.encode())
    h.update(json.dumps(family.max_length).encode())
    schedule = {k: v for k, v in dict(family.scheduler.config).items() if not k.startswith("_")}
    h.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def is_text_pipeline(init_from: str) -> bool:
    """Whether ``init-from`` names a text-to-image pipeline this family loads (StableDiffusionPipeline)."""
    return pipeline_class(init_from) in TEXT_PIPELINES


def load_text_family(
    init_from: str,
    *,
    prompts: Sequence[str] = (),
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    latent: str = "mean",
    **load_options,
) -> tuple[UNet2DConditionModel, TextLatentDiffusion]:
    """Load a Stable Diffusion checkpoint as (its UNet, the family of its frozen parts).

    Parameters
    ----------
    init_from : str
        A ``StableDiffusionPipeline`` folder, or a Hub id passed to diffusers' ``from_pretrained``
        as it is (downloaded, or found in the Hub cache offline).
    prompts, guidance_scale, resolution, latent
        As ``TextLatentDiffusion``'s.
    **load_options
        More arguments of ``StableDiffusionPipeline.from_pretrained`` (``local_files_only``, ``revision``).

    Returns
    -------
    tuple[UNet2DConditionModel, TextLatentDiffusion]
        The UNet to train (in train mode, every tensor trainable) and the family around it.
    """
    if not is_hub_id(init_from) and not Path(init_from).expanduser().is_dir():
        raise ValueError(
            f"init-from: must be a StableDiffusionPipeline folder or a Hub id, got {init_from!r} (no such directory)"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            init_from, safety_checker=None, requires_safety_checker=False, **load_options
        )
    except Exception as err:  # noqa: BLE001 - offline, missing parts, bad files: all end here, named
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"init-from: cannot load a StableDiffusionPipeline from {init_from!r} ({type(err).__name__}: {first}); "
            "without network access give a local folder (saved with StableDiffusionPipeline.save_pretrained)"
        ) from None
    family = TextLatentDiffusion(
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.scheduler,
        prompts=prompts,
        guidance_scale=guidance_scale,
        resolution=resolution,
        latent=latent,
        source=init_from,
    )
    unet = pipe.unet
    width = unet.config.cross_attention_dim
    if width != family.text_width:
        raise ValueError(
            f"init-from: the UNet of {init_from!r} cross-attends to {width} features, its text encoder "
            f"gives {family.text_width}"
        )
    return unet.train(), family
