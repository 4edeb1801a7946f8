"""Sending a round's messages in per-node waves under one deadline, without racing a node's state.

Two messages for one node can run at once in Flower's simulation (each on its own copy of the
node's Context), so a wave holds at most one message per node. A wave that cannot start before
the round's deadline is not sent. A message still unanswered at the deadline keeps its node busy:
the node gets nothing new until that late reply arrives, and the late reply is discarded, never
merged into a later round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

DEADLINE = "the round's deadline passed before its wave could start"
BUSY = "its node is still busy with a late message"
LATE = "no reply before the round's deadline"


def in_waves(messages: Sequence[Message]) -> list[list[Message]]:
    """Split messages so that each wave holds at most one message per destination node."""
    waves: list[list[Message]] = []
    seen: dict[int, int] = {}
    for msg in messages:
        w = seen.get(msg.metadata.dst_node_id, 0)
        seen[msg.metadata.dst_node_id] = w + 1
        if w == len(waves):
            waves.append([])
        waves[w].append(msg)
    return waves


@dataclass
class Dispatch:
    """What became of one round's messages."""

    replies: list[Message] = field(default_factory=list)
    unsent: list[tuple[Message, str]] = field(default_factory=list)  # never pushed, and why
    late: list[Message] = field(default_factory=list)  # pushed, unanswered at the deadline
    discarded: list[Message] = field(default_factory=list)  # late replies to earlier rounds


class WaveDispatcher:
    """Pushes messages wave by wave and pulls their replies until the deadline.

    ``outstanding`` (message id -> node) holds messages that missed an earlier deadline.
    """

    def __init__(self, poll_interval: float = 0.2) -> None:
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
        """Send ``messages`` in waves within ``timeout`` seconds (None: wait for every reply)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = Dispatch(discarded=self.collect_late(grid))
        busy = self.busy_nodes()
        ready = []
        for msg in messages:
            if msg.metadata.dst_node_id in busy:
                out.unsent.append((msg, BUSY))
            else:
                ready.append(msg)
        for wave in in_waves(ready):
            if deadline is not None and time.monotonic() >= deadline:
                out.unsent.extend((msg, DEADLINE) for msg in wave)
                continue
            ids = [i for i in grid.push_messages(wave) if i]
            out.unsent.extend(
                (m, "the SuperLink refused the message") for m in wave if m.metadata.message_id not in ids
            )
            waiting = set(ids)
            while waiting:
                for reply in grid.pull_messages(list(waiting)):
                    if reply.metadata.reply_to_message_id in waiting:
                        waiting.discard(reply.metadata.reply_to_message_id)
                        out.replies.append(reply)
                if not waiting or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep(self.poll_interval)
            for msg in wave:
                if msg.metadata.message_id in waiting:
                    out.late.append(msg)
                    self.outstanding[msg.metadata.message_id] = msg.metadata.dst_node_id
        return out
