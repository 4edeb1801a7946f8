"""Sending a round's messages node by node under one deadline, riding out a failing SuperLink.

Each node has a queue of its shards' messages and at most ``per_node`` of them unanswered at a
time; a node's next message goes out as soon as it has room, never waiting for other nodes. A
message that cannot be pushed before the round's deadline is not sent. A message still
unanswered at the deadline keeps its node busy: the node gets nothing new until that late reply
arrives, and the late reply is discarded, never merged into a later round.

Every call to the SuperLink goes through ``NodeQueues.call``: an error that a busy or restarting
SuperLink gives (``transient``: HTTP 5xx and 429, which is how Flower 1.41's SuperLink answers when
its SQLite state says ``database is locked``; transport errors; an object it failed to store) is
retried with exponential backoff and jitter (``Retry``), each retry logged, never past the
round's deadline. The same Message objects are pushed again: Flower 1.41 names a message by the
hash of its content (``HttpGrid.push_messages`` sets ``message_id = object_id``) and a SuperLink
that already holds that id answers with the same id and asks only for the objects it still lacks,
so a push that failed half-way is completed, never duplicated. A Grid method that keeps failing
for ``Retry.give_up_after`` seconds, none of its calls succeeding in between, raises
``SuperLinkFailing``: the strategy stops the run there, its last checkpoint kept.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TypeVar

import httpx
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

T = TypeVar("T")

DEADLINE = "the round's deadline passed before it could be sent"
BUSY = "its node is still busy with a late message"
LATE = "no reply before the round's deadline"
PUSH_FAILED = "the SuperLink kept failing to take it until the round's deadline"
PULL_FAILED = "the SuperLink kept failing to hand over its reply until the round's deadline"
NOT_THE_NODES = frozenset({DEADLINE, PUSH_FAILED, PULL_FAILED})  # reasons that count against no node

# Polling in a deployment: each ``pull_messages`` of Flower 1.41's HttpGrid is two write transactions
# on the SuperLink's SQLite file (the replies' claim and the SuperLink's own instruction claim), so
# while nothing arrives the interval doubles from ``poll_interval`` up to this (Flower's own
# ``send_and_receive`` waits 3 s); a reply brings it back to ``poll_interval``.
DEPLOYMENT_MAX_POLL = 2.0

LOCKED = "database is locked"  # SQLite's busy timeout (5 s in Flower 1.41) ran out
GRPC_TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})


class SuperLinkFailing(RuntimeError):
    """A Grid method kept failing for ``Retry.give_up_after`` seconds: the run stops, its last
    checkpoint kept."""


class PastDeadline(Exception):
    """A call still failed at the round's deadline: the round ends with what it has."""


def transient(err: BaseException) -> bool:
    """Whether ``err``, raised by a Grid call, is worth retrying.

    Transient: ``httpx.HTTPStatusError`` with status 5xx or 429 (Flower 1.41's SuperLink answers
    every unexpected exception, ``sqlite3.OperationalError: database is locked`` included, with a
    generic 500 whose body is "Internal server error."; its own HttpGrid retries only 502, 503, 504
    and transport errors, and forever); any ``httpx.TransportError``; ``ObjectPushError`` (the
    SuperLink's ``store_object`` catches every exception, a locked database too, and answers
    ``stored = False``); a gRPC error coded UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED
    (Flower 1.41's grids speak HTTP, so only a custom Grid raises them); any error whose text says
    "database is locked". Fatal: everything else, ValueError (a malformed message) and other 4xx
    included. Flower's ``RunNotRunningException`` (the run was stopped) is a BaseException and never
    reaches this.
    """
    if isinstance(err, (ValueError, TypeError)):
        return False
    if isinstance(err, httpx.HTTPStatusError):
        code = err.response.status_code
        return code == 429 or code >= 500
    if isinstance(err, (httpx.TransportError, ObjectPushError)):
        return True
    code = getattr(err, "code", None)  # grpc.RpcError, duck-typed: grpc is not installed with Flower 1.41
    if callable(code):
        try:
            if getattr(code(), "name", "") in GRPC_TRANSIENT:
                return True
        except Exception:  # noqa: BLE001 - an unrelated ``code`` attribute
            pass
    return LOCKED in str(err).lower()


