"""A tiny text-to-image Stable Diffusion pipeline built from configs alone (no Hub, no weights).

What tests and the project's small CPU experiment fine-tune in place of a real checkpoint: the
parts of ``StableDiffusionPipeline`` at a size where a training step on a few 32x32 images takes
milliseconds on a CPU, saved with ``save_pretrained`` so that it loads as any Stable Diffusion
folder does (``StableDiffusionPipeline.from_pretrained(folder)``, offline). The tokenizer is
CLIP's byte-level BPE with no merges: every caption tokenizes to its characters.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"  # CLIP's end-of-word suffix: the last character of a word carries it
# Stable Diffusion's noise schedule (scheduler_config.json of SD 1.x and 2.x)
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map of the 256 bytes to printable characters: printable bytes stand
    for themselves, the others for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_vocabulary() -> dict[str, int]:
    """The characters' vocabulary, laid out as CLIP's: the 256 byte characters, the same with
    ``</w>``, then ``<|startoftext|>`` and ``<|endoftext|>`` (514 tokens)."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + WORD_END for c in chars), BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def byte_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over ``byte_vocabulary`` with no merges (merges.txt holds only its
    version line), padding with ``<|endoftext|>`` to ``max_length`` tokens, as CLIP's."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(byte_vocabulary(), ensure_ascii=False))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def tiny_text_encoder(vocab_size: int, hidden: int, max_length: int) -> CLIPTextModel:
    """A two-layer CLIP text transformer of width ``hidden`` (pooling at ``<|endoftext|>``)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def tiny_vae(downsample: int, channels: int = 16) -> AutoencoderKL:
    """An ``AutoencoderKL`` with 4 latent channels, halving the resolution log2(downsample) times."""
    blocks = downsample.bit_length()  # 1 + log2(downsample) blocks: each but the last halves
    if downsample < 1 or downsample != 1 << (blocks - 1):
        raise ValueError(f"vae-downsample: must be a power of two (1, 2, 4, 8), got {downsample}")
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(channels,) * blocks,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()


def tiny_unet(latent_size: int, cross_attention_dim: int, channels: tuple[int, int] = (32, 64)) -> UNet2DConditionModel:
    """A two-level ``UNet2DConditionModel`` on 4-channel latents, cross-attending to the text at
    its lower level."""
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_text_pipeline(
    folder: str | Path,
    *,
    resolution: int = 32,
    prediction_type: str = "epsilon",
    vae_downsample: int = 8,
    text_hidden: int = 32,
    max_length: int = 77,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """Build a tiny text-to-image Stable Diffusion pipeline from configs and save it to ``folder``.

    Parameters
    ----------
    folder : str | Path
        Where ``save_pretrained`` writes it (created); ``StableDiffusionPipeline.from_pretrained``
        loads it back offline.
    resolution : int (default: 32)
        The images' side in pixels (the UNet's ``sample_size`` is ``resolution / vae_downsample``).
    prediction_type : str (default: "epsilon")
        What the UNet predicts, ``epsilon`` or ``v_prediction`` (SD 2.1's), in the scheduler's config.
    vae_downsample : int (default: 8)
        The VAE's downsampling factor, a power of two (8: Stable Diffusion's).
    text_hidden : int (default: 32)
        The text encoder's width, also the UNet's ``cross_attention_dim``.
    max_length : int (default: 77)
        Tokens per caption (CLIP's 77), padded or truncated to it.
    seed : int (default: 0)
        Seeds the draw of every part's weights (the global RNG is left as it was).

    Returns
    -------
    StableDiffusionPipeline
        The pipeline as saved (no safety checker), with a ``DDIMScheduler`` on SD's schedule.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction-type: must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if resolution % vae_downsample or resolution % 8:
        raise ValueError(
            f"resolution: must be a multiple of 8 and of vae-downsample {vae_downsample}, got {resolution}"
        )
    vocab = len(byte_vocabulary())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae(vae_downsample)
        text_encoder = tiny_text_encoder(vocab, text_hidden, max_length)
        unet = tiny_unet(resolution // vae_downsample, text_hidden)
    scheduler = DDIMScheduler(
        **SD_SCHEDULE,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_tokenizer(max_length),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return pipe
