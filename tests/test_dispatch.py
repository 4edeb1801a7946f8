"""The round deadline on a virtual clock: messages that cannot be sent in time are not sent, late
replies free their node but are never merged, a node never holds more than ``per_node``
unanswered messages, and no node waits for another."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from test_strategy import _strategy, push, reply

from strategies.dispatch import BUSY, DEADLINE, LATE, NodeQueues
from strategies.msr import check_partition

pytestmark = pytest.mark.usefixtures("flower_task")


class TimedGrid:
    """Replies become available ``delay(msg)`` seconds after the push; records races per node."""

    def __init__(self, clock, nodes, delay, answer=reply):
        self.clock, self.nodes, self.delay, self.answer = clock, nodes, delay, answer
        self.ready: dict[str, tuple[float, Message]] = {}
        self.unanswered: dict[str, int] = {}  # message id -> node, until its reply is ready
        self.most = 0  # the most unanswered messages one node held at once

    def get_node_ids(self):
        return list(self.nodes)

    def _settle(self):
        for mid, (when, _) in self.ready.items():
            if when <= self.clock.t:
                self.unanswered.pop(mid, None)

    def push_messages(self, messages):
        self._settle()
        messages = list(messages)
        ids = push(messages)
        for m in messages:
            self.unanswered[m.metadata.message_id] = m.metadata.dst_node_id
            self.most = max(self.most, list(self.unanswered.values()).count(m.metadata.dst_node_id))
            self.ready[m.metadata.message_id] = (self.clock.t + self.delay(m), self.answer(m))
        return ids

    def pull_messages(self, ids):
        self._settle()
        out = [self.ready.pop(i)[1] for i in list(ids) if i in self.ready and self.ready[i][0] <= self.clock.t]
        return out


def _msgs(nodes):
    return [
        Message(
            RecordDict({"config": ConfigRecord({"shard": i, "ids": [i]})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for i, n in enumerate(nodes)
    ]


def test_one_per_node_late_replies_are_discarded_and_no_node_waits_for_another(clock):
    slow = {"on": True}
    delay = lambda m: 25.0 if (m.metadata.dst_node_id == 2 and slow["on"]) else 0.0  # noqa: E731
    grid = TimedGrid(clock, [1, 2], delay)
    d = NodeQueues(per_node=1, poll_interval=1.0)

    first = _msgs([1, 2, 1, 2])
    out = d.send(grid, first, timeout=10)
    # node 1 trains both of its shards while node 2 is still on its first one
    assert [r.metadata.reply_to_message_id for r in out.replies] == [
        first[0].metadata.message_id,
        first[2].metadata.message_id,
    ]
    assert out.late == [first[1]]
    assert [(m, why) for m, why in out.unsent] == [(first[3], DEADLINE)]
    assert d.busy_nodes() == {2}

    slow["on"] = False
    clock.t = 15.0  # node 2 is still working on its late message
    second = _msgs([1, 2, 1, 2])
    out = d.send(grid, second, timeout=10)
    assert [(m, why) for m, why in out.unsent] == [(second[1], BUSY), (second[3], BUSY)]
    assert len(out.replies) == 2 and out.discarded == []

    clock.t = 30.0  # the late reply is there now: it frees node 2 and goes nowhere else
    third = _msgs([1, 2, 1, 2])
    out = d.send(grid, third, timeout=10)
    assert [r.metadata.reply_to_message_id for r in out.discarded] == [first[1].metadata.message_id]
    sent_ids = {m.metadata.message_id for m in third}
    assert len(out.replies) == 4 and all(r.metadata.reply_to_message_id in sent_ids for r in out.replies)
    assert out.unsent == [] and d.busy_nodes() == set()
    assert grid.most == 1


def test_two_per_node_queue_the_next_message_while_one_trains(clock):
    grid = TimedGrid(clock, [1, 2], lambda m: 4.0)
    d = NodeQueues(per_node=2, poll_interval=1.0)
    msgs = _msgs([1, 1, 1, 2, 1])
    out = d.send(grid, msgs, timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in out.replies) == sorted(m.metadata.message_id for m in msgs)
    assert grid.most == 2 and out.unsent == [] and out.late == []
    assert clock.t == 8.0  # node 1: two at once, then the other two; node 2 alongside

    slow = _msgs([2, 2, 2])
    grid.delay = lambda m: 25.0
    out = d.send(grid, slow, timeout=10)
    assert out.late == slow[:2] and [(m, why) for m, why in out.unsent] == [(slow[2], DEADLINE)]
    assert d.busy_nodes() == {2}
    with pytest.raises(ValueError, match="messages-per-node"):
        NodeQueues(per_node=0)


def test_no_late_reply_is_merged_into_a_later_round(clock):
    """Node 2's round-1 reply (weights 99) arrives during round 2: it must not reach any average."""
    s = _strategy(
        [range(0, 4), range(4, 8), range(8, 12), range(12, 16)], 16, node_max_failures=5, dispatcher=NodeQueues(1)
    )

    def answer(m):
        late = m.metadata.dst_node_id == 2 and m.content["config"]["server-round"] == 1
        return reply(m, 99.0 if late else float(m.content["config"]["server-round"]))

    def delay(m):
        r = m.content["config"]["server-round"]
        return 25.0 if (m.metadata.dst_node_id == 2 and r == 1) else 3.0

    grid = TimedGrid(clock, [1, 2], delay, answer)
    s.dispatcher.poll_interval = 1.0
    seen = []
    result = s.start(
        grid,
        ArrayRecord({"w": torch.zeros(2, 2)}),
        num_rounds=5,
        timeout=10,
        evaluate_fn=lambda r, a: seen.append(float(a["w"].numpy().max())),
    )
    assert 99.0 not in seen and np.allclose(result.arrays["w"].numpy(), 5.0)
    log = s.log
    assert log[1].timed_out == {1: LATE, 3: DEADLINE} and sorted(log[1].shard_metrics) == [0, 2]
    assert {s: log[1].placed[s] for s in log[1].timed_out} == {1: 2, 3: 2}  # the round log names their node
    for r in (2, 3, 4):  # node 2 is still on its late message (ready at t = 25)
        assert set(log[r].timed_out.values()) == {BUSY} and sorted(log[r].shard_metrics) == [0, 2]
    assert sorted(log[5].shard_metrics) == [0, 1, 2, 3]  # everything trains again once it is back
    for r in log:
        check_partition(log[r].assignment, 16)
    assert grid.most == 1
