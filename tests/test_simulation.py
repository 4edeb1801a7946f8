"""The whole app in-process (flwr.simulation.run_simulation) on a tiny configuration."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diffusers import DDPMPipeline
from flwr.simulation import run_simulation

from fl_app.client_app import app as client_app
from fl_app.server_app import make_server_app


def _simulate(overrides, supernodes=2):
    # num_cpus=1 on 2 cores: two backend actors, so two messages could run at once.
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=client_app,
        num_supernodes=supernodes,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    runs = sorted(Path(overrides["out-dir"]).iterdir())
    assert runs, "no run folder written"
    return runs[-1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from conftest import TINY_RUN

    out = tmp_path_factory.mktemp("sim")
    cfg = {**TINY_RUN, "out-dir": str(out / "a"), "num-rounds": 3, "eval-every": 2}
    first = _simulate(cfg)
    second = _simulate({**cfg, "out-dir": str(out / "b")})
    return first, second


def test_outputs_of_a_run(two_runs):
    run, _ = two_runs
    rounds = pd.read_csv(run / "rounds.csv")
    cols = ("round", "train_loss", "seconds", "mq_0.4", "mq_0.5", "mq_0.6", "fid", "skip_rate", "aug_rate", "moved")
    assert set(cols) <= set(rounds.columns)
    assert rounds["round"].tolist() == [1, 2, 3]
    assert rounds["mq_0.5"].isna().tolist() == [True, False, False]  # evaluated at round 2 and at the end
    assert rounds["fid"].isna().all()  # fid = false in the tiny run
    assert (rounds["moved"] == 4 * 7).all()  # 4 shards of 30, floor(0.25 * 30) = 7 each
    # the assignment each round trained on is a partition of the 120 ids
    assign = pd.read_csv(run / "assignments.csv")
    for _, part in assign.groupby("round"):
        assert sorted(part["sample_id"]) == list(range(120))
    moved = pd.read_csv(run / "moved.csv")
    assert len(moved) == 3 * 28 and ((moved["to_shard"] - moved["from_shard"]) % 4 == 1).all()
    # moved ids really changed shard in the next round's assignment
    r1 = moved[moved["round"] == 1]
    nxt = assign[assign["round"] == 2].set_index("sample_id")["shard"]
    assert (nxt.loc[r1["sample_id"]].to_numpy() == r1["to_shard"].to_numpy()).all()
    for name in ("settings.toml", "samples.png", "report.md", "skip_counts.csv", "skip_counts.png"):
        assert (run / name).is_file(), name
    pipe = DDPMPipeline.from_pretrained(run / "pipeline")
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 1


def test_shard_state_survives_with_several_shards_per_node(two_runs):
    """4 shards on 2 nodes with 2 actors: per-shard optimizer state must never be lost to a race."""
    run, _ = two_runs
    shards = pd.read_csv(run / "shards.csv")
    assert len(shards) == 3 * 4
    steps = shards["steps"].iloc[0]  # steps per round per shard (constant here)
    for _, row in shards.iterrows():
        assert row["local_step"] == row["round"] * steps, row.to_dict()
    assert shards.groupby("round")["node"].nunique().eq(2).all()  # both nodes used
    per_shard_nodes = shards.groupby("shard")["node"].nunique()
    assert (per_shard_nodes == 1).all()  # a shard stays on its node


def test_same_seed_same_results(two_runs):
    a, b = (pd.read_csv(r / "rounds.csv").drop(columns="seconds") for r in two_runs)
    pd.testing.assert_frame_equal(a, b)
    sa, sb = (pd.read_csv(r / "assignments.csv") for r in two_runs)
    pd.testing.assert_frame_equal(sa, sb)


def test_bad_setting_stops_before_training(tmp_path):
    from conftest import TINY_RUN

    with pytest.raises(Exception, match="num-shards"):
        _simulate({**TINY_RUN, "num-shards": 0, "out-dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())  # nothing trained, no run folder


def test_skip_counts_file_sums_match(two_runs):
    run, _ = two_runs
    counts = pd.read_csv(run / "skip_counts.csv")
    assert counts["sample_id"].tolist() == list(range(120)) and (counts["skips"] >= 0).all()
    assert np.issubdtype(counts["skips"].dtype, np.integer)
