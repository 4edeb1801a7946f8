"""Every bad input to ``iet-agc mq`` and ``iet-agc evaluate`` exits 2 with one line naming it, no traceback.

Each case builds its bad input in a fresh folder, calls the tool in-process (``iet_agc.cli.main``,
the ``iet-agc`` entry point) and checks: exit code 2, nothing on stdout, exactly one line on
stderr that starts ``iet-agc <tool>: error:`` and names the option or file, and no traceback.
Two cases also run as real processes.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image

from ddpm.schedule import train_scheduler
from ddpm.unet import build_unet
from iet_agc import cli as iet_cli

RNG = np.random.default_rng(0)
TRAIN = RNG.integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
GENERATED = RNG.random((6, 3, 4, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Good inputs: gen.npy, train.npy, a folder of PNGs, a regular file, a tiny run folder."""
    root = tmp_path_factory.mktemp("good")
    np.save(root / "gen.npy", GENERATED)
    np.save(root / "train.npy", TRAIN)
    (root / "pngs").mkdir()
    for i, img in enumerate(TRAIN[:12]):
        Image.fromarray(img).save(root / "pngs" / f"{i:02d}.png")
    (root / "afile").write_text("a regular file\n")
    run = root / "run"
    torch.manual_seed(0)
    DDPMPipeline(unet=build_unet("tiny", 8, 1), scheduler=train_scheduler()).save_pretrained(run / "pipeline")
    settings = ["train-size = 120", "num-shards = 2", "sample-steps = 2", "mq-neighbours = 10", "fid = false"]
    (run / "settings.toml").write_text("\n".join([*settings, f'fid-cache-dir = "{root}"', ""]))
    return root


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(TRAIN[0]).save(buf, "PNG")
    return buf.getvalue()


def _folder(tmp: Path, files: dict[str, bytes | None]) -> str:
    """A folder of good PNGs plus ``files`` (None: a sub-folder of that name)."""
    folder = tmp / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.png").write_bytes(_png_bytes())
    for name, data in files.items():
        if data is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(data)
    return str(folder)


def _npy(tmp: Path, array: np.ndarray, name: str = "bad.npy") -> str:
    np.save(tmp / name, array)
    return str(tmp / name)


