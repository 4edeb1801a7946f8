"""CLIP score: a tiny ``CLIPModel`` saved with ``save_pretrained`` beside the byte-level tokenizer,
loaded through the real loader, checked against a hand computation of 100 x cosine; DCR's crops
and the processor's; the unavailable reasons (missing, broken folders, an offline Hub id)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from ddpm.text_pipeline import byte_tokenizer, byte_vocabulary
from evaluation.clip_score import CLIPUnavailable, clip_inputs, clip_score, clip_scores, load_clip

PROMPTS = ["a red square", "two dogs on grass", "x"]


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A two-layer CLIP (width 32, 16-d embeddings) over the byte vocabulary, 224 px, 32 px patches."""
    vocab = len(byte_vocabulary())
    text = {"vocab_size": vocab, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**text, **common, "max_position_embeddings": 77},
        vision_config={**common, "image_size": 224, "patch_size": 32},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tiny_clip().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hand_score(model: CLIPModel, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 x cos by hand: DCR's crop of a 256 px image is its central 224 px, (x - 0.5) / 0.5; the
    image embedding is the class token's, post-layer-normed and projected; the prompt's is the
    first end token's, projected."""
    pixels = (images[..., 16:240, 16:240] - 0.5) / 0.5
    tokens = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
    image = model.visual_projection(model.vision_model.post_layernorm(tokens))
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    eos = (ids == tokenizer.convert_tokens_to_ids("<|endoftext|>")).int().argmax(dim=1)
    assert eos.tolist() == [1 + len(p.replace(" ", "")) for p in prompts]  # a token a character, after the start
    hidden = model.text_model(input_ids=ids).last_hidden_state
    text = model.text_projection(hidden[torch.arange(len(prompts)), eos])
    return 100 * (image @ text.T).diagonal() / (image.norm(dim=1) * text.norm(dim=1))


def test_clip_score_is_100_times_the_cosine(clip_folder, images):
    scorer = load_clip(str(clip_folder))
    assert scorer.crops == "dcr" and scorer.image_processor is None and scorer.source == str(clip_folder)
    expected = hand_score(scorer.model, scorer.tokenizer, images, PROMPTS)
    got = clip_scores(images, PROMPTS, scorer, batch_size=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert clip_score(images, PROMPTS, scorer) == pytest.approx(float(expected.double().mean()), abs=1e-4)
    # uint8 images and one pair a batch: the same scores
    as_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(
        clip_scores(as_uint8, PROMPTS, scorer, batch_size=1), clip_scores(as_uint8, PROMPTS, scorer)
    )
    # a prompt longer than 77 tokens is truncated (its end token kept) rather than refused
    long = clip_scores(images[:1], ["a" * 200], scorer)
    torch.testing.assert_close(long, clip_scores(images[:1], ["a" * 300], scorer), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="one prompt"):
        clip_scores(images, PROMPTS[:2], scorer)


def test_the_images_are_dcrs_crops_or_the_processors(clip_folder):
    """Default: Resize(256), CenterCrop(224), Normalize(0.5, 0.5) (DCR's ret_transform); with
    ``crops="processor"``: the model's CLIPImageProcessor (CLIP's mean and std)."""
    x = torch.rand(2, 3, 300, 200, generator=torch.Generator().manual_seed(2))
    dcr = load_clip(str(clip_folder))
    pixels = clip_inputs(x, dcr)
    assert pixels.shape == (2, 3, 224, 224) and pixels.min() >= -1 and pixels.max() <= 1
    scorer = load_clip(str(clip_folder), crops="processor")
    expected = CLIPImageProcessor.from_pretrained(clip_folder)(images=x, do_rescale=False, return_tensors="pt")
    torch.testing.assert_close(clip_inputs(x, scorer), expected["pixel_values"])
    assert not torch.allclose(clip_inputs(x, scorer), pixels, atol=1e-2)  # another crop, another normalisation
    assert clip_scores(x, PROMPTS[:2], scorer).shape == (2,)
    with pytest.raises(ValueError, match="crops: must be one of dcr, processor"):
        load_clip(str(clip_folder), crops="pil")


def test_unavailable_reasons(tmp_path, clip_folder):
    with pytest.raises(CLIPUnavailable, match="missing: no such folder"):
        load_clip(str(tmp_path / "missing"))
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    with pytest.raises(CLIPUnavailable, match="weights.bin: not a folder"):
        load_clip(str(a_file))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CLIPUnavailable, match="broken: cannot load its model"):
        load_clip(str(broken))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(tiny_clip().config.to_dict()))
    (no_weights / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CLIPUnavailable, match="no-weights: cannot load its model"):
        load_clip(str(no_weights))
    model_only = tmp_path / "model-only"
    tiny_clip().save_pretrained(model_only)
    with pytest.raises(CLIPUnavailable, match="model-only: its tokenizer has 2 tokens, its text model 514"):
        load_clip(str(model_only))
    byte_tokenizer().save_pretrained(model_only)
    assert load_clip(str(model_only)).image_processor is None  # DCR's crops need no processor
    with pytest.raises(CLIPUnavailable, match="model-only: cannot load its image processor"):
        load_clip(str(model_only), crops="processor")
    # offline: the Hub id resolves from an (empty) cache or not at all, and never reaches the network
    with pytest.raises(CLIPUnavailable, match="openai/clip-vit-base-patch16: cannot load its model .*OSError"):
        load_clip("openai/clip-vit-base-patch16", local_files_only=True, cache_dir=str(tmp_path / "hub"))


def test_scores_follow_the_pairing(clip_folder, images):
    """Each image is scored against its own prompt: swapping prompts swaps the scores."""
    scorer = load_clip(str(clip_folder))
    forward = clip_scores(images[:2], PROMPTS[:2], scorer)
    crossed = clip_scores(images[:2].flip(0), PROMPTS[:2][::-1], scorer)
    torch.testing.assert_close(crossed, forward.flip(0))
    assert not torch.allclose(clip_scores(images[:2], PROMPTS[1::-1], scorer), forward)  # other pairs, other scores
