"""The IET strategy: FedAvg over K shard models, one message per shard, MSR between rounds.

K (shards) is independent of the number of nodes: shards are mapped onto the connected nodes
and stay on their node while it stays. Two messages for one node can run at once in Flower's
simulation (each on its own copy of the node's Context, last writer wins), so messages go out
in waves holding at most one message per node: per-shard state on a node is never raced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .msr import Moves, Redistribution, apply_moves, check_partition

log = logging.getLogger("iet_agc.strategy")

METRICS = ("num-examples", "train-loss", "skip-rate", "aug-rate", "steps")


def assign_nodes(num_shards: int, node_ids: Iterable[int], previous: dict[int, int]) -> dict[int, int]:
    """Map shards to nodes: keep each shard's node while it is connected, fill the rest by load.

    New placements go to the least-loaded node (ties: smallest node id), so the map depends on
    the set of nodes, never on the order the grid lists them.
    """
    nodes = sorted(set(node_ids))
    if not nodes:
        raise RuntimeError("no nodes connected")
    mapping = {s: n for s, n in previous.items() if n in nodes and s < num_shards}
    load = {n: 0 for n in nodes}
    for n in mapping.values():
        load[n] += 1
    for s in range(num_shards):
        if s not in mapping:
            node = min(nodes, key=lambda n: (load[n], n))
            mapping[s] = node
            load[node] += 1
    return mapping


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


class WaveGrid:
    """A Grid wrapper whose ``send_and_receive`` sends in per-node waves within one timeout."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        for wave in in_waves(list(messages)):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            replies.extend(self._grid.send_and_receive(wave, timeout=left))
        return replies