def _raw(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _tiff_as_png(tmp: Path) -> str:
    buf = io.BytesIO()
    Image.fromarray(TRAIN[0]).save(buf, "TIFF")
    return _folder(tmp, {"tiff.png": buf.getvalue()})


def _png_header(width: int, height: int) -> bytes:
    """The start of a PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def _mixed_sizes(tmp: Path) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    return _folder(tmp, {"big.png": buf.getvalue()})


def _pipeline(base: Path, tmp: Path, change: Callable[[Path], None]) -> str:
    """A copy of the good pipeline folder, changed by ``change(pipeline_dir)``."""
    pipe = tmp / "pipe"
    shutil.copytree(base / "run" / "pipeline", pipe)
    change(pipe)
    return str(pipe)


def _weights(pipe: Path) -> Path:
    return pipe / "unet" / "diffusion_pytorch_model.safetensors"


def _only_bin(pipe: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(_weights(pipe)), pipe / "unet" / "diffusion_pytorch_model.bin")
    _weights(pipe).unlink()


def _edit_config(pipe: Path, **changes) -> None:
    path = pipe / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _run_copy(base: Path, tmp: Path, settings: str) -> str:
    run = tmp / "run"
    shutil.copytree(base / "run" / "pipeline", run / "pipeline")
    (run / "settings.toml").write_text("fid = false\n" + settings)
    return str(run)


def _mq(generated: str | None = None, train: str | None = None, *extra: str) -> Callable[[Path, Path], list[str]]:
    """An ``mq`` call; ``generated``/``train`` name a builder key below, or None for the good file."""

    def argv(base: Path, tmp: Path) -> list[str]:
        gen = BUILD[generated](base, tmp) if generated else str(base / "gen.npy")
        tr = BUILD[train](base, tmp) if train else str(base / "train.npy")
        return ["mq", "--generated", gen, "--train", tr, "--n", "5", *[e.format(base=base, tmp=tmp) for e in extra]]

    return argv


def _ev(source: str | Callable[[Path, Path], str] = "run", *extra: str) -> Callable[[Path, Path], list[str]]:
    def argv(base: Path, tmp: Path) -> list[str]:
        src = source(base, tmp) if callable(source) else str(base / source)
        out = ["--out", str(tmp / "out")] if "--out" not in extra else []
        return ["evaluate", src, "--device", "cpu", *out, *[e.format(base=base, tmp=tmp) for e in extra]]

    return argv


BUILD: dict[str, Callable[[Path, Path], str]] = {
    "missing_npy": lambda b, t: str(t / "nope.npy"),
    "missing_path": lambda b, t: str(t / "nope"),
    "empty_folder": lambda b, t: str(t),
    "folder_named_png": lambda b, t: _folder(t, {"x.png": None}),
    "spec_dir_named_png": lambda b, t: (t / "x.png").mkdir() or str(t / "x.png"),
    "zero_byte_png": lambda b, t: _folder(t, {"zero.png": b""}),
    "truncated_png": lambda b, t: _folder(t, {"cut.png": _png_bytes()[:40]}),
    "garbage_png": lambda b, t: _folder(t, {"text.png": b"hello, not an image\n"}),
    "not_image_jpg": lambda b, t: _folder(t, {"array.jpg": (b / "gen.npy").read_bytes()}),
    "tiff_named_png": lambda b, t: _tiff_as_png(t),
    "mixed_sizes": lambda b, t: _mixed_sizes(t),
    "decompression_bomb": lambda b, t: _folder(t, {"bomb.png": _png_header(100_000, 100_000)}),
    "zero_byte_npy": lambda b, t: _raw(t, "zero.npy", b""),
    "garbage_npy": lambda b, t: _raw(t, "garbage.npy", b"garbage\n"),
    "truncated_npy": lambda b, t: _raw(t, "cut.npy", (b / "train.npy").read_bytes()[:100]),
    "object_npy": lambda b, t: _raw(t, "obj.npy", _object_npy()),
    "huge_header_npy": lambda b, t: _raw(t, "huge.npy", _huge_header()),
    "npz_named_npy": lambda b, t: _npz_as_npy(t),
    "five_dims": lambda b, t: _npy(t, np.zeros((2, 3, 4, 4, 1), np.uint8)),
    "two_channels": lambda b, t: _npy(t, np.zeros((2, 2, 4, 4), np.uint8)),
    "bool_dtype": lambda b, t: _npy(t, np.zeros((2, 3, 4, 4), bool)),
    "int64_dtype": lambda b, t: _npy(t, np.zeros((2, 3, 4, 4), np.int64)),
    "nan_values": lambda b, t: _npy(t, np.full((2, 3, 4, 4), np.nan, np.float32)),
    "out_of_range": lambda b, t: _npy(t, np.full((2, 3, 4, 4), 2.0, np.float32)),
    "zero_height": lambda b, t: _npy(t, np.zeros((2, 3, 0, 4), np.uint8)),
    "empty_set": lambda b, t: _npy(t, np.zeros((0, 3, 4, 4), np.float32)),
    "other_size": lambda b, t: _npy(t, np.zeros((20, 3, 8, 8), np.uint8)),
    "name_too_long": lambda b, t: str(t / ("a" * 300 + ".npy")),
    "unknown_user": lambda b, t: "~no-such-user-iet/x.npy",
}


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _huge_header() -> bytes:
    """An .npy header declaring 3 TB of uint8 in front of 100 bytes: must fail before allocating."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 3, 10**3, 10**3)}
    )
    return buf.getvalue() + bytes(100)


def _npz_as_npy(tmp: Path) -> str:
    np.savez(tmp / "arch.npz", a=np.zeros(3))
    return str((tmp / "arch.npz").rename(tmp / "arch.npy"))


def _folder_set(root: str) -> list[str]:
    sets = ["dataset=imagefolder", f"data-root={root}", "train-size=0", "mq-neighbours=1", "num-shards=1"]
    return [arg for item in sets for arg in ("--set", item)]


def _cifar_offline() -> list[str]:
    sets = ["dataset=cifar10", "download=false", "data-root={tmp}", "train-size=0"]
    return [arg for item in sets for arg in ("--set", item)]


def _settings_device(base: Path, tmp: Path) -> list[str]:
    """A run trained on a GPU, evaluated on a machine without that device (no --device given)."""
    return ["evaluate", _run_copy(base, tmp, 'device = "cuda:999"\n'), "--out", str(tmp / "out")]


def _corrupt_index(pipe: Path) -> None:
    (pipe / "model_index.json").write_text("{")


def _zero_weights(pipe: Path) -> None:
    _weights(pipe).write_bytes(b"")


