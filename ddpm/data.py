"""Image data sets held in memory as uint8 tensors; a sample's id is its index in the training split.

Every node resolves ids against its own copy, so each copy carries a fingerprint (size plus a
content hash) that the server sends and the node checks before training. A decoded copy is kept
on disk (``ddpm.data_cache``) so that a fresh process, as Flower starts for every message in a
deployment, maps it instead of decoding the data set again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data_cache
from .captions import METADATA, Captions, as_captions, read_captions_json, read_metadata
from .files import error_text

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder")
DATA_SPLITS: tuple[str, ...] = ("train", "spare")  # what a run trains on (spare: digits only)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # the decoders for IMAGE_SUFFIXES, whatever the suffix says
DEFAULT_ROOT = Path.home() / ".cache" / "iet-agc" / "data"


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A training split (ids = row index) plus held-out real images for evaluation.

    ``captions``: each training image's captions (a tuple of at least one string, the first the
    default) for a captioned image folder, None otherwise; ``holdout_captions`` the same for the
    held-out images where their folder has captions."""

    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # int64 (N,) or None
    holdout: torch.Tensor  # uint8 (M, C, H, W); M may be 0
    holdout_labels: torch.Tensor | None = None  # int64 (M,) where the data set has labels
    known_fingerprint: str = field(default="", repr=False)  # stored with a decoded copy on disk
    split: str = ""  # a split other than "train + all the rest" (digits' holdout-size, data-split)
    captions: Captions | None = field(default=None, repr=False)
    holdout_captions: Captions | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for attr, images in (("captions", self.images), ("holdout_captions", self.holdout)):
            value = getattr(self, attr)
            if value is None:
                continue
            if len(value) != images.shape[0]:
                raise ValueError(f"{attr}: {len(value)} entries for {images.shape[0]} images")
            object.__setattr__(self, attr, tuple(as_captions(c, f"{attr}[{i}]") for i, c in enumerate(value)))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @functools.cached_property
    def fingerprint(self) -> str:
        """``<N>-<sha256 prefix>`` over the training images and labels (and the split, if not the usual),
        and over every caption in order where there are captions (none: the hash of before captions)."""
        if self.known_fingerprint:
            return self.known_fingerprint
        h = hashlib.sha256()
        if self.split:
            h.update(f"split {self.split};".encode())
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.numpy().astype(np.int64).tobytes())
        if self.captions is not None:
            h.update(b"captions;" + json.dumps(self.captions, ensure_ascii=False).encode())
        return f"{len(self)}-{h.hexdigest()[:16]}"


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1] (metrics, plots, augmentation); a float tensor is taken as [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the DDPM is trained in."""
    return images.float().div(127.5).sub(1.0)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def _load_digits(
    image_size: int, train_size: int, seed: int, holdout_size: int = 0, data_split: str = "train"
) -> ImageSet:
    """One permutation from ``seed``: its first ``train_size`` digits train, the next ``holdout_size``
    (0: all the rest) are held out, the rest are spare; ``data_split = "spare"`` trains on those."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    total = len(images)
    if not 1 <= train_size < total:
        raise ValueError(f"train-size: must be in [1, {total - 1}] for digits, got {train_size}")
    if not 0 <= holdout_size <= total - train_size:
        raise ValueError(
            f"holdout-size: must be in [0, {total - train_size}] for digits with train-size {train_size} "
            f"(0 = all the rest), got {holdout_size}"
        )
    if data_split not in DATA_SPLITS:
        raise ValueError(f"data-split: must be one of {', '.join(DATA_SPLITS)}, got {data_split!r}")
    end = train_size + holdout_size if holdout_size else total
    if data_split == "spare" and end == total:
        raise ValueError(
            f"data-split: 'spare' trains on the digits neither in train-size nor in holdout-size, and "
            f"train-size {train_size} + holdout-size {holdout_size or 'all the rest'} leave none"
        )
    order = torch.from_numpy(np.random.default_rng(seed).permutation(total))
    train, rest = (order[end:] if data_split == "spare" else order[:train_size]), order[train_size:end]
    split = "" if end == total else f"data-split={data_split},holdout-size={holdout_size}"
    images = _resize(images, image_size)
    return ImageSet(
        "digits", images[train].contiguous(), labels[train], images[rest].contiguous(), labels[rest], split=split
    )


def _load_cifar(name: str, root: Path, download: bool, image_size: int, train_size: int) -> ImageSet:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(
            f"data-root: {name} not found under {root} ({err}); set download = true "
            "on a machine with internet, or point data-root at an extracted copy"
        ) from err
    images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(train.targets, dtype=torch.int64)
    if train_size:
        images, labels = images[:train_size], labels[:train_size]
    holdout = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
    holdout_labels = torch.tensor(test.targets, dtype=torch.int64)
    return ImageSet(name, _resize(images, image_size), labels, _resize(holdout, image_size), holdout_labels)


def image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (recursively), in a stable sorted order: their ids."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


DIGITS_IMAGES = 1797  # scikit-learn's bundled 8x8 digits (load_digits)
CIFAR_TRAIN_IMAGES = 50000  # CIFAR-10 and CIFAR-100 training splits


def num_train_images(name: str, root: str = "") -> int:
    """How many training images data set ``name`` offers, without decoding any image.

    digits: 1796 (of 1797, at least one is held out); cifar10/cifar100: 50000; imagefolder: the
    number of files ``image_files(root)`` finds (the only case that reads the file system; the
    root is taken as ``load_dataset`` takes it). ``train-size`` takes at most this many; 0 (all)
    means this many, except for digits, which needs an explicit size.
    """
    if name == "digits":
        return DIGITS_IMAGES - 1
    if name in ("cifar10", "cifar100"):
        return CIFAR_TRAIN_IMAGES
    if name == "imagefolder":
        return len(image_files(Path(root).expanduser())) if root else 0
    raise ValueError(f"dataset: unknown data set {name!r}; allowed: {', '.join(DATASETS)}")


NUM_CLASSES: dict[str, int | None] = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagefolder": None}


def num_classes(name: str) -> int | None:
    """Classes of data set ``name`` (its labels are 0..C-1), or None where it has no labels (image folders).

    Known from the name alone, so the settings check and the model factory agree without loading
    images; a small training split need not hold every class, the label space is still C.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    return NUM_CLASSES[name]


def num_channels(name: str) -> int:
    """Colour channels of data set ``name`` (digits are grey; CIFAR and image folders are RGB)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    return 1 if name == "digits" else 3


def read_image(path: Path):
    """One decoded PIL image from ``path``; a folder, an unreadable, truncated or non-image file
    (or one too large to decode safely) is a ValueError naming the file."""
    from PIL import Image

    if path.is_dir():
        raise ValueError(f"{path} is a folder named like an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, not decoded
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                img.load()
                return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: not a readable image ({error_text(err)})") from None


def _read_folder(root: Path, image_size: int, crop: bool = False) -> torch.Tensor:
    """The images under ``root`` in id order as uint8 (N, 3, S, S): squashed to S x S (bicubic), or
    with ``crop`` as Stable Diffusion's fine-tuning scripts prepare them: short side to S, centre S x S."""
    from PIL import Image

    files = image_files(root)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    out = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    for i, path in enumerate(files):  # loading, not a training step
        img = read_image(path).convert("RGB")
        img = _centre_crop(img, image_size) if crop else img.resize((image_size, image_size), Image.BICUBIC)
        out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return out


def _centre_crop(img, size: int):
    """diffusers' train_text_to_image.py with --center_crop: Resize(size, bilinear), CenterCrop(size)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(img, size, InterpolationMode.BILINEAR), size)


def folder_captions(root: Path, captions: str = "", key: str = "data-root") -> Captions | None:
    """The captions of the images under ``root``, in id order: from the captions JSON ``captions``
    (DCR's format) when given, else from ``root/metadata.jsonl`` when there is one, else None.

    ``key`` (the setting holding ``root``) begins the errors about ``metadata.jsonl``. Only the
    folder's own ``metadata.jsonl`` is read: one in a sub-folder is refused, never silently ignored."""
    names = [p.relative_to(root).as_posix() for p in image_files(root)]
    if captions:
        return read_captions_json(Path(captions).expanduser(), names, root, IMAGE_SUFFIXES)
    nested = sorted(p for p in root.rglob(METADATA) if p.parent != root)
    if nested:
        raise ValueError(
            f"{key}: {nested[0]}: only {root / METADATA} is read (file_name relative to {root}); move its lines there"
        )
    metadata = root / METADATA
    return read_metadata(metadata, names, key) if metadata.is_file() else None


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _sources(name: str, root: str, holdout_root: str, captions: str = "") -> dict:
    """What the decoded arrays depend on besides the loader's arguments: the source files (a folder's
    ``metadata.jsonl`` and the captions JSON only where they exist, so older keys stay as they were)."""
    if name == "digits":
        return {"scikit-learn": version("scikit-learn")}
    if name in CIFAR_FOLDERS:
        folder = (Path(root).expanduser() if root else DEFAULT_ROOT) / CIFAR_FOLDERS[name]
        files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
        return {"root": str(folder.resolve()), "files": data_cache.file_signature(files, folder)}
    out = {}
    for key, folder in (("root", root), ("holdout", holdout_root)):
        if folder:
            path = Path(folder).expanduser().resolve()
            out[key] = [str(path), data_cache.file_signature(image_files(path), path)]
            if (path / METADATA).is_file():
                out[key].append(data_cache.file_signature([path / METADATA], path))
    if captions:
        path = Path(captions).expanduser().resolve()
        out["captions"] = [str(path), data_cache.file_signature([path], path.parent) if path.is_file() else None]
    return out


def check_split(name: str, holdout_size: int, data_split: str) -> None:
    """Only the digits split is drawn here; other data sets bring their own held-out images."""
    if name == "digits" or name not in DATASETS:
        return
    if holdout_size:
        held = "holdout-root" if name == "imagefolder" else "its test split"
        raise ValueError(f"holdout-size: digits only; {name} holds out {held}, leave holdout-size = 0")
    if data_split != "train":
        raise ValueError(
            f"data-split: {data_split!r} exists for digits only (the digits neither trained on nor held out); "
            f'{name} trains on its training images, leave data-split = "train"'
        )


def check_captions(name: str, captions: str) -> None:
    """A captions JSON goes with an image folder only (digits and CIFAR have labels, no captions)."""
    if captions and name in DATASETS and name != "imagefolder":
        raise ValueError(f'captions: image folders only; {name} has no captions, leave captions = ""')


def _load_folder(root: str, holdout_root: str, image_size: int, train_size: int, captions: str) -> ImageSet:
    """An image folder (its first ``train_size`` images, 0: all), captioned or not, and its held-out
    folder. Captioned training images are centre-cropped, uncaptioned ones squashed as before
    captions existed; the held-out images are prepared as the training images are."""
    if not root:
        raise ValueError("data-root: imagefolder needs the folder of training images")
    folder = Path(root).expanduser()
    texts = folder_captions(folder, captions)  # before any image is decoded: a bad file fails fast
    crop = texts is not None
    images = _read_folder(folder, image_size, crop)
    if train_size:
        images, texts = images[:train_size], texts and texts[:train_size]
    holdout = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    held_texts = None
    if holdout_root:
        held = Path(holdout_root).expanduser()
        held_texts = folder_captions(held, key="holdout-root")
        holdout = _read_folder(held, image_size, crop)
    return ImageSet("imagefolder", images.contiguous(), None, holdout, captions=texts, holdout_captions=held_texts)


def _decode(
    name: str,
    root: str,
    holdout_root: str,
    download: bool,
    image_size: int,
    train_size: int,
    seed: int,
    holdout_size: int = 0,
    data_split: str = "train",
    captions: str = "",
) -> ImageSet:
    """Read and decode the source files (what the disk copy saves a process from doing again)."""
    check_split(name, holdout_size, data_split)
    check_captions(name, captions)
    if name == "digits":
        return _load_digits(image_size, train_size, seed, holdout_size, data_split)
    if name in CIFAR_FOLDERS:
        return _load_cifar(name, Path(root).expanduser() if root else DEFAULT_ROOT, download, image_size, train_size)
    if name == "imagefolder":
        return _load_folder(root, holdout_root, image_size, train_size, captions)
    raise ValueError(f"dataset: unknown data set {name!r}; allowed: {', '.join(DATASETS)}")


ARRAYS = ("images", "labels", "holdout", "holdout_labels")


@functools.lru_cache(maxsize=4)
def load_dataset(
    name: str,
    *,
    root: str = "",
    holdout_root: str = "",
    download: bool = True,
    image_size: int = 8,
    train_size: int = 0,
    seed: int = 0,
    holdout_size: int = 0,
    data_split: str = "train",
    captions: str = "",
    cache_dir: str = "",
) -> ImageSet:
    """Load a data set by name: cached per process, and decoded once per machine.

    ``seed``, ``holdout_size`` and ``data_split`` shape the digits split only (see ``_load_digits``).
    ``captions``: an image folder's captions JSON in DCR's format (``""``: the folder's
    ``metadata.jsonl`` where it has one, else no captions; see ``folder_captions``).
    ``cache_dir`` holds the decoded copies (``""``: ``data_cache.default_cache_dir()``; ``"off"``:
    decode every time and keep nothing).
    """
    decode = (name, root, holdout_root, download, image_size, train_size, seed, holdout_size, data_split, captions)
    if cache_dir == "off" or name not in DATASETS or (name == "imagefolder" and not root):
        return _decode(*decode)  # or its error
    check_split(name, holdout_size, data_split)
    check_captions(name, captions)
    args = dict(name=name, root=root, holdout_root=holdout_root, image_size=image_size, train_size=train_size)
    if name == "digits":  # the only loader whose split depends on the seed and the split sizes
        args.update(seed=seed, holdout_size=holdout_size, data_split=data_split)
    if captions:  # only where given: the keys of the copies made before captions stay as they were
        args.update(captions=captions)
    base = Path(cache_dir).expanduser() if cache_dir else data_cache.default_cache_dir()
    folder = base / data_cache.cache_key({**args, "sources": _sources(name, root, holdout_root, captions)})
    found = data_cache.read(folder)
    if found is not None:
        return _from_copy(name, *found)
    data = _decode(*decode)
    arrays = {k: getattr(data, k).numpy() for k in ARRAYS if getattr(data, k) is not None}
    texts = {"train": data.captions, "holdout": data.holdout_captions}
    documents = {"captions": texts} if any(v is not None for v in texts.values()) else {}
    # sources again: a download may just have made the files the key is made of
    folder = base / data_cache.cache_key({**args, "sources": _sources(name, root, holdout_root, captions)})
    data_cache.write(folder, arrays, {"name": name, "fingerprint": data.fingerprint, **args}, documents)
    return data


def _from_copy(name: str, arrays: dict[str, np.ndarray], meta: dict) -> ImageSet:
    """The data set of a decoded copy on disk (``data_cache.read``): its arrays, captions and fingerprint."""
    t = {k: torch.from_numpy(a) for k, a in arrays.items()}
    texts = meta.get("documents", {}).get("captions", {})
    return ImageSet(
        name,
        t["images"],
        t.get("labels"),
        t["holdout"],
        t.get("holdout_labels"),
        known_fingerprint=meta["fingerprint"],
        captions=texts.get("train"),
        holdout_captions=texts.get("holdout"),
    )
