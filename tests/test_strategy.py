import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from strategies.iet import IETStrategy, assign_nodes, in_waves
from strategies.msr import MemoryRedistribution

pytestmark = pytest.mark.usefixtures("flower_task")


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _strategy(shards, n, proportion=0.5):
    return IETStrategy(
        [np.asarray(s) for s in shards],
        num_samples=n,
        train_config={"lr": 0.1},
        redistribution=MemoryRedistribution(proportion),
        seed=0,
    )


def _reply(msg, weight, counts, **overrides):
    cfg = msg.content["config"]
    ids = np.asarray(cfg["ids"])
    content = {
        "arrays": ArrayRecord({"w": torch.full((2, 2), float(weight))}),
        "metrics": MetricRecord(
            {"num-examples": len(ids), "train-loss": weight, "skip-rate": 0.1, "aug-rate": 0.2, "steps": 3}
        ),
        "skips": ArrayRecord({"ids": torch.from_numpy(ids), "counts": torch.as_tensor(np.asarray(counts))}),
        "info": ConfigRecord({"shard": int(cfg["shard"]), "local-step": 3}),
    }
    content.update(overrides)
    return Message(content=RecordDict(content), reply_to=msg)


def test_assign_nodes_is_stable_and_balanced():
    first = assign_nodes(5, [30, 10, 20], {})
    assert first == {0: 10, 1: 20, 2: 30, 3: 10, 4: 20}
    assert assign_nodes(5, [20, 30, 10], first) == first  # order of node ids does not matter
    after = assign_nodes(5, [10, 30], first)  # node 20 left: its shards move, others stay
    assert {s: after[s] for s in (0, 2, 3)} == {0: 10, 2: 30, 3: 10} and {after[1], after[4]} <= {10, 30}
    assert sorted(list(after.values()).count(n) for n in (10, 30)) == [2, 3]


def test_waves_hold_one_message_per_node():
    s = _strategy([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], 10)
    msgs = s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([7, 9]))
    waves = in_waves(list(msgs))
    assert [len(w) for w in waves] == [2, 2, 1]
    for wave in waves:
        nodes = [m.metadata.dst_node_id for m in wave]
        assert len(nodes) == len(set(nodes))
    assert [m.content["config"]["ids"] for m in msgs] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert all(m.content["config"]["lr"] == 0.1 and m.content["config"]["server-round"] == 1 for m in msgs)


def test_weighted_average_equals_hand_computation_and_msr_applies():
    s = _strategy([[0, 1, 2, 3], [4, 5]], 6)
    msgs = list(s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1])))
    replies = [_reply(msgs[0], 1.0, [0, 7, 0, 9]), _reply(msgs[1], 4.0, [2, 0])]
    arrays, metrics = s.aggregate_train(1, list(reversed(replies)))
    expect = (4 * 1.0 + 2 * 4.0) / 6
    assert np.allclose(arrays["w"].numpy(), expect)
    assert metrics["train-loss"] == pytest.approx(expect)
    # P = 0.5: shard 0 sends ids 1 and 3 (counts 7, 9), shard 1 sends id 4 (count 2)
    assert [x.tolist() for x in s.shards] == [[0, 2, 4], [1, 3, 5]]
    assert s.log[1].metrics["moved"] == 3


@pytest.mark.parametrize(
    ("counts", "extra", "reason"),
    [
        ([1, 2, 3], {}, "3 skip counts for 4 ids"),
        ([1, -2, 3, 0], {}, "non-negative"),
        (np.array([1.0, np.nan, 0.0, 0.0]), {}, "finite integers"),
        (np.array([1.5, 0.0, 0.0, 0.0]), {}, "finite integers"),
        ([0, 0, 0, 0], {"info": ConfigRecord({"shard": 7})}, "unknown shard"),
        (
            [0, 0, 0, 0],
            {"skips": ArrayRecord({"ids": torch.tensor([9, 8, 7, 6]), "counts": torch.zeros(4)})},
            "other ids",
        ),
        ([0, 0, 0, 0], {"metrics": MetricRecord({"num-examples": 4})}, "metrics must hold"),
        ([0, 0, 0, 0], {"arrays": ArrayRecord({"w": torch.zeros(3)})}, "keys and shapes"),
        ([0, 0, 0, 0], {"arrays": ArrayRecord({"w": torch.full((2, 2), float("nan"))})}, "NaN"),
    ],
)
def test_bad_reply_is_dropped_with_reason_and_its_shard_keeps_samples(counts, extra, reason, caplog):
    s = _strategy([[0, 1, 2, 3], [4, 5, 6, 7]], 8)
    msgs = list(s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1, 2])))
    good = _reply(msgs[1], 2.0, [5, 4, 0, 0])
    bad = _reply(msgs[0], 100.0, counts, **extra)
    with caplog.at_level(logging.WARNING, logger="iet_agc.strategy"):
        arrays, _ = s.aggregate_train(1, [bad, good])
    assert reason in caplog.text
    assert np.allclose(arrays["w"].numpy(), 2.0)  # only the good reply is averaged
    assert [x.tolist() for x in s.shards] == [[0, 1, 2, 3, 4, 5], [6, 7]]  # shard 0 kept all, got id 4


def test_error_and_missing_replies_keep_shards_and_all_failed_stops():
    s = _strategy([[0, 1], [2, 3], [4, 5]], 6)
    msgs = list(s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1])))
    err = Message(Error(code=1, reason="data set mismatch on node 1"), reply_to=msgs[0])
    s.aggregate_train(1, [err, _reply(msgs[2], 1.0, [0, 3])])
    assert [x.tolist() for x in s.shards] == [[0, 1, 5], [2, 3], [4]]
    msgs = list(s.configure_train(2, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([1])))
    with pytest.raises(RuntimeError, match="data set mismatch"):
        s.aggregate_train(2, [Message(Error(code=1, reason="data set mismatch"), reply_to=m) for m in msgs])


def test_cumulative_counts_keep_history():
    s = IETStrategy(
        [np.array([0, 1]), np.array([2, 3])],
        num_samples=4,
        train_config={},
        redistribution=MemoryRedistribution(0.5),
        cumulative_counts=True,
    )
    s.redistribute([np.array([5, 0]), np.array([0, 3])])  # id 0 -> shard 1, id 3 -> shard 0
    assert s.total_counts.tolist() == [5, 0, 0, 3]
    assert [x.tolist() for x in s.shards] == [[1, 3], [0, 2]]
    # this round nothing is skipped: cumulative counts still move id 3 and id 0 back
    s.redistribute([np.array([0, 0]), np.array([0, 0])])
    assert [x.tolist() for x in s.shards] == [[0, 1], [2, 3]]