def _truncate_weights(pipe: Path) -> None:
    _weights(pipe).write_bytes(_weights(pipe).read_bytes()[:1000])


def _wide_config(pipe: Path) -> None:
    _edit_config(pipe, block_out_channels=[64, 64])


def _bad_blocks(pipe: Path) -> None:
    _edit_config(pipe, block_out_channels="abc")


def _list_config(pipe: Path) -> None:
    (pipe / "unet" / "config.json").write_text("[]")


def _other_class(pipe: Path) -> None:
    _edit_config(pipe, _class_name="UNet2DConditionModel")


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")

# (case id, argv builder, text the one line must contain: the option or the file)
CASES = [
    # ---- iet-agc mq: files and folders
    ("mq-missing-npy", _mq(train="missing_npy"), "--train: "),
    ("mq-missing-path", _mq(train="missing_path"), "--train: "),
    ("mq-empty-folder", _mq(train="empty_folder"), "--train: empty set"),
    ("mq-folder-named-like-image", _mq(train="folder_named_png"), "x.png is a folder named like an image"),
    ("mq-spec-is-folder-named-png", _mq(train="spec_dir_named_png"), "--train: empty set"),
    ("mq-zero-byte-png", _mq(train="zero_byte_png"), "zero.png: not a readable image"),
    ("mq-truncated-png", _mq(train="truncated_png"), "cut.png: not a readable image"),
    ("mq-garbage-png", _mq(train="garbage_png"), "text.png: not a readable image"),
    ("mq-npy-named-jpg", _mq(train="not_image_jpg"), "array.jpg: not a readable image"),
    ("mq-tiff-named-png", _mq(train="tiff_named_png"), "tiff.png: not a readable image"),
    ("mq-mixed-sizes", _mq(train="mixed_sizes"), "big.png is 8x8"),
    ("mq-decompression-bomb", _mq(train="decompression_bomb"), "bomb.png: not a readable image"),
    ("mq-zero-byte-npy", _mq(train="zero_byte_npy"), "--train: cannot read"),
    ("mq-garbage-npy", _mq(train="garbage_npy"), "--train: cannot read"),
    ("mq-truncated-npy", _mq(train="truncated_npy"), "--train: cannot read"),
    ("mq-pickled-object-npy", _mq(train="object_npy"), "--train: cannot read"),
    ("mq-npy-header-beyond-file", _mq(generated="huge_header_npy"), "declares more data than the file holds"),
    ("mq-npz-named-npy", _mq(train="npz_named_npy"), "--train: "),
    ("mq-five-dims", _mq(train="five_dims"), "--train: expected N,C,H,W"),
    ("mq-two-channels", _mq(train="two_channels"), "--train: cannot find a channel axis"),
    ("mq-bool-dtype", _mq(generated="bool_dtype"), "--generated: expected uint8"),
    ("mq-int64-dtype", _mq(generated="int64_dtype"), "--generated: expected uint8"),
    ("mq-nan", _mq(generated="nan_values"), "--generated: contains NaN"),
    ("mq-out-of-range", _mq(generated="out_of_range"), "--generated: float values must lie in [0, 1]"),
    ("mq-zero-height", _mq(generated="zero_height"), "--generated: images of height or width 0"),
    ("mq-empty-set", _mq(generated="empty_set"), "--generated: empty set"),
    ("mq-size-mismatch", _mq(train="other_size"), "--train: images of shape"),
    ("mq-holdout-single-image", _mq(None, None, "--holdout", "{base}/pngs/00.png"), "--holdout: "),
    ("mq-name-too-long", _mq(train="name_too_long"), "--train: cannot use"),
    ("mq-unknown-user", _mq(train="unknown_user"), "--train: cannot use"),
    # ---- iet-agc mq: counts, thresholds, devices, outputs, arguments
    ("mq-n-zero", _mq(None, None, "--n", "0"), "--n: must be >= 1"),
    ("mq-n-negative", _mq(None, None, "--n", "-5"), "--n: must be >= 1"),
    ("mq-n-huge", _mq(None, None, "--n", str(10**12)), "fewer than --n"),
    ("mq-n-not-int", _mq(None, None, "--n", "abc"), "--n: invalid int value"),
    ("mq-threshold-nan", _mq(None, None, "--thresholds", "nan"), "--thresholds: "),
    ("mq-threshold-inf", _mq(None, None, "--thresholds", "0.4,inf"), "--thresholds: "),
    ("mq-threshold-zero", _mq(None, None, "--thresholds", "0"), "--thresholds: "),
    ("mq-threshold-above-1", _mq(None, None, "--thresholds", "1.5"), "--thresholds: "),
    ("mq-threshold-repeated", _mq(None, None, "--thresholds", "0.4,0.40"), "--thresholds: a threshold is repeated"),
    ("mq-threshold-text", _mq(None, None, "--thresholds", "0.4,,x"), "--thresholds: "),
    ("mq-device-cuda-x", _mq(None, None, "--device", "cuda:x"), "--device: must be one of"),
    ("mq-device-gpu", _mq(None, None, "--device", "gpu"), "--device: must be one of"),
    ("mq-device-meta", _mq(None, None, "--device", "meta"), "--device: must be one of"),
    ("mq-device-cuda-999", _mq(None, None, "--device", "cuda:999"), "--device: cuda:999"),
    pytest.param("mq-device-cuda", _mq(None, None, "--device", "cuda"), "--device: cuda: no cuda", marks=NO_CUDA),
    pytest.param("mq-device-mps", _mq(None, None, "--device", "mps"), "--device: mps: no mps", marks=NO_MPS),
    ("mq-per-image-under-file", _mq(None, None, "--per-image", "{base}/afile/x.csv"), "--per-image: cannot write"),
    ("mq-per-image-is-folder", _mq(None, None, "--per-image", "{tmp}"), "--per-image: "),
    ("mq-unknown-argument", _mq(None, None, "--bogus"), "unrecognized arguments: --bogus"),
    ("mq-missing-train", lambda b, t: ["mq", "--generated", str(b / "gen.npy")], "required: --train"),
    # ---- iet-agc evaluate: the model folder
    ("ev-missing-source", _ev("nope"), "nope: does not exist"),
    ("ev-not-a-pipeline", _ev("pngs"), "pngs: a folder, neither"),
    ("ev-source-is-file", _ev("afile"), "afile: a file, neither"),
    ("ev-corrupt-model-index", _ev(lambda b, t: _pipeline(b, t, _corrupt_index)), "model_index.json: not a readable"),
    ("ev-no-unet", _ev(lambda b, t: _pipeline(b, t, lambda p: shutil.rmtree(p / "unet"))), "no unet/config.json"),
    ("ev-zero-byte-weights", _ev(lambda b, t: _pipeline(b, t, _zero_weights)), "unet: cannot load the UNet"),
    ("ev-truncated-weights", _ev(lambda b, t: _pipeline(b, t, _truncate_weights)), "unet: cannot load the UNet"),
    ("ev-pickle-weights-only", _ev(lambda b, t: _pipeline(b, t, _only_bin)), ".bin weights are pickles"),
    ("ev-config-mismatch", _ev(lambda b, t: _pipeline(b, t, _wide_config)), "unet: cannot load the UNet"),
    ("ev-config-wrong-type", _ev(lambda b, t: _pipeline(b, t, _bad_blocks)), "unet: cannot load the UNet"),
    ("ev-config-list", _ev(lambda b, t: _pipeline(b, t, _list_config)), "config.json: expected a JSON object"),
    ("ev-config-other-class", _ev(lambda b, t: _pipeline(b, t, _other_class)), "not a UNet2DModel"),
    ("ev-corrupt-settings-toml", _ev(lambda b, t: _run_copy(b, t, "train-size = = 3\n")), "settings.toml: not a"),
    (
        "ev-settings-toml-bad-value",
        _ev(lambda b, t: _run_copy(b, t, "sample-steps = 0\n")),
        "settings.toml: sample-steps",
    ),
    ("ev-settings-toml-absent-device", _settings_device, "device (from "),
    # ---- iet-agc evaluate: counts, devices, outputs, settings
    ("ev-num-images-zero", _ev("run", "--num-images", "0"), "--num-images: eval-num-images"),
    ("ev-num-images-negative", _ev("run", "--num-images", "-3"), "--num-images: eval-num-images"),
    ("ev-num-images-huge", _ev("run", "--num-images", str(10**11)), "--num-images: eval-num-images"),
    ("ev-num-images-text", _ev("run", "--num-images", "many"), "--num-images: invalid int value"),
    ("ev-device-gpu", _ev("run", "--device", "gpu"), "--device: device: must be one of"),
    ("ev-device-cuda-999", _ev("run", "--device", "cuda:999"), "--device: cuda:999"),
    ("ev-out-under-file", _ev("run", "--out", "{base}/afile/sub"), "--out: cannot write"),
    ("ev-out-is-file", _ev("run", "--out", "{base}/afile"), "--out: "),
    ("ev-set-no-equals", _ev("run", "--set", "sample-steps"), "--set: expected key=value pairs"),
    ("ev-set-unknown-key", _ev("run", "--set", "no-such-key=1"), "no-such-key: unknown setting"),
    ("ev-sample-steps-zero", _ev("run", "--set", "sample-steps=0"), "sample-steps: must be"),
    ("ev-batch-size-negative", _ev("run", "--set", "eval-batch-size=-1"), "eval-batch-size: must be"),
    ("ev-neighbours-huge", _ev("run", "--set", "mq-neighbours=100000"), "mq-neighbours: must be"),
    ("ev-thresholds-nan", _ev("run", "--set", "mq-thresholds=nan"), "mq-thresholds: must be"),
    ("ev-image-size-mismatch", _ev("run", "--set", "image-size=16"), "set dataset/image-size"),
    ("ev-data-root-missing", _ev("run", *_folder_set("{tmp}/nope")), "data-root: must be an existing directory"),
    ("ev-data-root-bad-image", _ev("run", *_folder_set("{base}/badroot")), "cut.png: not a readable image"),
    ("ev-fid-weights-missing", _ev("run", "--set", "fid=true", "--set", "fid-weights={tmp}/w.pth"), "fid-weights: "),
    ("ev-fid-cache-under-file", _ev("run", "--set", "fid-cache-dir={base}/afile/c"), "fid-cache-dir: "),
    ("ev-cifar-offline", _ev("run", *_cifar_offline()), "data-root: "),
    ("ev-unknown-argument", _ev("run", "--frobnicate"), "unrecognized arguments: --frobnicate"),
]


