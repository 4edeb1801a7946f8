"""The IET strategy: K shard models combined by an aggregator (FedAvg), MSR between rounds.

K (shards) is independent of the number of nodes: shards are mapped onto the connected nodes
and stay on their node while it stays healthy (``ShardLedger``). A node's shards of the round
travel in one message, or in messages of ``shards_per_message`` shards (1: one per shard). Each
node's messages go out in order, a few at a time, under the round's deadline (``NodeQueues``);
every shard's reply is checked before anything reads it (``check_train_reply``,
``check_packed_reply``). A round without a valid reply keeps the
global model; the run stops only after ``max_failed_rounds`` such rounds in a row, or when the
SuperLink keeps failing past ``NodeQueues``' retries (``SuperLinkFailing``). After every
round the ``recorder`` gets the round and the strategy's state, which is enough to resume.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from .aggregation import Resumable, aggregate, fedavg, instruction
from .dispatch import LATE, NOT_THE_NODES, NodeQueues, SuperLinkFailing
from .ledger import ShardLedger
from .msr import Moves, Redistribution, apply_moves, check_partition, hold_moves_into
from .protocol import (
    ARRAYS,
    FINGERPRINT,
    METRICS,
    NUM_EXAMPLES,
    instruction_shards,
    packed_train_message,
    reply_metrics,
    train_message,
)
from .replies import (
    BadReply,
    Sent,
    ShardReply,
    check_packed_reply,
    check_train_reply,
    outlier_updates,
    update_norms,
)

NO_NODES = "no node connected"


class RunStopped(RuntimeError):
    """Too many failed rounds in a row, or a SuperLink that keeps failing: the run stops with its
    last checkpoint kept."""


@dataclass
class RoundLog:
    """What happened in one round (rounds.csv, assignments.csv, moved.csv, shards.csv, dropped.csv)."""

    server_round: int
    assignment: list[np.ndarray]  # the ids each shard was sent this round
    metrics: dict[str, float] = field(default_factory=dict)  # weighted means of the replies' metrics, moved, counts
    moved: list[np.ndarray] = field(default_factory=list)
    dropped: list[tuple[int, int, str]] = field(default_factory=list)  # (shard or -1, node, reason)
    timed_out: dict[int, str] = field(default_factory=dict)  # shard -> why it was not sent / answered
    placed: dict[int, int] = field(default_factory=dict)  # shard -> the node it was sent to this round
    shard_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # per shard: its reply
    set_aside: dict[int, str] = field(default_factory=dict)  # nodes set aside after this round

    @property
    def failed(self) -> bool:
        return not self.shard_metrics


@dataclass
class StrategyState:
    """What the strategy needs to continue after a round: the ledger and the aggregator's state."""

    ledger_meta: dict
    ledger_arrays: dict[str, np.ndarray]
    aggregator: dict[str, np.ndarray] = field(default_factory=dict)


class RoundRecorder(Protocol):
    """Receives each finished round and the strategy's state (rows, checkpoint)."""

    def round_done(
        self, rlog: RoundLog, arrays: ArrayRecord, evaluation: MetricRecord | None, state: StrategyState
    ) -> None: ...


