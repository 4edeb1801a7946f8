"""IET over any Flower strategy: the named aggregations, FedProx's proximal term, robust averaging,
server-optimizer state in the checkpoint, and a user's own strategy."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from test_retry import app_run
from test_strategy import FakeGrid, _strategy, push, reply

from clients.config import TrainConfig
from clients.trainer import ShardState, proximal_term, train_shard, warmup_schedule
from ddpm.unet import build_unet
from examples.custom_aggregation import ClippedFedAvg, aggregator
from fl_app.checkpoint import load_checkpoint
from fl_app.client_app import app as client_app
from fl_app.server_app import make_server_app
from fl_app.settings import AGGREGATIONS, Settings
from strategies.aggregation import AggregationConfig, AggregatorWaits, Resumable, make_aggregator

SHARDS = [[0, 1], [2, 3], [4, 5], [6, 7]]


def _aggregate(aggregator, weights):
    """One round of four shards on two nodes whose replies carry ``w`` filled with ``weights``."""
    s = _strategy(SHARDS, 8, aggregator=aggregator)
    msgs = list(s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1, 2])))
    push(msgs)
    arrays, metrics = s.aggregate_train(1, [reply(m, w) for m, w in zip(msgs, weights, strict=True)])
    return s, arrays["w"].numpy(), metrics


@pytest.mark.usefixtures("flower_task")
def test_fedtrimmedavg_ignores_one_shard_scaled_by_1e3_where_fedavg_does_not():
    weights = [1.0, 1.1, 0.9, 1e3]
    _, trimmed, _ = _aggregate(make_aggregator(AggregationConfig(aggregation="fedtrimmedavg")), weights)
    _, mean, metrics = _aggregate(make_aggregator(AggregationConfig(aggregation="fedavg")), weights)
    assert np.allclose(trimmed, (1.0 + 1.1) / 2)  # beta 0.25 of 4: the largest and smallest cut
    assert np.allclose(mean, sum(weights) / 4)  # equal shard sizes
    assert metrics["train-loss"] == pytest.approx(sum(weights) / 4)  # the round's books: every reply
    _, median, _ = _aggregate(make_aggregator(AggregationConfig(aggregation="fedmedian")), weights)
    assert np.allclose(median, (1.0 + 1.1) / 2)


@pytest.mark.usefixtures("flower_task")
def test_fedprox_sends_its_mu_to_every_shard_and_the_strategies_take_their_settings():
    s = _strategy(SHARDS, 8, aggregator=make_aggregator(AggregationConfig(aggregation="fedprox", fedprox_mu=0.3)))
    msgs = s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1]))
    assert [m.content["config"]["proximal-mu"] for m in msgs] == [0.3] * 4
    assert all("proximal-mu" not in m.content["config"] for m in _round_messages(make_aggregator(AggregationConfig())))
    avgm = make_aggregator(AggregationConfig(aggregation="fedavgm", fedavgm_lr=0.5, fedavgm_momentum=0.8))
    assert (avgm.server_learning_rate, avgm.server_momentum) == (0.5, 0.8)
    adam = make_aggregator(AggregationConfig(aggregation="fedadam", fedadam_eta=0.02, fedadam_tau=0.1))
    assert (adam.eta, adam.tau) == (0.02, 0.1)
    assert make_aggregator(AggregationConfig(aggregation="fedtrimmedavg", fedtrimmedavg_beta=0.4)).beta == 0.4


def _round_messages(aggregator):
    s = _strategy(SHARDS, 8, aggregator=aggregator)
    return s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1]))


@pytest.mark.usefixtures("flower_task")
def test_fedavgm_moves_by_its_momentum_and_its_state_survives_a_checkpoint():
    agg = make_aggregator(AggregationConfig(aggregation="fedavgm", fedavgm_lr=1.0, fedavgm_momentum=0.5))
    s, first, _ = _aggregate(agg, [1.0] * 4)
    assert np.allclose(first, 1.0)  # round 1: momentum is the first pseudo-gradient, lr 1
    state = s.state().aggregator
    assert isinstance(agg, Resumable) and list(state) == ["momentum.00000"]
    again = make_aggregator(AggregationConfig(aggregation="fedavgm", fedavgm_lr=1.0, fedavgm_momentum=0.5))
    again.load_state_dict(state)
    # round 2 from w = 1 with the same replies (w = 2): pseudo-gradient -1, momentum 0.5 * -1 + -1
    for a in (agg, again):
        s2 = _strategy(SHARDS, 8, aggregator=a)
        msgs = list(s2.configure_train(2, ArrayRecord({"w": torch.ones(2, 2)}), ConfigRecord(), FakeGrid([1])))
        push(msgs)
        arrays, _ = s2.aggregate_train(2, [reply(m, 2.0) for m in msgs])
        assert np.allclose(arrays["w"].numpy(), 1.0 + 1.5)


@pytest.mark.usefixtures("flower_task")
def test_fedadam_state_round_trips():
    agg = make_aggregator(AggregationConfig(aggregation="fedadam"))
    s, _, _ = _aggregate(agg, [1.0] * 4)
    state = s.state().aggregator
    assert sorted(state) == ["m_t.w", "v_t.w"]
    other = make_aggregator(AggregationConfig(aggregation="fedadam"))
    other.load_state_dict(state)
    assert np.array_equal(other.m_t["w"], agg.m_t["w"]) and np.array_equal(other.v_t["w"], agg.v_t["w"])


@pytest.mark.usefixtures("flower_task")
def test_an_aggregator_that_waits_for_more_nodes_stops_with_a_clear_error():
    s = _strategy(SHARDS, 8, aggregator=FedAvg(min_available_nodes=5))
    with pytest.raises(AggregatorWaits, match="FedAvg waits for more than the 1 node"):
        s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1]))


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("name", AGGREGATIONS)
def test_flowers_configure_train_asks_the_stand_in_grid_for_nodes_twice(name, monkeypatch):
    """The coupling to Flower most likely to break on an upgrade, pinned to the installed flwr:
    ``ShardNodes`` lets ``configure_train`` ask for the nodes twice (flwr 1.41.0: FedAvg's own
    count, then ``sample_nodes``' wait loop) and takes a third call as waiting for more nodes. If
    this fails after an upgrade, read ``flwr.serverapp.strategy`` again and change ``ShardNodes``."""
    import flwr

    from strategies import aggregation

    calls, stand_in = [], aggregation.ShardNodes

    class Counting(stand_in):
        def get_node_ids(self) -> list[int]:
            calls.append(1)
            return stand_in.get_node_ids(self)

    monkeypatch.setattr(aggregation, "ShardNodes", Counting)
    key, arrays, _ = aggregation.instruction(
        make_aggregator(AggregationConfig(aggregation=name)),
        1,
        ArrayRecord({"w": torch.zeros(2)}),
        ConfigRecord(),
        [7, 8],
    )
    assert len(calls) == 2, f"flwr {flwr.__version__} asks {len(calls)} times (flwr 1.41.0: 2): revise ShardNodes"
    assert key and list(arrays) == ["w"]


def test_proximal_term_is_fedprox_eq2():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    w0 = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert proximal_term(w, w0, 0.2).item() == pytest.approx(0.1 * (1 + 4 + 4))


def test_a_large_mu_keeps_the_shard_near_the_round_weights():
    settings = TrainConfig(local_epochs=2, batch_size=16, lr=0.01, warmup_epochs=0, taa=False)
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)

    def drift(mu):
        torch.manual_seed(0)
        model = build_unet("tiny", 8, 1)
        start = [p.detach().clone() for p in model.parameters()]
        train_shard(model, images, settings, ShardState(), device=torch.device("cpu"), seed=1, proximal_mu=mu)
        return sum((p.detach() - a).pow(2).sum() for p, a in zip(model.parameters(), start, strict=True)).item()

    assert drift(100.0) < 0.5 * drift(0.0)


def test_warm_up_is_linear_from_zero_and_continues_across_rounds():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.1)
    sched = warmup_schedule(opt, 4, 0)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    later = torch.optim.Adam([p], lr=0.1)  # the next round: a new optimizer, 3 steps done
    sched = warmup_schedule(later, 4, 3)
    for _ in range(3):
        lrs.append(later.param_groups[0]["lr"])
        later.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


@pytest.mark.usefixtures("flower_task")  # the ClientApp makes its reply as inside a Flower task
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_each_named_aggregation_runs_a_round(aggregation, tiny_run, clock, tmp_path):
    """The app's ServerApp and ClientApp in this process (``app_run``; the same app under Flower's
    simulation: the custom aggregation below and tests/test_simulation.py)."""
    cfg = {**tiny_run, "num-rounds": 1, "aggregation": aggregation, "eval-num-images": 20, "local-epochs": 1}
    run = app_run(clock, cfg, tmp_path / "state")
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["replies"].tolist() == [4] and np.isfinite(rounds["train_loss"]).all()
    ckpt = load_checkpoint(run)
    assert bool(ckpt.aggregator) == (aggregation in ("fedavgm", "fedadam"))
    assert all(np.isfinite(v).all() for v in ckpt.weights.values())


@pytest.mark.usefixtures("flower_task")
def test_the_readme_custom_aggregation_bounds_each_shard_update():
    # updates from w = 0: three shards of norm 2 * 0.1 = 0.2, one of norm 2 * 1e3, clipped to 1.0
    _, w, _ = _aggregate(ClippedFedAvg(1.0, min_train_nodes=1, min_available_nodes=1), [0.1, 0.1, 0.1, 1e3])
    assert np.allclose(w, (3 * 0.1 + 1.0 / 2) / 4)  # the big one contributes 1.0 / 2 per entry (4 entries)


def test_the_readme_custom_aggregation_runs_in_the_app(tiny_run):
    run_simulation(
        server_app=make_server_app({**tiny_run, "num-rounds": 1}, aggregator=aggregator),
        client_app=client_app,
        num_supernodes=1,
    )
    (run,) = Path(tiny_run["out-dir"]).iterdir()
    assert pd.read_csv(run / "rounds.csv")["replies"].tolist() == [4]


def test_the_readme_shows_the_example_file_as_it_is():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("(`examples/custom_aggregation.py`)", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = (root / "examples" / "custom_aggregation.py").read_text().split('"""\n\n', 1)[1]
    assert block == code


def test_the_app_settings_give_the_aggregation_config_and_its_defaults_are_the_settings():
    from fl_app.config import aggregation_config

    assert aggregation_config(Settings()) == AggregationConfig()
    got = aggregation_config(Settings(aggregation="fedadam", fedadam_eta=0.05))
    assert (got.aggregation, got.fedadam_eta) == ("fedadam", 0.05)
