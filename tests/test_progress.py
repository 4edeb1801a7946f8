"""Progress of long work: timed lines through Flower's logger inside a run, tqdm bars in the tools."""

import fcntl
import json
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import std as tqdm_std
from tqdm import tqdm

from ddpm.progress import INTERVAL_ENV, bars, progress
from ddpm.schedule import ddim_sample
from ddpm.unet import build_unet
from evaluation.mq import nearest_neighbours


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flwr.iet_agc"]


def test_long_work_logs_timed_lines_through_flowers_logger(caplog, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.05")
    now = [1000.0]  # tqdm's clock, moved by the test: the lines follow time, not how busy the CPU is
    monkeypatch.setattr(tqdm_std, "time", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="flwr"):
        with progress(6, "local training", "step") as bar:
            for _ in range(6):
                now[0] += 0.03
                bar.update()
    lines = _lines(caplog)
    assert 2 <= len(lines) <= 4, lines  # about every 0.05 s of 0.18 s, never per step
    assert lines[-1].startswith("local training: 6/6 step (100%)")
    assert all(line.startswith("local training: ") for line in lines)


def test_short_work_and_interval_zero_say_nothing(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="flwr"):
        monkeypatch.setenv(INTERVAL_ENV, "30")
        with progress(3, "quick") as bar:
            bar.update(3)
        monkeypatch.setenv(INTERVAL_ENV, "0")
        with progress(3, "off") as bar:
            time.sleep(0.02)
            bar.update(3)
    assert _lines(caplog) == []


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(ValueError, match=f"{INTERVAL_ENV}: must be"):
        progress(1, "x")


def test_tools_draw_bars_only_on_a_terminal(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"), bars():
        bar = progress(4, "sampling", "img")
        assert type(bar) is tqdm and bar.disable  # pytest's stderr is not a terminal: quiet
        bar.update(4)
        bar.close()
    assert type(progress(1, "after")) is not tqdm  # the run's timed lines again
    assert capsys.readouterr().err == "" and _lines(caplog) == []


def test_sampling_and_the_nearest_neighbour_pass_report_progress(caplog, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "1e-9")
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1)
    with caplog.at_level(logging.INFO, logger="flwr"):
        images = ddim_sample(model, 4, steps=2, batch_size=2)
        nearest_neighbours(images, torch.rand(20, 1, 8, 8), n=3, train_chunk=8, desc="kNN of the samples")
    lines = _lines(caplog)
    assert any(line.startswith("DDIM sampling (2 steps): 4/4 img (100%)") for line in lines), lines
    assert any(line.startswith("kNN of the samples: 80.0/80.0 pairs (100%)") for line in lines), lines


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal")
def test_iet_agc_mq_draws_a_bar_on_a_terminal(tmp_path):
    """The tool on a terminal (a pty, 120 columns) draws its kNN bar on stderr; stdout keeps the JSON."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "g.npy", rng.random((40, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "t.npy", rng.random((60, 1, 8, 8), dtype=np.float32))
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    argv = ["iet-agc", "mq", "--generated", "g.npy", "--train", "t.npy", "--n", "5"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        argv, cwd=tmp_path, stderr=sub, stdout=subprocess.PIPE, text=True, env={**os.environ, "PATH": path}, timeout=120
    )
    os.close(sub)
    drawn = b""
    while select.select([main], [], [], 0.5)[0]:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(main)
    assert proc.returncode == 0 and json.loads(proc.stdout)["n_generated"] == 40
    assert "nearest neighbours of --generated:" in drawn.decode(errors="replace") and "2.40k" in drawn.decode()
