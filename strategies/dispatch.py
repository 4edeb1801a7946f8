"""Sending a round's messages node by node under one deadline.

Each node has a queue of its shards' messages and at most ``per_node`` of them unanswered at a
time; a node's next message goes out as soon as it has room, never waiting for other nodes. A
message that cannot be pushed before the round's deadline is not sent. A message still
unanswered at the deadline keeps its node busy: the node gets nothing new until that late reply
arrives, and the late reply is discarded, never merged into a later round.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

DEADLINE = "the round's deadline passed before it could be sent"
BUSY = "its node is still busy with a late message"
LATE = "no reply before the round's deadline"


@dataclass
class Dispatch:
    """What became of one round's messages."""

    replies: list[Message] = field(default_factory=list)
    unsent: list[tuple[Message, str]] = field(default_factory=list)  # never pushed, and why
    late: list[Message] = field(default_factory=list)  # pushed, unanswered at the deadline
    discarded: list[Message] = field(default_factory=list)  # late replies to earlier rounds


class NodeQueues:
    """Pushes each node's messages in order, at most ``per_node`` unanswered at a time, and pulls
    their replies until the deadline.

    ``per_node = 1``: a node gets its next message once it has answered the previous one.
    ``per_node = 2`` (the default): the next one waits at the SuperLink while the node trains, so a
    SuperNode picks it up as soon as it has pushed its reply; without it the SuperNode, finding
    nothing, sleeps 3 s (Flower 1.41's idle poll) before asking again. A SuperNode runs one
    message at a time; in simulation two messages of one node may run at once, which is safe
    because a shard's state lives in its own file (``clients.state``) and each shard is in at
    most one message. ``outstanding`` (message id -> node) holds messages that missed an
    earlier deadline: their node gets nothing new until they are answered.
    """

    def __init__(self, per_node: int = 2, poll_interval: float = 0.2) -> None:
        if per_node < 1:
            raise ValueError(f"messages-per-node: must be an integer >= 1, got {per_node}")
        self.per_node = per_node
        self.poll_interval = poll_interval
        self.outstanding: dict[str, int] = {}

    def busy_nodes(self) -> set[int]:
        return set(self.outstanding.values())

    def collect_late(self, grid: Grid) -> list[Message]:
        """Pull replies to messages that missed their deadline; they free their node, nothing more."""
        if not self.outstanding:
            return []
        replies = list(grid.pull_messages(list(self.outstanding)))
        for reply in replies:
            self.outstanding.pop(reply.metadata.reply_to_message_id, None)
        return replies

    def send(self, grid: Grid, messages: Iterable[Message], timeout: float | None) -> Dispatch:
        """Send ``messages`` within ``timeout`` seconds (None: wait for every reply)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = Dispatch(discarded=self.collect_late(grid))
        busy = self.busy_nodes()
        queues: dict[int, deque[Message]] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in busy:
                out.unsent.append((msg, BUSY))
            else:
                queues.setdefault(node, deque()).append(msg)
        in_flight: dict[str, Message] = {}
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                for queue in queues.values():
                    out.unsent.extend((msg, DEADLINE) for msg in queue)
                break
            batch = []
            for node, queue in queues.items():
                room = self.per_node - sum(m.metadata.dst_node_id == node for m in in_flight.values())
                batch.extend(queue.popleft() for _ in range(min(room, len(queue))))
            if batch:
                pushed = set(grid.push_messages(batch))
                for msg in batch:
                    if msg.metadata.message_id and msg.metadata.message_id in pushed:
                        in_flight[msg.metadata.message_id] = msg
                    else:
                        out.unsent.append((msg, "the SuperLink refused the message"))
            answered = 0
            if in_flight:
                for reply in grid.pull_messages(list(in_flight)):
                    if in_flight.pop(reply.metadata.reply_to_message_id, None) is not None:
                        out.replies.append(reply)
                        answered += 1
            if not in_flight and not any(queues.values()):
                break
            if not answered:  # a reply frees room for the node's next message: push it at once
                time.sleep(self.poll_interval)
        for mid, msg in in_flight.items():
            out.late.append(msg)
            self.outstanding[mid] = msg.metadata.dst_node_id
        return out