def _kind(name: str) -> str:
    """The Grid method a call name names ("pull_messages (late replies)" -> "pull_messages")."""
    return name.split()[0]


def describe(err: BaseException) -> str:
    """One line for the log: the HTTP status, path and body, or the error's type and text."""
    if isinstance(err, httpx.HTTPStatusError):
        body = " ".join(err.response.text.split())[:200] or "(empty body)"
        try:
            where = f" from {err.request.url.path}"
        except RuntimeError:
            where = ""
        return f"HTTP {err.response.status_code}{where}: {body}"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


@dataclass(frozen=True)
class Retry:
    """How a failing SuperLink is ridden out.

    Attempt n of a call that failed waits ``first_delay * 2**(n-1)`` seconds, at most
    ``max_delay``, times a jitter factor drawn in [0.5, 1) from the dispatcher's seeded generator,
    and never past the round's deadline (the last attempt comes at the deadline). A Grid method
    (push_messages, pull_messages, get_node_ids) that keeps failing for ``give_up_after`` seconds,
    none of its calls succeeding in between (across rounds), stops the run (``SuperLinkFailing``).
    """

    first_delay: float = 0.5
    max_delay: float = 30.0
    give_up_after: float = 600.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_delay, self.first_delay * 2.0 ** min(attempt - 1, 60)) * (0.5 + 0.5 * rng.random())