@dataclass
class RoundLog:
    """What the strategy learned in one round (for rounds.csv, assignments.csv, moved.csv)."""

    assignment: list[np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    moved: list[np.ndarray] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    shard_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # per shard: its reply


class IETStrategy(FedAvg):
    """FedAvg-derived IET strategy owning the shard assignment and the MSR step."""

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        *,
        num_samples: int,
        train_config: dict,
        redistribution: Redistribution,
        seed: int = 0,
        cumulative_counts: bool = False,
        min_nodes: int = 1,
        on_round: Callable[[int, RoundLog], None] | None = None,
    ) -> None:
        super().__init__(
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=min_nodes,
            weighted_by_key="num-examples",
        )
        check_partition(shards, num_samples)
        self.shards = [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
        self.num_samples = num_samples
        self.train_config = dict(train_config)
        self.redistribution = redistribution
        self.rng = np.random.default_rng(seed)
        self.cumulative = cumulative_counts
        self.total_counts = np.zeros(num_samples, dtype=np.int64)
        self.node_of_shard: dict[int, int] = {}
        self.on_round = on_round
        self.log: dict[int, RoundLog] = {}
        self.expected_arrays: dict[str, tuple[int, ...]] = {}  # the global model's keys and shapes

    # ---- sending ---------------------------------------------------------------------
    def start(self, grid: Grid, *args, **kwargs):  # noqa: D102 - FedAvg's loop, waves per node
        return super().start(WaveGrid(grid), *args, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        nodes = self._wait_for_nodes(grid)
        before = dict(self.node_of_shard)
        self.node_of_shard = assign_nodes(len(self.shards), nodes, before)
        for s, n in self.node_of_shard.items():
            if s in before and before[s] != n:
                log.warning("shard %d moved from node %d (gone) to node %d: its local state restarts", s, before[s], n)
        self.log[server_round] = RoundLog(assignment=[s.copy() for s in self.shards])
        self.expected_arrays = {k: tuple(a.shape) for k, a in arrays.items()}
        messages = []
        for shard, ids in enumerate(self.shards):
            cfg = ConfigRecord({**self.train_config, **dict(config)})
            cfg["server-round"] = server_round
            cfg["shard"] = shard
            cfg["ids"] = ids.tolist()
            content = RecordDict({"arrays": arrays, "config": cfg})
            messages.append(
                Message(content=content, dst_node_id=self.node_of_shard[shard], message_type=MessageType.TRAIN)
            )
        return messages

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        waited = 0
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            if waited % 10 == 0:
                log.info(
                    "waiting for nodes: %d connected, %d required (min-nodes)", len(nodes), self.min_available_nodes
                )
            time.sleep(1)
            waited += 1
        return nodes

    # ---- receiving -------------------------------------------------------------------
    def check_reply(self, msg: Message) -> tuple[int, np.ndarray] | str:
        """Return (shard, skip counts aligned with the ids sent), or the reason to drop the reply."""
        if msg.has_error():
            return f"error reply: {msg.error.reason}"
        c = msg.content
        try:
            shard = int(c["info"]["shard"])
            metrics = c["metrics"]
            skips = c["skips"]
            weights = c["arrays"]
        except (KeyError, TypeError, ValueError) as err:
            return f"malformed reply, missing {err}"
        if not 0 <= shard < len(self.shards):
            return f"unknown shard {shard}"
        if not isinstance(metrics, MetricRecord) or any(k not in metrics for k in METRICS):
            return f"shard {shard}: metrics must hold {', '.join(METRICS)}"
        if not isinstance(weights, ArrayRecord) or not isinstance(skips, ArrayRecord):
            return f"shard {shard}: 'arrays' and 'skips' must be ArrayRecords"
        try:
            ids = skips["ids"].numpy()
            counts = skips["counts"].numpy()
        except KeyError as err:
            return f"shard {shard}: skips lack {err}"
        if self.expected_arrays and {k: tuple(a.shape) for k, a in weights.items()} != self.expected_arrays:
            return f"shard {shard}: weights do not match the global model's keys and shapes"
        if not all(np.isfinite(a.numpy()).all() for a in weights.values()):
            return f"shard {shard}: weights hold NaN or infinity"
        expected = self.shards[shard]
        if ids.shape != expected.shape or counts.shape != expected.shape:
            return f"shard {shard}: {counts.size} skip counts for {expected.size} ids"
        if not np.array_equal(ids.astype(np.int64), expected):
            return f"shard {shard}: skip counts are for other ids than the ones sent"
        if not np.issubdtype(counts.dtype, np.integer):
            if not np.all(np.isfinite(counts)) or not np.all(counts == np.round(counts)):
                return f"shard {shard}: skip counts must be finite integers"
        if np.any(counts < 0):
            return f"shard {shard}: skip counts must be non-negative"
        if int(metrics["num-examples"]) != expected.size:
            return f"shard {shard}: num-examples {metrics['num-examples']} != shard size {expected.size}"
        return shard, counts.astype(np.int64)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        rlog = self.log.setdefault(server_round, RoundLog(assignment=[s.copy() for s in self.shards]))
        accepted: dict[int, tuple[Message, np.ndarray]] = {}
        for msg in replies:
            checked = self.check_reply(msg)
            if isinstance(checked, str):
                log.warning(
                    "round %d: dropped a reply from node %d: %s", server_round, msg.metadata.src_node_id, checked
                )
                rlog.dropped.append(checked)
                continue
            shard, counts = checked
            if shard in accepted:
                log.warning("round %d: dropped a second reply for shard %d", server_round, shard)
                continue
            accepted[shard] = (msg, counts)
        missing = [s for s in range(len(self.shards)) if s not in accepted]
        if missing:
            log.warning("round %d: shards %s keep their samples (no valid reply)", server_round, missing)
        if not accepted:
            raise RuntimeError(
                f"round {server_round}: no shard returned a valid reply; reasons: "
                + ("; ".join(sorted(set(rlog.dropped))) or "timed out")
            )
        # FedAvg sees only weights and scalar metrics, in shard order (repeatable sums).
        ordered = [accepted[s][0] for s in sorted(accepted)]
        stripped = [
            Message(
                content=RecordDict({"arrays": m.content["arrays"], "metrics": m.content["metrics"]}),
                reply_to=m,
            )
            for m in ordered
        ]
        arrays, metrics = super().aggregate_train(server_round, stripped)
        for shard, (msg, _) in accepted.items():
            info = msg.content["info"]
            rlog.shard_metrics[shard] = {
                "node": msg.metadata.src_node_id,
                "local_step": int(info["local-step"]) if "local-step" in info else -1,
                **{k.replace("-", "_"): float(v) for k, v in msg.content["metrics"].items()},
            }
        counts = [accepted[s][1] if s in accepted else None for s in range(len(self.shards))]
        moves = self.redistribute(counts)
        rlog.moved = moves.moved
        rlog.metrics = dict(metrics or {})
        rlog.metrics["moved"] = float(sum(len(m) for m in moves.moved))
        rlog.metrics["replies"] = float(len(accepted))
        if self.on_round is not None:
            self.on_round(server_round, rlog)
        return arrays, metrics

    def redistribute(self, counts: list[np.ndarray | None]) -> Moves:
        """Apply the redistribution rule to this round's (or the cumulative) skip counts."""
        for shard, c in enumerate(counts):
            if c is not None:
                self.total_counts[self.shards[shard]] += c
        if self.cumulative:
            counts = [None if c is None else self.total_counts[s] for s, c in zip(self.shards, counts, strict=True)]
        leaving = self.redistribution(self.shards, counts, self.rng)
        moves = apply_moves(self.shards, leaving)
        check_partition(moves.shards, self.num_samples)
        self.shards = moves.shards
        return moves
