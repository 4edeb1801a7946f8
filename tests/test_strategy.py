"""The IET strategy on a scripted grid: placement, waves, averaging, MSR, failed rounds and nodes."""

import logging
import uuid

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message

from strategies import protocol
from strategies.iet import IETStrategy, RunStopped
from strategies.ledger import ShardLedger, assign_nodes
from strategies.msr import MemoryRedistribution, check_partition

pytestmark = pytest.mark.usefixtures("flower_task")


def push(messages):
    """What a Grid does on push: give each message its id (replies can then refer to it)."""
    for m in messages:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return [m.metadata.message_id for m in messages]


class FakeGrid:
    """A Grid whose nodes answer with ``answer(msg)`` (a reply, or None for no reply)."""

    def __init__(self, nodes, answer=None):
        self.nodes, self.answer = list(nodes), answer
        self.pushed: list[Message] = []
        self.waiting: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed += messages
        ids = push(messages)
        for m in messages:
            reply = self.answer(m)
            if reply is not None:
                self.waiting[m.metadata.message_id] = reply
        return ids

    def pull_messages(self, ids):
        return [self.waiting.pop(i) for i in list(ids) if i in self.waiting]


FP = "8-0123abcd"  # the data set fingerprint the test strategy sends


def _strategy(shards, n, proportion=0.5, **kwargs):
    return IETStrategy(
        [np.asarray(s) for s in shards],
        num_samples=n,
        train_config={"lr": 0.1, "local-epochs": 10, "fingerprint": FP},
        redistribution=MemoryRedistribution(proportion),
        seed=0,
        **kwargs,
    )


def reply(msg, weight=1.0, counts=None, **overrides):
    """A well-formed reply to ``msg``, packed as the ClientApp packs it (``strategies.protocol``);
    ``overrides`` replace whole records. Metrics the test does not set get their lowest valid value."""
    cfg = msg.content[protocol.CONFIG]
    ids = np.asarray(cfg[protocol.IDS])
    counts = np.zeros(len(ids), dtype=np.int64) if counts is None else counts
    given = {protocol.NUM_EXAMPLES: len(ids), "train-loss": weight, "skip-rate": 0.1, "aug-rate": 0.2, "steps": 3}
    given[protocol.TRAIN_SECONDS] = 0.5
    metrics = {m.key: given.get(m.key, int(m.low) if m.integer else m.low) for m in protocol.reply_metrics()}
    out = protocol.pack_reply(
        msg,
        {"w": torch.full((2, 2), float(weight))},
        metrics,
        torch.as_tensor(np.asarray(counts)),
        local_step=3,
        fingerprint=str(cfg.get(protocol.FINGERPRINT, "")),
    )
    for key, record in overrides.items():
        out.content[key] = record
    return out


def _round(s, server_round, nodes):
    msgs = list(s.configure_train(server_round, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid(nodes)))
    push(msgs)
    return msgs


def test_assign_nodes_is_stable_and_balanced():
    first = assign_nodes(5, [30, 10, 20], {})
    assert first == {0: 10, 1: 20, 2: 30, 3: 10, 4: 20}
    assert assign_nodes(5, [20, 30, 10], first) == first  # order of node ids does not matter
    after = assign_nodes(5, [10, 30], first)  # node 20 left: its shards move, others stay
    assert {s: after[s] for s in (0, 2, 3)} == {0: 10, 2: 30, 3: 10} and {after[1], after[4]} <= {10, 30}
    assert sorted(list(after.values()).count(n) for n in (10, 30)) == [2, 3]


def test_messages_follow_the_shards_and_their_nodes():
    s = _strategy([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], 10)
    msgs = s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([7, 9]))
    assert [m.metadata.dst_node_id for m in msgs] == [7, 9, 7, 9, 7]
    assert [m.content["config"]["ids"] for m in msgs] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert all(m.content["config"]["lr"] == 0.1 and m.content["config"]["server-round"] == 1 for m in msgs)


def test_weighted_average_equals_hand_computation_and_msr_applies():
    s = _strategy([[0, 1, 2, 3], [4, 5]], 6)
    msgs = _round(s, 1, [1])
    replies = [reply(msgs[0], 1.0, [0, 7, 0, 9]), reply(msgs[1], 4.0, [2, 0])]
    arrays, metrics = s.aggregate_train(1, list(reversed(replies)))
    expect = (4 * 1.0 + 2 * 4.0) / 6
    assert np.allclose(arrays["w"].numpy(), expect)
    assert metrics["train-loss"] == pytest.approx(expect)
    # P = 0.5: shard 0 sends ids 1 and 3 (counts 7, 9), shard 1 sends id 4 (count 2)
    assert [x.tolist() for x in s.shards] == [[0, 2, 4], [1, 3, 5]]
    assert s.log[1].metrics["moved"] == 3 and s.log[1].metrics["replies"] == 2