@dataclass
class Dispatch:
    """What became of one round's messages."""

    replies: list[Message] = field(default_factory=list)
    unsent: list[tuple[Message, str]] = field(default_factory=list)  # never pushed, and why
    late: list[Message] = field(default_factory=list)  # pushed, unanswered at the deadline
    discarded: list[Message] = field(default_factory=list)  # late replies to earlier rounds
    failed: list[tuple[Message, str]] = field(default_factory=list)  # the SuperLink kept failing on them


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

    Replies are pulled every ``poll_interval`` seconds; with ``max_poll_interval`` the interval
    doubles while nothing arrives, up to that (``DEPLOYMENT_MAX_POLL`` in deployments). Grid
    calls that fail with a transient error are retried (``retry``; jitter seeded by ``seed``).
    """

    def __init__(
        self,
        per_node: int = 2,
        poll_interval: float = 0.2,
        *,
        max_poll_interval: float | None = None,
        retry: Retry | None = None,
        seed: int = 0,
    ) -> None:
        if per_node < 1:
            raise ValueError(f"messages-per-node: must be an integer >= 1, got {per_node}")
        self.per_node = per_node
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.retry = retry or Retry()
        self.rng = random.Random(seed)
        self.failing_since: dict[str, float] = {}  # call -> when its current run of failures began
        self.outstanding: dict[str, int] = {}

    def busy_nodes(self) -> set[int]:
        return set(self.outstanding.values())

    def call(self, name: str, fn: Callable[[], T], deadline: float | None = None) -> T:
        """``fn()``, one call to the SuperLink, retried while it fails with a transient error:
        ``PastDeadline`` once the round's ``deadline`` (monotonic seconds; None: none) has passed,
        ``SuperLinkFailing`` after ``retry.give_up_after`` seconds of failures; fatal errors at once."""
        attempt = 0
        while True:
            attempt += 1
            try:
                result = fn()
            except Exception as err:
                if not transient(err):
                    raise
                self._failed(name, attempt, err, deadline)
                continue
            if attempt > 1:
                log(INFO, "SuperLink: %s succeeded on attempt %d", name, attempt)
            self.failing_since.pop(_kind(name), None)
            return result

    def _failed(self, name: str, attempt: int, err: Exception, deadline: float | None) -> None:
        """Log a failed attempt and wait before the next, or raise when no next one may come."""
        now = time.monotonic()
        since = self.failing_since.setdefault(_kind(name), now)
        give_up = since + self.retry.give_up_after
        if now >= give_up:
            raise SuperLinkFailing(
                f"the SuperLink kept failing {_kind(name)} for {now - since:.0f} s ({attempt} attempts of "
                f"this call), last: {describe(err)}"
            ) from err
        if deadline is not None and now >= deadline:
            log(WARNING, "SuperLink: %s failed (attempt %d) at the round's deadline: %s", name, attempt, describe(err))
            raise PastDeadline(describe(err)) from err
        wait = min(self.retry.delay(attempt, self.rng), give_up - now, math.inf if deadline is None else deadline - now)
        log(WARNING, "SuperLink: %s failed (attempt %d): %s; retrying in %.2f s", name, attempt, describe(err), wait)
        time.sleep(wait)

    def collect_late(self, grid: Grid, deadline: float | None = None) -> list[Message]:
        """Pull replies to messages that missed their deadline; they free their node, nothing more."""
        if not self.outstanding:
            return []
        ids = list(self.outstanding)
        try:
            replies = self.call("pull_messages (late replies)", lambda: list(grid.pull_messages(ids)), deadline)
        except PastDeadline:
            return []
        for reply in replies:
            self.outstanding.pop(reply.metadata.reply_to_message_id, None)
        return replies

    def send(self, grid: Grid, messages: Iterable[Message], timeout: float | None) -> Dispatch:
        """Send ``messages`` within ``timeout`` seconds (None: wait for every reply)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = Dispatch(discarded=self.collect_late(grid, deadline))
        busy = self.busy_nodes()
        queues: dict[int, deque[Message]] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in busy:
                out.unsent.append((msg, BUSY))
            else:
                queues.setdefault(node, deque()).append(msg)
        in_flight: dict[str, Message] = {}
        pull_failed, wait = False, self.poll_interval
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
                try:
                    pushed = set(self.call("push_messages", lambda b=batch: list(grid.push_messages(b)), deadline))
                except PastDeadline:
                    self._push_failed(batch, out)
                    continue
                for msg in batch:
                    if msg.metadata.message_id and msg.metadata.message_id in pushed:
                        in_flight[msg.metadata.message_id] = msg
                    else:
                        out.unsent.append((msg, "the SuperLink refused the message"))
            answered = 0
            if in_flight:
                ids = list(in_flight)
                try:
                    replies = self.call("pull_messages", lambda i=ids: list(grid.pull_messages(i)), deadline)
                except PastDeadline:
                    pull_failed = True
                    continue
                for reply in replies:
                    if in_flight.pop(reply.metadata.reply_to_message_id, None) is not None:
                        out.replies.append(reply)
                        answered += 1
            if not in_flight and not any(queues.values()):
                break
            if answered:  # a reply frees room for the node's next message: push it at once
                wait = self.poll_interval
                continue
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
            if self.max_poll_interval is not None:
                wait = min(2 * wait, max(self.max_poll_interval, self.poll_interval))
        for mid, msg in in_flight.items():
            if pull_failed:
                out.failed.append((msg, PULL_FAILED))
            else:
                out.late.append(msg)
            self.outstanding[mid] = msg.metadata.dst_node_id
        return out

    def _push_failed(self, batch: list[Message], out: Dispatch) -> None:
        """A push still failing at the deadline. A message that got its id (HttpGrid names it before
        pushing) may be at the SuperLink, and may be trained: its node stays busy until the SuperLink
        answers for it, with a reply or with "message unavailable" for an id it does not hold."""
        for msg in batch:
            if msg.metadata.message_id:
                self.outstanding[msg.metadata.message_id] = msg.metadata.dst_node_id
                out.failed.append((msg, PUSH_FAILED))
            else:
                out.unsent.append((msg, PUSH_FAILED))
