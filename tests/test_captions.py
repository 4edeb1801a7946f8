"""Captioned image folders (issue 20): metadata.jsonl and DCR's captions JSON, their order,
fingerprint, errors, centre crop and decoded copy on disk."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import data_cache
from ddpm.captions import captions_for, first_captions
from ddpm.data import ImageSet, load_dataset


@pytest.fixture(autouse=True)
def _fresh():
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


def _images(root: Path, names, size=(6, 6)) -> Path:
    """Small PNGs of distinct colours at ``root/name`` (sub-folders made)."""
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (i * 40 % 256, 255 - i * 30, 9)).save(root / name)
    return root


def _metadata(root: Path, rows) -> Path:
    path = root / "metadata.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


NAMES = ["b.png", "a.png", "sub/c.png"]  # ids follow the sorted paths: a.png, b.png, sub/c.png


def _captioned(tmp_path, name="imgs") -> Path:
    root = _images(tmp_path / name, NAMES)
    _metadata(
        root,
        [
            {"file_name": "sub/c.png", "text": "a green square"},
            {"file_name": "b.png", "text": ["a pale square", "a second caption"]},
            {"file_name": "./a.png", "text": "a red square", "other": 1},
        ],
    )
    return root


def test_metadata_jsonl_captions_follow_the_ids_and_the_holdout_has_its_own(tmp_path):
    root, held = _captioned(tmp_path), _images(tmp_path / "held", ["x.png", "y.png"])
    _metadata(held, [{"file_name": "y.png", "text": "held y"}, {"file_name": "x.png", "text": "held x"}])
    data = load_dataset("imagefolder", root=str(root), holdout_root=str(held), image_size=4, cache_dir="off")
    want = (("a red square",), ("a pale square", "a second caption"), ("a green square",))
    assert data.captions == want and data.holdout_captions == (("held x",), ("held y",))
    assert first_captions(data) == ["a red square", "a pale square", "a green square"]
    assert captions_for(data, torch.tensor([2, 1, 1])) == ["a green square", "a pale square", "a pale square"]
    drawn = [captions_for(data, [1] * 40, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2] and set(drawn[0]) == set(want[1])
    assert load_dataset("imagefolder", root=str(root), train_size=2, image_size=4, cache_dir="off").captions == want[:2]
    alone = load_dataset("imagefolder", root=str(held), image_size=4, cache_dir="off")
    assert alone.captions == (("held x",), ("held y",))
    (held / "metadata.jsonl").unlink()
    load_dataset.cache_clear()
    bare = load_dataset("imagefolder", root=str(root), holdout_root=str(held), image_size=4, cache_dir="off")
    assert bare.holdout_captions is None and bare.captions == want
    with pytest.raises(ValueError, match="^imagefolder has no captions"):
        first_captions(load_dataset("imagefolder", root=str(held), image_size=4, cache_dir="off"))
    with pytest.raises(ValueError, match=r"sample ids must be in \[0, 2\], got \[3, -1\]"):
        captions_for(data, [0, 3, -1])


def _pin_folder(root: Path) -> Path:
    """The folder whose fingerprint was computed before captions existed (non-square PNGs)."""
    for i, rel in enumerate(["a.png", "b/c.png", "d.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3) * (i + 1)).save(root / rel)
    return root


def test_fingerprint_covers_every_caption_and_stays_without_captions(tmp_path):
    root = _pin_folder(tmp_path / "pin")
    plain = load_dataset("imagefolder", root=str(root), image_size=4, cache_dir="off")
    assert plain.captions is None and plain.fingerprint == "3-34e6aea703dee789"  # computed before captions
    same = ImageSet("imagefolder", plain.images, None, plain.holdout, captions=None)
    assert same.fingerprint == plain.fingerprint
    root = _captioned(tmp_path)

    def load():
        load_dataset.cache_clear()
        return load_dataset("imagefolder", root=str(root), image_size=4, cache_dir="off")

    prints = [load().fingerprint, load().fingerprint]
    assert prints[0] == prints[1] and prints[0].startswith("3-")
    meta = root / "metadata.jsonl"
    text = meta.read_text()
    for old, new in [
        ('"a second caption"', '"a second caption!"'),  # a caption beyond the first
        ('["a pale square", "a second caption!"]', '["a second caption!", "a pale square"]'),  # their order
        ('"a red square"', '"a red  square"'),
    ]:
        assert old in text
        text = text.replace(old, new)
        meta.write_text(text)
        prints.append(load().fingerprint)
    assert len(set(prints)) == 4
    base = load()
    moved = ImageSet("imagefolder", base.images, None, base.holdout, captions=base.captions[::-1])
    assert moved.fingerprint != base.fingerprint  # the same captions on other images
    with pytest.raises(ValueError, match="captions: 2 entries for 3 images"):
        ImageSet("imagefolder", base.images, None, base.holdout, captions=base.captions[:2])
    with pytest.raises(ValueError, match="captions\\[1\\]: a caption must be a non-empty string"):
        ImageSet("imagefolder", base.images, None, base.holdout, captions=(("x",), (), ("y",)))


def test_captioned_images_are_centre_cropped_uncaptioned_ones_squashed_as_before(tmp_path):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    root = tmp_path / "wide"
    root.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (6, 12, 3), dtype=np.uint8)  # 12 wide, 6 high
    Image.fromarray(pixels).save(root / "w.png")
    squashed = load_dataset("imagefolder", root=str(root), image_size=4, cache_dir="off").images[0]
    want = np.array(Image.fromarray(pixels).resize((4, 4), Image.BICUBIC))
    assert np.array_equal(squashed.permute(1, 2, 0).numpy(), want)
    _metadata(root, [{"file_name": "w.png", "text": "noise"}])
    load_dataset.cache_clear()
    cropped = load_dataset("imagefolder", root=str(root), image_size=4, cache_dir="off").images[0]
    want = TF.center_crop(TF.resize(Image.fromarray(pixels), 4, InterpolationMode.BILINEAR), 4)
    assert np.array_equal(cropped.permute(1, 2, 0).numpy(), np.array(want))  # short side 6 -> 4, centre 4 of 8


def _dcr(tmp_path) -> tuple[Path, Path]:
    """LAION-10k's layout: train/images_large/NNNNNN.png, the JSON keyed by the authors' paths."""
    root = _images(tmp_path / "laion" / "train", [f"images_large/{i:06d}.png" for i in range(3)])
    far = "/fs/cml-projects/diffusion_rep/data/laion_10k_random/train/images_large"
    table = {f"{far}/{i:06d}.png": [f"original {i}", f"blip {i}a", f"blip {i}b"] for i in (2, 0, 1)}
    path = tmp_path / "laion_combined_captions.json"
    path.write_text(json.dumps(table))
    return root, path


def test_dcr_captions_json_matches_each_image_by_the_tail_of_its_path(tmp_path):
    root, path = _dcr(tmp_path)
    _metadata(root, [{"file_name": "images_large/000000.png", "text": "ignored"}])  # the JSON, when given, wins
    want = tuple((f"original {i}", f"blip {i}a", f"blip {i}b") for i in range(3))
    for folder in (root, root / "images_large"):  # the folder above the images, or theirs
        data = load_dataset("imagefolder", root=str(folder), captions=str(path), image_size=4, cache_dir="off")
        assert data.captions == want and first_captions(data) == ["original 0", "original 1", "original 2"]
    short = tmp_path / "short.json"  # file names or stems, a caption or a list, another image suffix
    short.write_text(json.dumps({"000001": "one", "000000.png": ["zero"], "images_large/000002.jpg": "two"}))
    data = load_dataset("imagefolder", root=str(root), captions=str(short), image_size=4, cache_dir="off")
    assert data.captions == (("zero",), ("one",), ("two",))
    with pytest.raises(ValueError, match='^captions: image folders only; digits has no captions, leave captions = ""'):
        load_dataset("digits", train_size=10, captions=str(path))


def _bad_metadata(tmp_path, rows, nested=False):
    root = _images(tmp_path / "imgs", ["a.png", "b.png", "s/c.png"])
    _metadata(root / "s" if nested else root, rows)
    return root, None


def _bad_json(tmp_path, text):
    root = _images(tmp_path / "imgs", ["a.png", "b.png"])
    path = tmp_path / "caps.json"
    if text is not None:
        path.write_text(text)
    return root, path


GOOD = [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}, {"file_name": "s/c.png", "text": "c"}]
BAD_METADATA = [
    (GOOD[:2], r"metadata.jsonl: no caption for 1 of 3 images \('s/c.png'\)"),
    ([*GOOD, {"file_name": "d.png", "text": "d"}], r"metadata.jsonl: line 4 \(file_name 'd.png'\): no such image"),
    ([*GOOD, {"file_name": "a.png", "text": "again"}], r"line 4 \(file_name 'a.png'\): .* caption on line 1"),
    ([*GOOD[:2], '{"file_name": "s/c.png", "text": "c"'], r"metadata.jsonl: line 3: not a JSON object"),
    ([GOOD[0], {"file_name": "b.png", "text": " "}, GOOD[2]], r"line 2 \(file_name 'b.png'\): a caption must be"),
    ([GOOD[0], {"file_name": "b.png", "text": []}, GOOD[2]], r"line 2 \(file_name 'b.png'\): a caption must be"),
    ([GOOD[0], {"file_name": "b.png", "text": 7}, GOOD[2]], r"line 2 \(file_name 'b.png'\): a caption must be"),
    ([GOOD[0], {"file_name": "b.png", "caption": "b"}, GOOD[2]], r"line 2: must be a JSON object with a string"),
    ([GOOD[0], ["b.png", "b"], GOOD[2]], r"line 2: must be a JSON object with a string file_name"),
]
BAD_JSON = [
    ('{"a.png": "a", "b.png": ', r"caps.json: not valid JSON \(line 1 column 25"),
    ('["a", "b"]', r"caps.json: must be a non-empty JSON object of image -> caption\(s\)"),
    ("{}", r"caps.json: must be a non-empty JSON object"),
    ('{"a.png": "a", "b.png": "b", "/x/c.png": "c"}', r"caps.json: 1 entries name no image under .*\('/x/c.png'\)"),
    ('{"a.png": "a"}', r"caps.json: no caption for 1 of 2 images \('b.png'\)"),
    (
        '{"a.png": "a", "/x/b.png": "b", "b": "b2"}',
        r"caps.json: entries '/x/b.png' and 'b' both name the image 'b.png'",
    ),
    ('{"a.png": "a", "b.png": []}', r"caps.json: entry 'b.png': a caption must be a non-empty string"),
    ('{"a.png": "", "b.png": "b"}', r"caps.json: entry 'a.png': a caption must be a non-empty string"),
    ('{"a.png": "a", "b.png": ["b", null]}', r"caps.json: entry 'b.png': a caption must be"),
    (None, r"caps.json: no such file"),
]


@pytest.mark.parametrize(("rows", "message"), BAD_METADATA)
def test_bad_metadata_jsonl_is_refused_naming_the_file_and_line(tmp_path, rows, message):
    root, _ = _bad_metadata(tmp_path, rows)
    with pytest.raises(ValueError, match=f"^data-root: {re.escape(str(root / 'metadata.jsonl'))}.*"):
        load_dataset("imagefolder", root=str(root), image_size=4, cache_dir="off")
    load_dataset.cache_clear()
    with pytest.raises(ValueError, match=message):
        load_dataset("imagefolder", root=str(root), image_size=4, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # refused before anything was decoded or kept


def test_a_metadata_jsonl_in_a_sub_folder_or_the_holdout_is_refused_too(tmp_path):
    root, _ = _bad_metadata(tmp_path, [{"file_name": "c.png", "text": "c"}], nested=True)
    with pytest.raises(ValueError, match=f"^data-root: {re.escape(str(root / 's' / 'metadata.jsonl'))}: only"):
        load_dataset("imagefolder", root=str(root), image_size=4, cache_dir="off")
    held = _images(tmp_path / "held", ["x.png"])
    _metadata(held, [{"file_name": "y.png", "text": "y"}])
    (root / "s" / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match=r"^holdout-root: .*held/metadata.jsonl: line 1 \(file_name 'y.png'\)"):
        load_dataset("imagefolder", root=str(root), holdout_root=str(held), image_size=4, cache_dir="off")


@pytest.mark.parametrize(("text", "message"), BAD_JSON)
def test_a_bad_captions_json_is_refused_naming_the_file(tmp_path, text, message):
    root, path = _bad_json(tmp_path, text)
    error = FileNotFoundError if text is None else ValueError
    with pytest.raises(error, match=f"^captions: {re.escape(str(path))}"):
        load_dataset("imagefolder", root=str(root), captions=str(path), image_size=4, cache_dir="off")
    load_dataset.cache_clear()
    with pytest.raises(error, match=message):
        load_dataset("imagefolder", root=str(root), captions=str(path), image_size=4, cache_dir=str(tmp_path / "c"))


def test_an_entry_matching_two_images_of_one_stem_is_refused(tmp_path):
    root = _images(tmp_path / "imgs", ["a.png", "a.jpg"])
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"a": "which one?"}))
    with pytest.raises(ValueError, match=r"caps.json: entry 'a' names several images"):
        load_dataset("imagefolder", root=str(root), captions=str(path), image_size=4, cache_dir="off")


def _decodes(monkeypatch) -> list:
    import ddpm.data as data

    calls, real = [], data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: calls.append(a) or real(*a))
    return calls


def test_the_decoded_copy_keeps_the_captions_and_a_caption_edit_decodes_again(tmp_path, monkeypatch):
    root, cache = _captioned(tmp_path), tmp_path / "cache"
    held = _images(tmp_path / "held", ["x.png"])
    _metadata(held, [{"file_name": "x.png", "text": "held x"}])
    calls = _decodes(monkeypatch)

    def load(**kw):
        load_dataset.cache_clear()
        return load_dataset(
            "imagefolder", root=str(root), holdout_root=str(held), image_size=4, cache_dir=str(cache), **kw
        )

    first, again = load(), load()
    assert len(calls) == 1 and again.known_fingerprint == first.fingerprint
    assert again.captions == first.captions and again.holdout_captions == (("held x",),)
    assert ImageSet("imagefolder", again.images, None, again.holdout, captions=again.captions).fingerprint == (
        first.fingerprint
    )
    (copy,) = cache.iterdir()
    assert json.loads((copy / "captions.json").read_text())["train"][1] == ["a pale square", "a second caption"]
    meta = root / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a green square", "a grey square"))
    edited = load()
    assert len(calls) == 2 and edited.captions[2] == ("a grey square",) and edited.fingerprint != first.fingerprint
    (held / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "held x, edited"}\n')
    assert load().holdout_captions == (("held x, edited",),) and len(calls) == 3
    dcr_root, path = _dcr(tmp_path)
    dcr = [load_dataset("imagefolder", root=str(dcr_root), captions=str(path), image_size=4, cache_dir=str(cache))]
    path.write_text(path.read_text().replace("blip 1b", "blip 1c"))
    load_dataset.cache_clear()
    dcr.append(load_dataset("imagefolder", root=str(dcr_root), captions=str(path), image_size=4, cache_dir=str(cache)))
    assert len(calls) == 5 and dcr[1].captions[1][2] == "blip 1c" and dcr[0].fingerprint != dcr[1].fingerprint


def test_a_copy_whose_captions_file_was_replaced_is_decoded_again(tmp_path, monkeypatch):
    root, cache = _captioned(tmp_path), tmp_path / "cache"
    calls = _decodes(monkeypatch)
    good = load_dataset("imagefolder", root=str(root), image_size=4, cache_dir=str(cache))
    (copy,) = cache.iterdir()
    doc = json.loads((copy / "captions.json").read_text())
    doc["train"][0] = ["another caption"]  # the arrays and meta.json kept: the fingerprint would still pass
    (copy / "captions.json").write_text(json.dumps(doc))
    load_dataset.cache_clear()
    with pytest.warns(RuntimeWarning, match="captions.json does not hold the content"):
        again = load_dataset("imagefolder", root=str(root), image_size=4, cache_dir=str(cache))
    assert len(calls) == 2 and again.captions == good.captions
    (copy / "captions.json").unlink()
    load_dataset.cache_clear()
    with pytest.warns(RuntimeWarning, match="a document is unreadable"):
        assert load_dataset("imagefolder", root=str(root), image_size=4, cache_dir=str(cache)).captions == good.captions
    assert len(calls) == 3
    with pytest.raises(ValueError, match="document names \\['meta'\\] are taken"):
        data_cache.write(tmp_path / "x", {}, {}, {"meta": {}})