def test_error_and_missing_replies_keep_shards_and_nothing_moves_into_them():
    s = _strategy([[0, 1], [2, 3], [4, 5]], 6)
    msgs = _round(s, 1, [1])
    err = Message(Error(code=1, reason="data set mismatch on node 1"), reply_to=msgs[0])
    s.aggregate_train(1, [err, reply(msgs[2], 1.0, [0, 3])])
    # shard 0 failed: shard 2's move into it is held back; shard 1 had no reply: nothing moves
    assert [x.tolist() for x in s.shards] == [[0, 1], [2, 3], [4, 5]]
    assert s.log[1].dropped == [(0, 1, "error reply: data set mismatch on node 1")]


def test_a_round_without_valid_replies_keeps_the_model_and_the_run_stops_after_the_limit():
    bad = lambda m: Message(Error(code=1, reason="disk full"), reply_to=m)  # noqa: E731
    s = _strategy([[0, 1], [2, 3]], 4, max_failed_rounds=3)
    start = ArrayRecord({"w": torch.full((2, 2), 5.0)})
    with pytest.raises(RunStopped, match="3 rounds in a row.*disk full"):
        s.start(FakeGrid([1, 2], bad), start, num_rounds=10, timeout=5)
    assert s.ledger.last_round == 3 and s.ledger.failed_rounds == 3
    assert [x.tolist() for x in s.shards] == [[0, 1], [2, 3]]


def test_failed_rounds_do_not_stop_a_run_that_recovers():
    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        return Message(Error(code=1, reason="oops"), reply_to=m) if calls["n"] <= 4 else reply(m, 2.0)

    s = _strategy([[0, 1], [2, 3]], 4, max_failed_rounds=3)
    result = s.start(FakeGrid([1, 2], flaky), ArrayRecord({"w": torch.zeros(2, 2)}), num_rounds=4, timeout=5)
    assert [s.log[r].failed for r in (1, 2, 3, 4)] == [True, True, False, False]
    assert np.allclose(result.arrays["w"].numpy(), 2.0)


def test_a_failing_node_is_set_aside_and_its_shards_train_elsewhere():
    """Node 3 fails every round: after node-max-failures its shards move, and every sample trains."""

    def answer(m):
        if m.metadata.dst_node_id == 3:
            return Message(Error(code=1, reason="data set mismatch"), reply_to=m)
        return reply(m, 1.0, np.arange(len(m.content["config"]["ids"])) % 3)

    s = _strategy([range(0, 10), range(10, 20), range(20, 30)], 30, proportion=0.3, node_max_failures=2)
    grid = FakeGrid([1, 2, 3], answer)
    s.start(grid, ArrayRecord({"w": torch.zeros(2, 2)}), num_rounds=5, timeout=5)
    assert s.log[2].set_aside == {3: "2 failed rounds in a row, the last: error reply: data set mismatch"}
    assert 3 in s.ledger.set_aside and 3 not in s.ledger.node_of_shard.values()
    trained = {r: sorted(s.log[r].shard_metrics) for r in s.log}
    assert trained[1] == trained[2] == [0, 1] and trained[3] == trained[4] == trained[5] == [0, 1, 2]
    for r in (3, 4, 5):  # every sample trains again
        assert sorted(np.concatenate([s.log[r].assignment[i] for i in trained[r]]).tolist()) == list(range(30))
    check_partition(s.shards, 30)


def test_all_nodes_set_aside_are_reinstated():
    ledger = ShardLedger([np.array([0]), np.array([1])], 2)
    ledger.place([1, 2])
    ledger.record_health({1: "x", 2: "y"}, limit=1)
    assert set(ledger.set_aside) == {1, 2}
    placement = ledger.place([1, 2])
    assert placement.reinstated == [1, 2] and not ledger.set_aside


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


