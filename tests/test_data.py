import numpy as np
import pytest
import torch

from ddpm.data import ImageSet, load_dataset
from strategies.shards import make_shards


def test_digits_split_is_seeded_and_disjoint():
    a = load_dataset("digits", train_size=300, seed=3)
    b = load_dataset("digits", train_size=300, seed=3)
    c = load_dataset("digits", train_size=300, seed=4)
    assert a.images.shape == (300, 1, 8, 8) and a.images.dtype == torch.uint8
    assert a.holdout.shape == (1797 - 300, 1, 8, 8)
    assert torch.equal(a.images, b.images) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert int(a.images.max()) == 255 and int(a.images.min()) == 0


def test_fingerprint_changes_with_one_pixel():
    d = load_dataset("digits", train_size=50)
    images = d.images.clone()
    images[7, 0, 3, 3] ^= 1
    other = ImageSet("digits", images, d.labels, d.holdout)
    assert other.fingerprint != d.fingerprint
    assert other.fingerprint.startswith("50-")


def test_unknown_dataset_and_missing_folder():
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="data-root"):
        load_dataset("cifar10", root="/nonexistent/cifar", download=False)


def test_iid_shards_balance_classes_and_partition():
    labels = np.repeat(np.arange(10), 13)  # 130 samples, 13 per class
    shards = make_shards(130, 4, labels, seed=0)
    ids = np.sort(np.concatenate(shards))
    assert np.array_equal(ids, np.arange(130))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    per_class = np.array([np.bincount(labels[s], minlength=10) for s in shards])
    assert per_class.max(0).tolist() == [4] * 10 and per_class.min(0).tolist() == [3] * 10
    again = make_shards(130, 4, labels, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(shards, again, strict=True))


def test_unlabelled_shards_are_equal_parts():
    shards = make_shards(10, 3, None, seed=1)
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(10))
    with pytest.raises(ValueError, match="num-shards"):
        make_shards(5, 0, None, seed=0)
    with pytest.raises(ValueError, match="num-shards"):
        make_shards(5, 6, None, seed=0)


def test_image_folder_path_may_start_with_a_tilde(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (i * 50, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    data = load_dataset("imagefolder", root="~/imgs", image_size=4)
    assert len(data) == 3 and data.images[2, 0, 0, 0] == 100


def _folder(root, n, size=6):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (i * 20 % 256, 7, 0)).save(root / f"{i:03d}.png")
    return root


def _decodes(monkeypatch) -> list:
    """Record every real decode (what the disk copy is there to save)."""
    import ddpm.data as data

    calls, real = [], data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: calls.append(a) or real(*a))
    return calls


def test_a_fresh_process_maps_the_decoded_copy_instead_of_decoding(tmp_path, monkeypatch):
    root, cache = _folder(tmp_path / "imgs", 5), str(tmp_path / "cache")
    calls = _decodes(monkeypatch)
    first = load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=cache)
    load_dataset.cache_clear()  # as a new ClientApp process would start
    again = load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=cache)
    assert len(calls) == 1, "the second load decoded the images again"
    assert torch.equal(first.images, again.images) and first.fingerprint == again.fingerprint
    assert again.known_fingerprint == first.fingerprint  # read from the copy, not hashed again
    again.images[0] += 1  # copy-on-write: the process may write, the copy on disk stays as it was
    load_dataset.cache_clear()
    assert torch.equal(load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=cache).images, first.images)
    load_dataset.cache_clear()
    digits = [load_dataset("digits", train_size=40, seed=s, cache_dir=cache) for s in (1, 1, 2)]
    assert len(calls) == 3  # digits seed 1 once, seed 2 once: the seed is part of the key
    assert digits[0] is digits[1] and digits[0].fingerprint != digits[2].fingerprint
    load_dataset.cache_clear()
    same = load_dataset("digits", train_size=40, seed=1, cache_dir=cache)
    assert len(calls) == 3 and torch.equal(same.labels, digits[0].labels) and same.fingerprint == digits[0].fingerprint
    assert torch.equal(same.holdout_labels, digits[0].holdout_labels)


def test_a_changed_added_or_removed_image_is_a_new_copy(tmp_path, monkeypatch):
    from PIL import Image

    root, cache = _folder(tmp_path / "imgs", 4), str(tmp_path / "cache")
    calls = _decodes(monkeypatch)

    def load():
        load_dataset.cache_clear()
        return load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=cache)

    prints = [load().fingerprint]
    Image.new("RGB", (6, 6), (1, 2, 3)).save(root / "002.png")  # edited in place
    prints.append(load().fingerprint)
    Image.new("RGB", (6, 6), (9, 9, 9)).save(root / "100.png")  # added
    prints.append(load().fingerprint)
    (root / "000.png").unlink()  # removed
    prints.append(load().fingerprint)
    assert len(calls) == 4 and len(set(prints)) == 4
    assert prints[2].startswith("5-") and prints[3].startswith("4-")


