"""``iet-agc mq`` and ``iet-agc evaluate`` end to end on tiny inputs, including the bad-input exits."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image

from ddpm.schedule import train_scheduler
from ddpm.unet import build_unet
from evaluation.mq import copy_scores, mq_counts, nearest_neighbours
from iet_agc.cli import main


@pytest.fixture
def arrays(tmp_path):
    """uint8 N,H,W,C training images, float N,C,H,W generated images (5 exact copies), a hold-out."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(60, 4, 4, 3), dtype=np.uint8)
    generated = rng.random((20, 3, 4, 4), dtype=np.float32)
    generated[:5] = train[[1, 5, 9, 13, 17]].transpose(0, 3, 1, 2) / 255.0
    holdout = rng.integers(0, 256, size=(30, 3, 4, 4), dtype=np.uint8)
    paths = {}
    for name, a in (("train", train), ("generated", generated), ("holdout", holdout)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], a)
    return paths, train, generated, holdout


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def test_mq_prints_counts_and_copy_scores(arrays, capsys, tmp_path):
    paths, train, generated, holdout = arrays
    per_image = tmp_path / "per_image.csv"
    args = ["mq", "--generated", str(paths["generated"]), "--train", str(paths["train"]), "--n", "10"]
    code = main([*args, "--holdout", str(paths["holdout"]), "--thresholds", "0.3,0.5", "--per-image", str(per_image)])
    assert code == 0
    got = _json(capsys)
    t = torch.from_numpy(train).permute(0, 3, 1, 2)
    nb = nearest_neighbours(torch.from_numpy(generated), t, 10)
    held = nearest_neighbours(torch.from_numpy(holdout), t, 10).ratio
    expected = {**mq_counts(nb.ratio, (0.3, 0.5)), **copy_scores(nb.ratio, held)}
    assert got == {**expected, "n_generated": 20, "n_train": 60, "n": 10, "n_holdout": 30}
    assert got["mq_0.3"] >= 5
    table = pd.read_csv(per_image)
    assert table["nearest"].tolist()[:5] == [1, 5, 9, 13, 17] and (table["ratio"][:5] == 0).all()
    assert main(args) == 0
    assert set(_json(capsys)) == {"mq_0.4", "mq_0.5", "mq_0.6", "n_generated", "n_train", "n"}


def test_mq_reads_image_folders(arrays, capsys, tmp_path):
    paths, train, _, _ = arrays
    folder = tmp_path / "train_png"
    folder.mkdir()
    for i, img in enumerate(train):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        Image.fromarray(train[i, :, :, 0]).save(grey / f"{i}.png")
    assert main(["mq", "--generated", str(paths["generated"]), "--train", str(folder), "--n", "10"]) == 0
    from_folder = _json(capsys)
    assert main(["mq", "--generated", str(paths["generated"]), "--train", str(paths["train"]), "--n", "10"]) == 0
    assert from_folder == _json(capsys)
    assert main(["mq", "--generated", str(grey), "--train", str(grey), "--n", "2"]) == 0  # 1-channel folder
    assert _json(capsys)["mq_0.4"] == 3


def _bad(tmp_path, name: str, array: np.ndarray) -> str:
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return str(path)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("shape", "do not match"),
        ("empty", "empty set"),
        ("few", "fewer than --n 10"),
        ("nan", "NaN"),
        ("range", r"\[0, 1\]"),
        ("dtype", "uint8"),
        ("thresholds", "--thresholds"),
        ("missing", "does not exist"),
        ("emptydir", "empty set"),
    ],
)
def test_mq_bad_inputs_exit_2(arrays, tmp_path, capsys, case, match):
    paths, *_ = arrays
    gen, train, extra = str(paths["generated"]), str(paths["train"]), []
    if case == "shape":
        train = _bad(tmp_path, "t", np.zeros((20, 3, 8, 8), np.uint8))
    elif case == "empty":
        gen = _bad(tmp_path, "g", np.zeros((0, 3, 4, 4), np.float32))
    elif case == "few":
        train = _bad(tmp_path, "t", np.zeros((9, 3, 4, 4), np.uint8))
    elif case == "nan":
        gen = _bad(tmp_path, "g", np.full((2, 3, 4, 4), np.nan, np.float32))
    elif case == "range":
        gen = _bad(tmp_path, "g", np.full((2, 3, 4, 4), 2.0, np.float32))
    elif case == "dtype":
        gen = _bad(tmp_path, "g", np.zeros((2, 3, 4, 4), np.int64))
    elif case == "thresholds":
        extra = ["--thresholds", "0.4,abc"]
    elif case == "missing":
        gen = str(tmp_path / "nope.npy")
    elif case == "emptydir":
        (tmp_path / "empty").mkdir()
        gen = str(tmp_path / "empty")
    assert main(["mq", "--generated", gen, "--train", train, "--n", "10", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "iet-agc mq: error:" in captured.err
    assert re.search(match, captured.err), captured.err


def test_mq_as_a_process(arrays, tmp_path):
    paths, *_ = arrays
    cmd = [sys.executable, "-m", "iet_agc.cli", "mq", "--generated", str(paths["generated"]), "--n", "10"]
    ok = subprocess.run([*cmd, "--train", str(paths["train"])], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["n_generated"] == 20
    bad = subprocess.run([*cmd, "--train", str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and bad.stdout == ""


def test_iet_agc_tool_has_the_subcommands(arrays, capsys):
    paths, *_ = arrays
    code = main(["mq", "--generated", str(paths["generated"]), "--train", str(paths["train"]), "--n", "10"])
    assert code == 0 and _json(capsys)["n"] == 10


def test_evaluate_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    DDPMPipeline(unet=build_unet("tiny", 8, 1), scheduler=train_scheduler()).save_pretrained(run / "pipeline")
    (run / "settings.toml").write_text(
        "train-size = 120\nnum-shards = 2\nsample-steps = 2\nmq-neighbours = 10\nfid = false\n"
        f'fid-cache-dir = "{tmp_path}"\n'
    )
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--num-images", "12", "--device", "cpu", "--out", str(out)]) == 0
    got = _json(capsys)
    assert got["n_generated"] == 12 and {"mq_0.4", "copy_1", "copy_5", "fid", "digit_fd"} <= set(got)
    assert got["fid"] is None and got["fid_reason"].startswith("disabled")
    assert (out / "eval_final.md").is_file() and (out / "pairs_final.png").is_file()
    assert json.loads((out / "metrics.json").read_text()) == got
    # a bare pipeline folder: settings from the run folder around it; a mismatched data set exits 2
    assert main(["evaluate", str(run / "pipeline"), "--num-images", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--set", "image-size=16", "--out", str(out)]) == 2
    assert "set dataset/image-size" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
