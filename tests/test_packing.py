"""Several shards of a node in one message (``shards-per-message``): packing and unpacking, and the
strategy's checks per shard (a bad shard result drops that shard only), on scripted grids."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from test_dispatch import TimedGrid
from test_strategy import FakeGrid, _strategy, reply

from strategies import protocol
from strategies.dispatch import LATE, NodeQueues
from strategies.iet import group_shards
from strategies.msr import check_partition
from strategies.replies import BadReply, Sent, ShardReply, check_packed_reply

pytestmark = pytest.mark.usefixtures("flower_task")

SHARDS = [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]


def packed_reply(msg, weight=lambda shard: 1.0 + shard, bad=None):
    """The reply a node makes to ``msg`` (packed or not): each shard answered as ``reply`` answers
    it alone; ``bad`` maps a shard to a function that spoils its records (or to a reason string)."""
    if not protocol.is_packed(msg.content):
        return reply(msg, weight(protocol.instruction_shard(msg)))
    results = []
    for part in protocol.split_instruction(msg.content):
        alone = Message(part, dst_node_id=msg.metadata.dst_node_id, message_type=MessageType.TRAIN)
        shard = int(part[protocol.CONFIG][protocol.SHARD])
        content = reply(alone, weight(shard)).content
        spoil = (bad or {}).get(shard)
        results.append((shard, spoil if isinstance(spoil, str) else content))
        if callable(spoil):
            spoil(content)
    return protocol.pack_replies(msg, results)


def test_group_shards_packs_each_nodes_shards_in_order():
    placed = {0: 7, 1: 9, 2: 7, 3: 7, 4: 9}
    assert group_shards(placed, 0) == [(7, [0, 2, 3]), (9, [1, 4])]
    assert group_shards(placed, 2) == [(7, [0, 2]), (9, [1, 4]), (7, [3])]
    assert group_shards(placed, 1) == [(7, [0]), (9, [1]), (7, [2]), (7, [3]), (9, [4])]  # as before: shard order


def test_a_packed_instruction_splits_into_the_single_shard_instructions():
    arrays = ArrayRecord({"w": torch.arange(4.0)})
    common = {"lr": 0.1, "fingerprint": "fp"}
    packed = protocol.packed_train_message(arrays, common, [(2, [5, 1]), (0, [3])], 4, node=7)
    assert protocol.instruction_shards(packed) == [2, 0]
    parts = protocol.split_instruction(packed.content)
    for part, (shard, ids) in zip(parts, [(2, [5, 1]), (0, [3])], strict=True):
        alone = protocol.train_message(arrays, common, shard, 4, ids, node=7).content
        assert dict(part[protocol.CONFIG]) == dict(alone[protocol.CONFIG])
        assert part[protocol.ARRAYS] is arrays
    single = protocol.train_message(arrays, common, 1, 4, [2], node=7)
    assert protocol.split_instruction(single.content) == [single.content]
    assert protocol.instruction_shards(single) == [1]


def test_split_reply_names_what_is_missing_failed_or_foreign():
    s = _strategy(SHARDS, 16, shards_per_message=0)
    (msg,) = s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([7]))
    content = packed_reply(msg, bad={1: "ValueError: shard 1: ids outside 0..9"}).content
    del content[protocol.shard_key(3, protocol.METRICS)]
    for key in protocol.REPLY_RECORDS:
        del content[protocol.shard_key(2, key)]
    parts = protocol.split_reply(content, [0, 1, 2, 3])
    assert isinstance(parts[0], RecordDict) and sorted(parts[0]) == sorted(protocol.REPLY_RECORDS)
    assert parts[1] == "error reply: ValueError: shard 1: ids outside 0..9"
    assert parts[2] == "no result for it in the node's reply"
    assert sorted(parts[3]) == sorted(set(protocol.REPLY_RECORDS) - {protocol.METRICS})  # the check refuses it
    content[protocol.shard_key(9, protocol.ARRAYS)] = ArrayRecord()
    with pytest.raises(ValueError, match="records for no shard of the message: shard-9.arrays"):
        protocol.split_reply(content, [0, 1, 2, 3])


def _sent(msg, s):
    return [Sent(k, msg.metadata.dst_node_id, np.asarray(s.shards[k]), 10, "8-0123abcd") for k in (0, 1, 2, 3)]


def test_check_packed_reply_drops_a_bad_shard_only_and_a_bad_envelope_whole():
    s = _strategy(SHARDS, 16, shards_per_message=0)
    (msg,) = s.configure_train(1, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord(), FakeGrid([7]))
    msg.metadata.__dict__["_message_id"] = "m1"
    expected = {"w": ("float32", (2, 2))}

    def nan_weights(content):
        content[protocol.ARRAYS] = ArrayRecord({"w": torch.full((2, 2), float("nan"))})

    def wrong_counts(content):
        content[protocol.SKIPS] = ArrayRecord({"ids": torch.arange(12, 16), "counts": torch.full((4,), 99)})

    results = check_packed_reply(packed_reply(msg, bad={1: nan_weights, 3: wrong_counts}), _sent(msg, s), expected)
    assert isinstance(results[0], ShardReply) and isinstance(results[2], ShardReply)
    assert results[0].counts.tolist() == [0, 0, 0, 0] and results[2].arrays["w"].numpy()[0, 0] == 3.0
    assert isinstance(results[1], BadReply) and "NaN" in str(results[1])
    assert isinstance(results[3], BadReply) and "skip counts must be in [0, 10]" in str(results[3])
    error = Message(Error(code=0, reason="Traceback ...\nValueError: data set mismatch"), reply_to=msg)
    assert {str(r) for r in check_packed_reply(error, _sent(msg, s), expected).values()} == {
        "error reply: ValueError: data set mismatch"
    }
    foreign = packed_reply(msg)
    foreign.content[protocol.shard_key(5, protocol.METRICS)] = MetricRecord()
    assert all(isinstance(r, BadReply) for r in check_packed_reply(foreign, _sent(msg, s), expected).values())


def _run(per_message, rounds=2, bad=None):
    s = _strategy(SHARDS, 16, node_max_failures=1, shards_per_message=per_message)
    grid = FakeGrid([7, 9], answer=lambda m: packed_reply(m, bad=bad))
    arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    s.start(grid, arrays, num_rounds=rounds, timeout=None)
    return s, grid


def test_packed_and_per_shard_messages_give_the_same_rounds():
    a, grid_a = _run(1)
    b, grid_b = _run(0)
    assert len(grid_a.pushed) == 2 * 4 and len(grid_b.pushed) == 2 * 2  # one message per node and round
    for r in (1, 2):
        la, lb = a.log[r], b.log[r]
        assert la.shard_metrics == lb.shard_metrics and la.metrics == lb.metrics and la.placed == lb.placed
        assert all(np.array_equal(x, y) for x, y in zip(la.moved, lb.moved, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.shards, b.shards, strict=True))


def test_a_bad_shard_in_a_packed_reply_drops_that_shard_only_and_sets_its_node_aside():
    def short_skips(content):
        content[protocol.SKIPS] = ArrayRecord({"ids": torch.arange(2), "counts": torch.zeros(2, dtype=torch.int64)})

    s, _ = _run(0, rounds=1, bad={2: short_skips})
    rlog = s.log[1]
    assert sorted(rlog.shard_metrics) == [0, 1, 3]
    ((shard, node, why),) = rlog.dropped
    assert shard == 2 and node == rlog.placed[2] and "skips ids has shape (2,)" in why
    assert sorted(s.shards[2]) == sorted(rlog.assignment[2])  # it keeps its samples, nothing moves in
    assert set(rlog.set_aside) == {rlog.placed[2]}  # node-max-failures 1: its node's round failed
    check_partition(s.shards, 16)


def test_a_packed_message_that_misses_the_deadline_times_out_all_its_shards(clock):
    s = _strategy(SHARDS, 16, shards_per_message=0, dispatcher=NodeQueues(2, poll_interval=1.0))
    node_of = {}

    def delay(m):
        node_of[m.metadata.message_id] = m.metadata.dst_node_id
        return 100.0 if m.metadata.dst_node_id == 9 else 5.0

    grid = TimedGrid(clock, [7, 9], delay, answer=packed_reply)
    s.start(grid, ArrayRecord({"w": torch.zeros(2, 2)}), num_rounds=1, timeout=30.0)
    rlog = s.log[1]
    late = sorted(k for k, n in rlog.placed.items() if n == 9)
    assert len(late) == 2 and rlog.timed_out == dict.fromkeys(late, LATE)
    assert sorted(rlog.shard_metrics) == sorted(set(range(4)) - set(late))
    check_partition(s.shards, 16)


def test_shards_per_message_below_zero_is_refused():
    with pytest.raises(ValueError, match="^shards-per-message"):
        _strategy(SHARDS, 16, shards_per_message=-1)