def test_a_broken_copy_is_decoded_again_and_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    root, cache = _folder(tmp_path / "imgs", 3), tmp_path / "cache"
    calls = _decodes(monkeypatch)
    good = load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=str(cache))
    (copy,) = cache.iterdir()
    (copy / "images.npy").write_bytes((copy / "images.npy").read_bytes()[:100])  # truncated
    load_dataset.cache_clear()
    again = load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=str(cache))
    assert len(calls) == 2 and torch.equal(again.images, good.images)

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # the cache folder cannot be made
    load_dataset.cache_clear()
    assert torch.equal(
        load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=str(blocked)).images, good.images
    )
    load_dataset.cache_clear()
    off = load_dataset("imagefolder", root=str(root), image_size=6, cache_dir="off")
    assert torch.equal(off.images, good.images) and not (tmp_path / "off").exists() and len(calls) == 4


def test_two_writers_of_one_copy_leave_one_complete_copy(tmp_path):
    from ddpm import data_cache

    arrays = {"images": np.arange(12, dtype=np.uint8).reshape(3, 1, 2, 2)}
    target = tmp_path / "key"
    assert data_cache.write(target, arrays, {"fingerprint": "3-a"})
    assert data_cache.write(target, {"images": np.zeros((3, 1, 2, 2), np.uint8)}, {"fingerprint": "3-b"})
    read, meta = data_cache.read(target)
    assert meta["fingerprint"] == "3-a" and np.array_equal(read["images"], arrays["images"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # the loser's temporary folder is gone


def _rows(images: torch.Tensor, labels: torch.Tensor) -> list[bytes]:
    """Each digit as bytes (pixels + label), sorted: a multiset to compare splits by."""
    flat = torch.cat([images.flatten(1), labels[:, None].to(torch.uint8)], 1)
    return sorted(bytes(r) for r in flat.numpy())


def test_three_digit_splits_are_disjoint_and_cover_every_digit(tmp_path):
    cache = str(tmp_path / "cache")
    train = load_dataset("digits", train_size=200, seed=5, holdout_size=900, cache_dir=cache)
    spare = load_dataset("digits", train_size=200, seed=5, holdout_size=900, data_split="spare", cache_dir=cache)
    usual = load_dataset("digits", train_size=200, seed=5, cache_dir=cache)
    assert (len(train), len(train.holdout), len(spare), len(spare.holdout)) == (200, 900, 697, 900)
    assert torch.equal(train.images, usual.images) and torch.equal(train.holdout, usual.holdout[:900])
    assert torch.equal(spare.holdout, train.holdout) and torch.equal(spare.images, usual.holdout[900:])
    every = load_dataset("digits", train_size=1796, seed=0, cache_dir="off")  # all 1797, in some order
    parts = [(train.images, train.labels), (train.holdout, train.holdout_labels), (spare.images, spare.labels)]
    union = _rows(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert union == _rows(torch.cat([every.images, every.holdout]), torch.cat([every.labels, every.holdout_labels]))
    # the usual split (holdout-size 0) keeps its fingerprint: runs made before the keys resume
    assert load_dataset("digits", train_size=400, seed=0, cache_dir="off").fingerprint == "400-3978fb4a6a05969b"
    prints = {train.fingerprint, spare.fingerprint, usual.fingerprint}
    prints.add(load_dataset("digits", train_size=200, seed=6, holdout_size=900, cache_dir=cache).fingerprint)
    assert len(prints) == 4  # holdout-size, data-split and the seed each make another data set
    load_dataset.cache_clear()  # read back from the disk copies: each its own, with its fingerprint
    again = load_dataset("digits", train_size=200, seed=5, holdout_size=900, data_split="spare", cache_dir=cache)
    assert again.known_fingerprint == spare.fingerprint and torch.equal(again.images, spare.images)
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_bad_digit_splits_and_other_data_sets_name_the_key():
    with pytest.raises(ValueError, match="^holdout-size: must be in \\[0, 1597\\]"):
        load_dataset("digits", train_size=200, holdout_size=1598, cache_dir="off")
    with pytest.raises(ValueError, match="^data-split: 'spare' trains on the digits neither"):
        load_dataset("digits", train_size=200, data_split="spare", cache_dir="off")
    with pytest.raises(ValueError, match="^data-split: must be one of train, spare"):
        load_dataset("digits", train_size=200, data_split="rest", cache_dir="off")
    with pytest.raises(ValueError, match="^holdout-size: digits only; cifar10 holds out its test split"):
        load_dataset("cifar10", holdout_size=10)
    with pytest.raises(ValueError, match="^data-split: 'spare' exists for digits only"):
        load_dataset("imagefolder", root="/nonexistent", data_split="spare")


def test_data_seed_fixes_the_split_whatever_the_run_seed():
    from fl_app.settings import Settings

    fixed = [Settings(seed=s, data_seed=7, train_size=200, holdout_size=900).dataset_kwargs() for s in (0, 1, 2)]
    assert fixed[0] == fixed[1] == fixed[2] and fixed[0]["seed"] == 7
    following = [Settings(seed=s, train_size=200).dataset_kwargs()["seed"] for s in (0, 1, 2)]
    assert following == [0, 1, 2]  # data-seed -1: the split follows the run's seed, as before the key
    data = [load_dataset(**k, cache_dir="off") for k in fixed[:2]]
    assert torch.equal(data[0].images, data[1].images) and data[0].fingerprint == data[1].fingerprint
    spare = Settings(seed=3, data_seed=7, train_size=200, holdout_size=900, data_split="spare", num_shards=1)
    assert load_dataset(**spare.dataset_kwargs(), cache_dir="off").fingerprint.startswith("697-")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data-split": "spare"}, "data-split: 'spare' trains on the digits neither"),
        ({"holdout-size": 1398}, r"holdout-size: must be an integer in \[0, 1397\]"),
        ({"data-split": "spare", "holdout-size": 1397}, r"data-split: .* set holdout-size in \[1, 1396\]"),
        ({"data-split": "spare", "holdout-size": 1395, "num-shards": 3}, r"num-shards: .*\(spare digits = 2\)"),
        ({"data-seed": -2}, r"data-seed: must be -1 \(the run's seed\) or an integer"),
        ({"dataset": "cifar10", "data-seed": 0}, "data-seed: digits only"),
        ({"dataset": "cifar10", "holdout-size": 5}, "holdout-size: digits only"),
        ({"dataset": "cifar100", "data-split": "spare"}, "data-split: 'spare' is for digits only"),
    ],
)
def test_split_settings_refuse_bad_values_naming_the_key(changes, message):
    from fl_app.settings import Settings

    with pytest.raises(ValueError, match=f"^{message}"):
        Settings.from_run_config(changes)


def test_the_split_cannot_change_on_resume():
    from fl_app.resume import RESUMABLE_KEYS, resumed_settings
    from fl_app.settings import Settings

    saved = Settings(data_seed=4, holdout_size=900, train_size=200).to_run_config()
    for key, value in (("data-seed", 5), ("holdout-size", 800), ("data-split", "spare")):
        assert key not in RESUMABLE_KEYS
        with pytest.raises(ValueError, match=f"^{key}: cannot change when resuming"):
            resumed_settings(saved, {key: value}, Settings().to_run_config())
    older = {k: v for k, v in saved.items() if k not in ("data-seed", "holdout-size", "data-split")}
    merged = resumed_settings(older, {"data-seed": -1, "holdout-size": 0}, Settings().to_run_config())
    assert merged["data-seed"] == -1 and merged["holdout-size"] == 0  # a run from before the keys


def test_a_copy_whose_arrays_were_replaced_is_refused_and_decoded_again(tmp_path, monkeypatch):
    """The issue's case: images.npy replaced (same shape and dtype), meta.json kept. The copy must
    not pass the server's fingerprint: its hash is checked, it is removed and decoded again."""
    from ddpm import data_cache

    root, cache = _folder(tmp_path / "imgs", 4), tmp_path / "cache"
    calls = _decodes(monkeypatch)
    hashed = []
    real_hash = data_cache.content_hash
    monkeypatch.setattr(data_cache, "content_hash", lambda a: hashed.append(a.shape) or real_hash(a))

    def load():
        load_dataset.cache_clear()
        return load_dataset("imagefolder", root=str(root), image_size=6, cache_dir=str(cache))

    good = load()
    hashed.clear()
    assert torch.equal(load().images, good.images) and hashed == []  # untouched: stat only, no hash
    (copy,) = cache.iterdir()
    other = np.load(copy / "images.npy")[::-1].copy()  # other images, same shape and dtype
    np.save(copy / "images.npy", other)
    with pytest.warns(RuntimeWarning, match="images.npy does not hold the content"):
        again = load()
    assert len(calls) == 2 and torch.equal(again.images, good.images) and again.fingerprint == good.fingerprint
    assert len(calls) == 2 and torch.equal(load().images, good.images) and len(calls) == 2  # replaced copy is good
    (copy,) = cache.iterdir()
    (copy / "images.npy").touch()  # same bytes, new mtime: hashed once more, kept
    hashed.clear()
    assert torch.equal(load().images, good.images) and len(calls) == 2 and hashed
    hashed.clear()
    load()
    assert hashed == []
    (copy / "meta.json").write_text("{not json")  # a damaged copy is removed too, not kept forever
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert torch.equal(load().images, good.images)
    assert len(calls) == 3 and len(list(cache.iterdir())) == 1
