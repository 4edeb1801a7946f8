"""The whole app in-process (flwr.simulation.run_simulation) on a tiny configuration."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import noise_pngs
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
    first = _simulate({**cfg, "shards-per-message": 1})  # a message per shard: two of a node's may run at once
    second = _simulate({**cfg, "out-dir": str(out / "b"), "shards-per-message": 0})  # a node's 2 shards in one message
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
    for name in ("settings.toml", "samples.png", "report.md", "skip_counts.csv", "skip_counts.png", "curves.png"):
        assert (run / name).is_file(), name
    assert "![curves](curves.png)" in (run / "report.md").read_text()
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


def test_same_seed_same_results_with_a_message_per_shard_or_per_node(two_runs):
    """Two runs of one seed in one process (same threads, shapes, code), one with a message per
    shard, one with each node's shards in one message: bitwise equal (but the clocks)."""
    from safetensors.torch import load_file

    for name, clocks in [
        ("rounds.csv", ["seconds"]),
        ("shards.csv", ["train_seconds", "node"]),  # node ids are drawn afresh by each simulation
        ("assignments.csv", []),
        ("moved.csv", []),
        ("skip_counts.csv", []),
    ]:
        a, b = (pd.read_csv(r / name).drop(columns=clocks) for r in two_runs)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    groups = [pd.read_csv(r / "shards.csv").groupby(["round", "node"])["shard"].apply(tuple) for r in two_runs]
    assert sorted(groups[0]) == sorted(groups[1])  # the same shards shared a node
    wa, wb = (load_file(r / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors") for r in two_runs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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


def test_a_node_with_another_data_copy_is_set_aside_and_every_sample_trains_again(tmp_path, caplog):
    """Node 2 of 3 holds other images: it refuses every shard; after node-max-failures rounds its
    shard moves to a healthy node, MSR never strands samples in it, and every sample trains again."""
    from flwr.clientapp import ClientApp

    from fl_app.client_app import make_client_app

    ours, theirs = noise_pngs(tmp_path / "ours", 36, 0, 8), noise_pngs(tmp_path / "theirs", 36, 1, 8)
    inner = make_client_app()
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if context.node_config["partition-id"] == 2:
            context.node_config["data-root"] = str(theirs)
        return inner(msg, context)

    overrides = {
        "dataset": "imagefolder",
        "data-root": str(ours),
        "image-size": 8,
        "train-size": 0,
        "num-shards": 3,
        "num-rounds": 4,
        "local-epochs": 1,
        "batch-size": 12,
        "msr-proportion": 0.5,
        "node-max-failures": 2,
        "eval-every": 0,
        "eval-num-images": 12,
        "sample-steps": 2,
        "mq-neighbours": 4,
        "fid": False,
        "out-dir": str(tmp_path / "runs"),
    }
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_simulation(server_app=make_server_app(overrides), client_app=app, num_supernodes=3)
    (run,) = (tmp_path / "runs").iterdir()
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["replies"].tolist() == [2, 2, 3, 3] and rounds["dropped"].tolist() == [1, 1, 0, 0]
    dropped = pd.read_csv(run / "dropped.csv")
    assert len(dropped) == 2 and dropped["reason"].str.contains("data set mismatch").all()
    bad_node = int(dropped["node"].iloc[0])
    shards = pd.read_csv(run / "shards.csv")
    assert bad_node not in set(shards["node"])
    assign = pd.read_csv(run / "assignments.csv")
    for r in (3, 4):  # after the limit, every sample is trained again
        trained = shards[shards["round"] == r]["shard"]
        ids = assign[(assign["round"] == r) & assign["shard"].isin(trained)]["sample_id"]
        assert sorted(ids) == list(range(36))
    moved = pd.read_csv(run / "moved.csv")
    failed_shard = int(dropped["shard"].iloc[0])
    assert not ((moved["round"] <= 2) & (moved["to_shard"] == failed_shard)).any()  # nothing moved in
    out = caplog.text  # Flower's logger (the ServerApp's lines)
    assert f"node {bad_node} set aside: 2 failed rounds in a row" in out and "data set mismatch" in out
    assert f"set aside: node {bad_node} (2 failed rounds in a row" in out  # the run's summary line
    assert "nodes set aside" in (run / "report.md").read_text()
