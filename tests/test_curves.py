"""curves.png: what each panel of a run's curves holds, drawn from rounds.csv."""

import math

import pandas as pd
import pytest
from PIL import Image

from evaluation.plots import curve_panels, plot_curves


def _rounds(fid=math.nan):
    nan = math.nan
    return pd.DataFrame(
        {
            "round": [1, 2, 3, 4],
            "train_loss": [0.5, 0.4, 0.3, 0.25],
            "skip_rate": [0.0, 0.1, 0.2, 0.2],
            "aug_rate": [0.0, 0.2, 0.3, 0.4],
            "moved": [10, 10, 10, 10],
            "mq_0.4": [nan, 3, nan, 1],
            "mq_0.5": [nan, 9, nan, 4],
            "copy_1": [nan, 0.02, nan, 0.0],
            "copy_5": [nan, 0.1, nan, 0.05],
            "fid": [nan, nan, nan, fid],
            "digit_fd": [nan, 20.0, nan, 15.0],
        }
    )


def test_panels_hold_the_evaluated_rounds_and_pick_the_quality_figure():
    panels = dict(curve_panels(_rounds()))
    assert list(panels["train loss (kept samples, eq. 8)"]["train_loss"].index) == [1, 2, 3, 4]
    assert set(panels["share of drawn samples"]) == {"skip_rate", "aug_rate"}
    mq = panels["MQ_delta: near-copies (lower: less memorization)"]
    assert set(mq) == {"mq_0.4", "mq_0.5"} and list(mq["mq_0.5"].items()) == [(2, 9.0), (4, 4.0)]
    assert list(panels["copy_1 / copy_5 (unseen real images: 0.01 / 0.05)"]["copy_5"]) == [0.1, 0.05]
    assert list(panels["digit_fd (lower: better images)"]["digit_fd"]) == [20.0, 15.0]  # FID never measured
    assert "fid" in dict(curve_panels(_rounds(fid=12.5)))["fid (lower: better images)"]


def test_a_run_without_evaluations_keeps_empty_panels_and_draws(tmp_path):
    rounds = _rounds().drop(columns=["copy_1", "copy_5"])
    rounds[["mq_0.4", "mq_0.5", "digit_fd"]] = math.nan
    panels = dict(curve_panels(rounds))
    assert panels["MQ_delta: near-copies (lower: less memorization)"] == {}
    assert panels["fid (lower: better images)"] == {}
    with Image.open(plot_curves(rounds, tmp_path / "curves.png")) as img:
        assert img.size == (1300, 640)


def test_no_rounds_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rounds: no rounds"):
        plot_curves(pd.DataFrame({"round": []}), tmp_path / "curves.png")