class IETStrategy(Strategy):
    """The shard layer of IET: shard assignment, node placement, reply checks and MSR, over an
    aggregation strategy (Flower's FedAvg unless ``aggregator`` names another) that combines the
    shard models.

    Parameters
    ----------
    shards : Sequence[np.ndarray] | ShardLedger
        The K initial shards (the training ids each holds), or a resumed run's ledger.
    num_samples : int
        The training set's size N: every id in 0..N-1 belongs to exactly one shard.
    train_config : dict
        The settings every instruction carries to the shards (the run's run_config).
    redistribution : Redistribution
        MSR's rule (eq. 10-11): which samples leave each shard after a round.
    seed : int (default: 0)
        Seeds the ledger's draws (MSR's random choices).
    cumulative_counts : bool (default: False)
        Rank samples for MSR by their skips summed over all rounds instead of the last round's.
    min_nodes : int (default: 1)
        Nodes to wait for before the first round (later rounds go on with those left).
    max_failed_rounds : int (default: 3)
        Rounds in a row without a valid reply before the run stops (``RunStopped``).
    node_max_failures : int (default: 2)
        Rounds in a row in which a node gave no valid reply before it is set aside.
    recorder : RoundRecorder | None (default: None)
        Receives each finished round and the strategy's state (rows, checkpoint).
    dispatcher : NodeQueues | None (default: None)
        Sends the round's messages in per-node queues under the deadline (``NodeQueues()``).
    should_stop : Callable[[], str | None] | None (default: None)
        Checked before each round: a reason to stop the run, or None.
    aggregator : Strategy | None (default: None)
        The Flower strategy that builds the instruction and combines the replies (FedAvg weighted
        by shard size: the paper's IET).
    max_update_ratio : float (default: inf)
        Drop a reply whose update ||w_k - w|| exceeds this many times the median of the round's
        other replies' (``outlier_updates``); inf checks nothing.
    shards_per_message : int (default: 1)
        How many of a node's shards one message carries: 1 = a message per shard (the plain
        contract), 0 = all of the node's shards of the round in one message (``group_shards``).
    """

    def __init__(
        self,
        shards: Sequence[np.ndarray] | ShardLedger,
        *,
        num_samples: int,
        train_config: dict,
        redistribution: Redistribution,
        seed: int = 0,
        cumulative_counts: bool = False,
        min_nodes: int = 1,
        max_failed_rounds: int = 3,
        node_max_failures: int = 2,
        recorder: RoundRecorder | None = None,
        dispatcher: NodeQueues | None = None,
        should_stop: Callable[[], str | None] | None = None,
        aggregator: Strategy | None = None,
        max_update_ratio: float = float("inf"),
        shards_per_message: int = 1,
    ) -> None:
        if shards_per_message < 0:
            raise ValueError(f"shards-per-message: must be 0 (all) or an integer >= 1, got {shards_per_message}")
        self.shards_per_message = shards_per_message
        self.aggregator = fedavg() if aggregator is None else aggregator
        self.max_update_ratio = max_update_ratio
        self.sent_arrays: dict[str, np.ndarray] = {}  # this round's weights, as sent
        self.min_available_nodes = min_nodes
        self.ledger = shards if isinstance(shards, ShardLedger) else ShardLedger(list(shards), num_samples, seed)
        self.train_config = dict(train_config)
        self.redistribution = redistribution
        self.cumulative = cumulative_counts
        self.max_failed_rounds = max_failed_rounds
        self.node_max_failures = node_max_failures
        self.recorder = recorder
        self.dispatcher = dispatcher or NodeQueues()
        self.should_stop = should_stop  # checked before each round: a reason to stop, or None
        self.patience: float | None = None  # how long a later round waits for a node (the round timeout)
        self._placed = False  # min-nodes is awaited before the first round only
        self.log: dict[int, RoundLog] = {}
        self.outgoing: list[Message] = []  # this round's messages; ids are set when pushed
        self.expected_arrays: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (dtype, shape)
        self.confirmed: set[int] = set()  # nodes whose valid reply confirmed the data set's fingerprint
        self.array_key = ARRAYS  # the aggregator's key for the arrays it combines (from its instruction)

    # shards and counts live in the ledger; these names keep the strategy readable
    @property
    def shards(self) -> list[np.ndarray]:
        return self.ledger.shards

    @property
    def total_counts(self) -> np.ndarray:
        return self.ledger.total_counts

    def summary(self) -> None:
        """Flower's strategy summary: the shard layer, then the aggregator's own."""
        log(
            INFO,
            "\t├──> IET: %d shards over the connected nodes (min-nodes %d), redistribution %s",
            len(self.shards),
            self.min_available_nodes,
            type(self.redistribution).__name__,
        )
        log(INFO, "\t└──> aggregation: %s", type(self.aggregator).__name__)
        self.aggregator.summary()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        """No federated evaluation: the server's evaluator measures the global model."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def state(self) -> StrategyState:
        """The ledger and (a ``Resumable`` aggregator's) server-optimizer state, for the checkpoint."""
        meta, arrays = self.ledger.state_dict()
        return StrategyState(
            meta, arrays, self.aggregator.state_dict() if isinstance(self.aggregator, Resumable) else {}
        )

    # ---- the round loop ---------------------------------------------------------------
    def start(  # noqa: D417 - FedAvg's signature, plus where to begin
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's ``Strategy.start`` loop, beginning at ``first_round`` (a resumed run) and
        sending in per-node waves; a round without valid replies keeps the global model."""
        log(INFO, "Starting %s strategy: rounds %d..%d", type(self).__name__, first_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        result, arrays, started = Result(), initial_arrays, time.time()
        self.patience = timeout
        result.arrays = arrays
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            if self.should_stop is not None and (reason := self.should_stop()):
                raise RunStopped(reason)
            try:
                messages = self.configure_train(server_round, arrays, train_config, grid)
                dispatch = self.dispatcher.send(grid, messages, timeout)
            except SuperLinkFailing as err:  # the round is lost; the last checkpoint stays
                raise RunStopped(f"round {server_round}: {err}") from err
            rlog = self.log[server_round]
            if dispatch.discarded:
                log(
                    WARNING,
                    "round %d: discarded %d late replies to earlier rounds",
                    server_round,
                    len(dispatch.discarded),
                )
            for msg, reason in [*dispatch.unsent, *((m, LATE) for m in dispatch.late), *dispatch.failed]:
                for shard in instruction_shards(msg):  # a packed message's shards share its fate
                    rlog.timed_out[shard] = reason
            new_arrays, train_metrics = self.aggregate_train(server_round, dispatch.replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
                result.train_metrics_clientapp[server_round] = train_metrics
            evaluation = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if evaluation is not None:
                result.evaluate_metrics_serverapp[server_round] = evaluation
            if self.recorder is not None:
                self.recorder.round_done(rlog, arrays, evaluation, self.state())
            if self.ledger.failed_rounds >= self.max_failed_rounds:
                raise RunStopped(self._stop_reason())
        log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result

    def _stop_reason(self) -> str:
        last = range(self.ledger.last_round - self.ledger.failed_rounds + 1, self.ledger.last_round + 1)
        reasons = sorted(
            {reason for r in last for _, _, reason in self.log[r].dropped}
            | {reason for r in last for reason in self.log[r].timed_out.values()}
        )
        return (
            f"{self.ledger.failed_rounds} rounds in a row (max-failed-rounds) without a valid reply, "
            f"up to round {self.ledger.last_round}; reasons: {'; '.join(reasons) or 'no nodes replied'}"
        )

    # ---- sending ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        first = not self._placed
        nodes = self._wait_for_nodes(grid, self.min_available_nodes if first else 1, None if first else self.patience)
        self._placed = True
        if not nodes:  # every node is gone: the round fails, the run goes on (max-failed-rounds)
            self.log[server_round] = RoundLog(server_round, [s.copy() for s in self.shards])
            self.log[server_round].timed_out = dict.fromkeys(range(len(self.shards)), NO_NODES)
            self.outgoing = []
            return []
        placement = self.ledger.place(nodes)
        for node in placement.reinstated:
            log(WARNING, "node %d gets shards again: no healthy node is left", node)
        for s, (old, new) in placement.moved.items():
            why = self.ledger.set_aside.get(old, "it left")
            log(
                WARNING,
                "shard %d moved from node %d (%s) to node %d: its optimizer, warm-up and memory bank go on only "
                "if that node reads the same state-dir (one machine, or a shared folder), else they restart",
                s,
                old,
                why,
                new,
            )
        self.log[server_round] = RoundLog(
            server_round, [s.copy() for s in self.shards], placed=dict(placement.node_of_shard)
        )
        nodes_used = sorted(set(placement.node_of_shard.values()))
        self.array_key, arrays, config = instruction(self.aggregator, server_round, arrays, config, nodes_used)
        self.expected_arrays = {k: (a.dtype, tuple(a.shape)) for k, a in arrays.items()}
        self.sent_arrays = {k: a.numpy() for k, a in arrays.items()} if np.isfinite(self.max_update_ratio) else {}
        self.outgoing = []
        common = {**self.train_config, **dict(config)}
        for node, group in group_shards(placement.node_of_shard, self.shards_per_message):
            if len(group) == 1:  # a shard alone travels as the plain single-shard message
                self.outgoing.append(train_message(arrays, common, group[0], server_round, self.shards[group[0]], node))
            else:
                pairs = [(s, self.shards[s]) for s in group]
                self.outgoing.append(packed_train_message(arrays, common, pairs, server_round, node))
        return list(self.outgoing)

    def _wait_for_nodes(self, grid: Grid, need: int, patience: float | None) -> list[int]:
        """The connected nodes once ``need`` are there; after ``patience`` seconds (None: no
        limit) whatever is connected. Only the first round waits for ``min-nodes``: later rounds
        go on with the nodes that are left, so a node that dies never stalls the run."""
        started, waited = time.monotonic(), 0
        while len(nodes := self.dispatcher.call("get_node_ids", lambda: list(grid.get_node_ids()))) < need:
            if patience is not None and time.monotonic() - started >= patience:
                break
            if waited % 10 == 0:
                log(INFO, "waiting for nodes: %d connected, %d required", len(nodes), need)
            time.sleep(1)
            waited += 1
        return nodes

    # ---- receiving ----------------------------------------------------------------------
    def _sent(self) -> dict[str, list[Sent]]:
        """This round's pushed messages by id, each with its shards: the only source of a reply's shards."""
        max_count = int(self.train_config.get("local-epochs", 2**62))
        fingerprint = str(self.train_config.get(FINGERPRINT, ""))
        metrics = reply_metrics(self.train_config)
        sent = {}
        for m in self.outgoing:
            if m.metadata.message_id:
                sent[m.metadata.message_id] = [
                    Sent(shard, m.metadata.dst_node_id, self.shards[shard], max_count, fingerprint, metrics)
                    for shard in instruction_shards(m)
                ]
        return sent

    def check_replies(self, server_round: int, replies: Iterable[Message]) -> dict[int, ShardReply]:
        """The valid reply per shard; every other reply is dropped with its reason in the round log."""
        sent, accepted = self._sent(), {}
        for msg in replies:
            targets = sent.get(msg.metadata.reply_to_message_id)
            if targets is None:
                why = BadReply("answers no message of this round (late, or not a reply to the server)")
                self._drop(server_round, -1, msg.metadata.src_node_id, why)
                continue
            if len(targets) == 1:  # a plain single-shard message
                results = {targets[0].shard: _checked(msg, targets[0], self.expected_arrays)}
            else:
                results = check_packed_reply(msg, targets, self.expected_arrays)
            for target in targets:
                result = results[target.shard]
                if isinstance(result, ShardReply) and target.shard in accepted:
                    result = BadReply(f"a second reply for shard {target.shard}")
                if isinstance(result, BadReply):  # an error reply may come from the SuperLink: the node sent to
                    self._drop(server_round, target.shard, target.node, result)
                    continue
                accepted[target.shard] = result
                if target.node not in self.confirmed:  # once per node (and server process), as operators read it
                    self.confirmed.add(target.node)
                    log(INFO, "node %d confirmed data set %s", target.node, target.fingerprint or "(none sent)")
        return self._drop_outliers(server_round, accepted)

    def _drop(self, server_round: int, shard: int, node: int, err: BadReply) -> None:
        """Log a dropped shard reply and record it with its reason (``dropped.csv``)."""
        log(WARNING, "round %d: dropped a reply from node %d (shard %d): %s", server_round, node, shard, err)
        self.log[server_round].dropped.append((shard, node, str(err)))

    def _drop_outliers(self, server_round: int, accepted: dict[int, ShardReply]) -> dict[int, ShardReply]:
        """Drop the replies whose update is far larger than the others' (``max_update_ratio``)."""
        if not self.sent_arrays or len(accepted) < 2:
            return accepted
        shards = sorted(accepted)
        norms = update_norms(self.sent_arrays, [accepted[s].arrays for s in shards])
        for k, why in outlier_updates(norms, self.max_update_ratio).items():
            shard = shards[k]
            node = accepted.pop(shard).node
            log(WARNING, "round %d: dropped a reply from node %d (shard %d): %s", server_round, node, shard, why)
            self.log[server_round].dropped.append((shard, node, why))
        return accepted

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        rlog = self.log[server_round]
        accepted = self.check_replies(server_round, replies)
        failed = [s for s in range(len(self.shards)) if s not in accepted]
        if failed:
            log(WARNING, "round %d: shards %s keep their samples (no valid reply)", server_round, failed)
        arrays, metrics = None, None
        if accepted:  # the aggregator sees only weights and the expected scalar metrics, in shard order
            ordered = [accepted[s] for s in sorted(accepted)]
            arrays = aggregate(
                self.aggregator, server_round, self.array_key, [(r.message, r.arrays, r.metrics) for r in ordered]
            )
            metrics = aggregate_metricrecords(
                [RecordDict({METRICS: MetricRecord(dict(r.metrics))}) for r in ordered], NUM_EXAMPLES
            )
            for spec in reply_metrics(self.train_config):  # "max": the largest shard's (DP-SGD's epsilon)
                if spec.reduce == "max":
                    metrics[spec.key] = max(float(r.metrics[spec.key]) for r in ordered)
        for shard, reply in accepted.items():
            rlog.shard_metrics[shard] = {
                "node": reply.node,
                "local_step": reply.local_step,
                **{k.replace("-", "_"): float(v) for k, v in reply.metrics.items()},
            }
        moves = self.redistribute([accepted[s].counts if s in accepted else None for s in range(len(self.shards))])
        self._record_health(server_round, accepted)
        rlog.moved = moves.moved
        rlog.metrics = dict(metrics or {})
        rlog.metrics.update(
            moved=float(sum(len(m) for m in moves.moved)),
            replies=float(len(accepted)),
            dropped=float(len(rlog.dropped)),
            timed_out=float(len(rlog.timed_out)),
        )
        self.ledger.failed_rounds = 0 if accepted else self.ledger.failed_rounds + 1
        self.ledger.last_round = server_round
        if not accepted:
            log(WARNING, "round %d failed: no valid reply; the global model stays as it was", server_round)
        return arrays, metrics

    def _record_health(self, server_round: int, accepted: dict[int, ShardReply]) -> None:
        """A node's round fails when any shard it was given got no valid reply (late, busy,
        dropped); shards not sent because the deadline passed, or on which the SuperLink kept
        failing, count against no node."""
        rlog = self.log[server_round]
        outcomes: dict[int, str | None] = {}
        reasons = {s: r for s, _, r in rlog.dropped if s >= 0} | rlog.timed_out
        for shard, node in self.ledger.node_of_shard.items():
            if shard in accepted:
                outcomes.setdefault(node, None)
            elif rlog.timed_out.get(shard) not in NOT_THE_NODES:
                outcomes[node] = reasons.get(shard, "no reply")
        self.ledger.shard_failed = [s not in accepted for s in range(len(self.shards))]
        rlog.set_aside = self.ledger.record_health(outcomes, self.node_max_failures)
        for node, why in rlog.set_aside.items():
            log(WARNING, "node %d is set aside (node-max-failures): %s; its shards move to healthy nodes", node, why)

    def redistribute(self, counts: list[np.ndarray | None]) -> Moves:
        """Apply the redistribution rule to this round's (or the cumulative) skip counts; no
        samples move into a shard whose round failed."""
        ledger = self.ledger
        for shard, c in enumerate(counts):
            if c is not None:
                ledger.total_counts[ledger.shards[shard]] += c
        if self.cumulative:
            counts = [None if c is None else ledger.total_counts[s] for s, c in zip(ledger.shards, counts, strict=True)]
        leaving = self.redistribution(ledger.shards, counts, ledger.rng)
        leaving = hold_moves_into(leaving, [c is None for c in counts])
        moves = apply_moves(ledger.shards, leaving)
        check_partition(moves.shards, ledger.num_samples)
        ledger.shards = moves.shards
        return moves


def group_shards(node_of_shard: dict[int, int], per_message: int) -> list[tuple[int, list[int]]]:
    """``(node, shards)`` per message: each node's shards in shard order, ``per_message`` at a time
    (0: all of them in one); messages ordered by their first shard."""
    by_node: dict[int, list[int]] = {}
    for shard in sorted(node_of_shard):
        by_node.setdefault(node_of_shard[shard], []).append(shard)
    size = per_message or max((len(g) for g in by_node.values()), default=1)
    groups = [(node, shards[i : i + size]) for node, shards in by_node.items() for i in range(0, len(shards), size)]
    return sorted(groups, key=lambda g: g[1][0])


def _checked(msg: Message, sent: Sent, expected: dict[str, tuple[str, tuple[int, ...]]]) -> ShardReply | BadReply:
    """A single shard's reply checked (``check_train_reply``), or why it is dropped."""
    try:
        return check_train_reply(msg, sent, expected)
    except BadReply as err:
        return err