@pytest.fixture(scope="module", autouse=True)
def _bad_root(base):
    """A data-root folder for the imagefolder case: good PNGs and one truncated file."""
    root = base / "badroot"
    root.mkdir(exist_ok=True)
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png_bytes())
    (root / "cut.png").write_bytes(_png_bytes()[:40])


def _call(argv: list[str]) -> int:
    try:
        return iet_cli.main(argv)
    except SystemExit as exc:  # argparse ends bad arguments with SystemExit(2)
        return exc.code


def _case_ids(cases) -> list[str]:
    return [c.values[0] if hasattr(c, "values") else c[0] for c in cases]


@pytest.mark.parametrize(("case", "argv", "names"), CASES, ids=_case_ids(CASES))
def test_bad_input_exits_2_with_one_line(case, argv, names, base, tmp_path, capsys):
    args = argv(base, tmp_path)
    code = _call(args)
    captured = capsys.readouterr()
    tool = args[0]
    assert code == 2, (case, code, captured.err)
    assert captured.out == "", captured.out
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    assert lines[0].startswith(f"iet-agc {tool}: error: "), lines[0]
    assert names in lines[0], (names, lines[0])


def test_cases_are_distinct_and_many():
    ids = _case_ids(CASES)
    assert len(set(ids)) == len(ids) >= 30


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # digit_fd of 2 images
def test_the_good_inputs_pass(base, tmp_path, capsys):
    """The fixtures are good: only the changes of each case make it bad."""
    argv = _mq(None, None, "--per-image", "{tmp}/new/ratios.csv")(base, tmp_path)
    assert _call(argv) == 0 and json.loads(capsys.readouterr().out)["n"] == 5
    assert (tmp_path / "new" / "ratios.csv").is_file()
    assert _call(["mq", "--generated", str(base / "pngs"), "--train", str(base / "pngs"), "--n", "5"]) == 0
    capsys.readouterr()
    assert _call(_ev("run", "--num-images", "2")(base, tmp_path)) == 0
    assert json.loads(capsys.readouterr().out)["n_generated"] == 2


def _tool() -> list[str]:
    script = Path(sys.executable).with_name("iet-agc")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "iet_agc.cli"]


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("mq-truncated-png", "cut.png: not a readable image"),
        ("ev-zero-byte-weights", "cannot load the UNet"),
        ("ev-data-root-bad-image", "cut.png: not a readable image"),  # after good images, whose warnings stay quiet
    ],
)
def test_no_traceback_reaches_the_terminal(case, names, base, tmp_path):
    _, argv, _ = next(c for c in CASES if c[0] == case)
    proc = subprocess.run([*_tool(), *argv(base, tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert names in proc.stderr
