"""The README's customization example works as shown, end to end."""

from pathlib import Path

import numpy as np
import pandas as pd
from flwr.simulation import run_simulation

from examples.custom_redistribution import MoveLeastSkipped
from fl_app.client_app import app as client_app
from fl_app.server_app import make_server_app
from strategies.msr import apply_moves, check_partition


def test_custom_rule_moves_least_skipped():
    shards = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]
    leaving = MoveLeastSkipped(0.5)(shards, [np.array([9, 0, 5, 1]), None], np.random.default_rng(0))
    moves = apply_moves(shards, leaving)
    assert moves.moved[0].tolist() == [1, 3] and moves.moved[1].size == 0
    check_partition(moves.shards, 8)


def test_custom_rule_runs_in_the_app(tiny_run):
    run_simulation(
        server_app=make_server_app({**tiny_run, "num-rounds": 1}, redistribution=MoveLeastSkipped(0.5)),
        client_app=client_app,
        num_supernodes=1,
    )
    (run,) = Path(tiny_run["out-dir"]).iterdir()
    moved = pd.read_csv(run / "moved.csv")
    assert len(moved) == 4 * 15  # 4 shards of 30, half of each moved by the custom rule
    skips = pd.read_csv(run / "shards.csv")
    assert len(skips) == 4