def test_ledger_state_round_trips_including_the_msr_rng():
    s = _strategy([[0, 1, 2, 3], [4, 5, 6, 7]], 8)
    msgs = _round(s, 1, [1, 2])
    s.aggregate_train(1, [reply(msgs[0], 1.0, [1, 1, 0, 0]), reply(msgs[1], 1.0, [0, 0, 2, 2])])
    meta, arrays = s.ledger.state_dict()
    copy = ShardLedger.from_state_dict(meta, arrays)
    assert [a.tolist() for a in copy.shards] == [a.tolist() for a in s.shards]
    assert copy.total_counts.tolist() == s.total_counts.tolist() and copy.node_of_shard == s.ledger.node_of_shard
    assert copy.rng.integers(1 << 30) == s.ledger.rng.integers(1 << 30)


def test_dropped_replies_are_logged_through_flower(caplog):
    s = _strategy([[0, 1], [2, 3]], 4)
    msgs = _round(s, 1, [1, 2])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        s.aggregate_train(1, [reply(msgs[0], 1.0, [1, 2, 3]), reply(msgs[1])])
    assert "dropped a reply from node 1 (shard 0)" in caplog.text


def test_a_node_that_dies_never_stalls_the_run_and_no_nodes_is_a_failed_round():
    """min-nodes is awaited before the first round only; with every node gone a round fails."""
    grid = FakeGrid([1, 2], lambda m: reply(m, 1.0))
    s = _strategy([[0, 1], [2, 3]], 4, min_nodes=2, max_failed_rounds=2)

    def evaluate(server_round, arrays):
        if server_round == 1:
            grid.nodes = [1]  # node 2 dies
        if server_round == 2:
            grid.nodes = []  # and then node 1
        return None

    with pytest.raises(RunStopped, match="no node connected"):
        s.start(grid, ArrayRecord({"w": torch.zeros(2, 2)}), num_rounds=6, timeout=0.5, evaluate_fn=evaluate)
    assert sorted(s.log[2].shard_metrics) == [0, 1]  # both shards trained on node 1
    assert {m["node"] for m in s.log[2].shard_metrics.values()} == {1}
    assert s.log[3].failed and s.log[4].failed and s.ledger.last_round == 4
    check_partition(s.shards, 4)


def test_update_norms_and_outliers_are_exact_on_tiny_arrays():
    from strategies.replies import outlier_updates, update_norms

    sent = {"a": np.zeros((2,), np.float32), "b": np.ones((1,), np.float32)}
    replies = [ArrayRecord({"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])})]
    replies.append(ArrayRecord({"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([3.0e30])}))  # finite, enormous
    norms = update_norms(sent, replies)
    assert norms[0] == 5.0 and norms[1] == pytest.approx(3.0e30) and np.isfinite(norms).all()
    assert outlier_updates(np.array([1.0, 1.2, 0.9, 50.0]), 10.0).keys() == {3}
    assert "50 is 50x the median of the other replies' (1)" in outlier_updates(np.array([1.0, 1.2, 0.9, 50.0]), 10.0)[3]
    assert outlier_updates(np.array([1.0, 1.2, 0.9, 50.0]), float("inf")) == {}  # off
    assert outlier_updates(np.array([50.0]), 10.0) == {}  # nothing to compare with
    assert outlier_updates(np.array([0.0, 0.0, 3.0]), 10.0) == {}  # the others did not move: no scale
    assert outlier_updates(np.array([1.0, 11.0]), 10.0).keys() == {1}  # two replies: each against the other


def test_a_reply_with_an_absurdly_large_update_is_dropped_and_its_shard_keeps_its_samples():
    s = _strategy([[0, 1], [2, 3], [4, 5]], 6, max_update_ratio=10.0)
    msgs = _round(s, 1, [1])
    replies = [reply(msgs[0], 1.0, [0, 5]), reply(msgs[1], 1.2, [5, 0]), reply(msgs[2], 1e30, [5, 0])]
    arrays, _ = s.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), (1.0 + 1.2) / 2)  # the huge one is not averaged in
    assert [(shard, node) for shard, node, _ in s.log[1].dropped] == [(2, 1)]
    assert "above max-update-ratio 10" in s.log[1].dropped[0][2]
    assert s.shards[2].tolist() == [4, 5]  # failed shard: nothing moved out of or into it
    off = _strategy([[0, 1], [2, 3], [4, 5]], 6)  # the strategy's own default checks nothing
    msgs = _round(off, 1, [1])
    arrays, _ = off.aggregate_train(1, [reply(msgs[0], 1.0), reply(msgs[1], 1.2), reply(msgs[2], 1e30)])
    assert arrays["w"].numpy().max() > 1e29 and off.log[1].dropped == []
