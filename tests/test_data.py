import numpy as np
import pytest
import torch

from ddpm.data import ImageSet, load_dataset
from ddpm.shards import make_shards


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
