"""The IET strategy's bookkeeping: which samples each shard holds, where each shard trains, and
which nodes have failed too often to be given shards.

Everything here is plain data and pure updates, saved whole in every checkpoint
(``state_dict``/``load_state_dict``), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .msr import check_partition


def assign_nodes(num_shards: int, node_ids: Iterable[int], previous: dict[int, int]) -> dict[int, int]:
    """Map shards to nodes: keep each shard's node while it is available, fill the rest by load.

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
    return dict(sorted(mapping.items()))


@dataclass
class Placement:
    """Where each shard trains this round, and what changed since the last round."""

    node_of_shard: dict[int, int]
    moved: dict[int, tuple[int, int]]  # shard -> (old node, new node)
    reinstated: list[int]  # set-aside nodes given shards again because no healthy node was left


@dataclass
class ShardLedger:
    """Shards (sorted id arrays forming a partition of 0..N-1), skip counts, nodes and their health."""

    shards: list[np.ndarray]
    num_samples: int
    seed: int = 0
    total_counts: np.ndarray = field(init=False)
    rng: np.random.Generator = field(init=False)  # MSR's tie-breaking and random moves
    node_of_shard: dict[int, int] = field(default_factory=dict)
    node_failures: dict[int, int] = field(default_factory=dict)  # node -> failed rounds in a row
    set_aside: dict[int, str] = field(default_factory=dict)  # node -> why it gets no shards
    shard_failed: list[bool] = field(init=False)  # shard -> its last round failed
    failed_rounds: int = 0  # rounds in a row with no valid reply
    last_round: int = 0  # the last completed round

    def __post_init__(self) -> None:
        check_partition(self.shards, self.num_samples)
        self.shards = [np.sort(np.asarray(s, dtype=np.int64)) for s in self.shards]
        self.total_counts = np.zeros(self.num_samples, dtype=np.int64)
        self.rng = np.random.default_rng(self.seed)
        self.shard_failed = [False] * len(self.shards)

    # ---- placement ------------------------------------------------------------------
    def place(self, connected: Iterable[int]) -> Placement:
        """Put every shard on a connected node that is not set aside (all of them if none is left)."""
        connected = sorted(set(connected))
        healthy = [n for n in connected if n not in self.set_aside]
        reinstated = []
        if not healthy:
            reinstated = [n for n in connected if n in self.set_aside]
            for n in reinstated:
                del self.set_aside[n]
                self.node_failures.pop(n, None)
            healthy = connected
        before = self.node_of_shard
        self.node_of_shard = assign_nodes(len(self.shards), healthy, before)
        moved = {s: (before[s], n) for s, n in self.node_of_shard.items() if s in before and before[s] != n}
        return Placement(dict(self.node_of_shard), moved, reinstated)

    def record_health(self, node_outcomes: dict[int, str | None], limit: int) -> dict[int, str]:
        """Count each node's failed rounds in a row (outcome: None = all its replies valid, else a
        reason); set aside nodes that reach ``limit``. Returns the nodes newly set aside."""
        newly = {}
        for node, reason in node_outcomes.items():
            if reason is None:
                self.node_failures[node] = 0
                continue
            self.node_failures[node] = self.node_failures.get(node, 0) + 1
            if self.node_failures[node] >= limit and node not in self.set_aside:
                self.set_aside[node] = f"{self.node_failures[node]} failed rounds in a row, the last: {reason}"
                newly[node] = self.set_aside[node]
        return newly

    # ---- checkpoint -----------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able values, named integer arrays): everything needed to continue the run."""
        arrays = {f"shard-{i}": s for i, s in enumerate(self.shards)}
        arrays["total-counts"] = self.total_counts
        meta = {
            "num-samples": self.num_samples,
            "num-shards": len(self.shards),
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
            "node-of-shard": {str(s): n for s, n in self.node_of_shard.items()},
            "node-failures": {str(n): c for n, c in self.node_failures.items()},
            "set-aside": {str(n): r for n, r in self.set_aside.items()},
            "shard-failed": list(self.shard_failed),
            "failed-rounds": self.failed_rounds,
            "last-round": self.last_round,
        }
        return meta, arrays

    @classmethod
    def from_state_dict(cls, meta: dict, arrays: dict[str, np.ndarray]) -> ShardLedger:
        ledger = cls([arrays[f"shard-{i}"] for i in range(meta["num-shards"])], meta["num-samples"], meta["seed"])
        ledger.total_counts = np.asarray(arrays["total-counts"], dtype=np.int64).copy()
        ledger.rng.bit_generator.state = meta["rng"]
        ledger.node_of_shard = {int(s): int(n) for s, n in meta["node-of-shard"].items()}
        ledger.node_failures = {int(n): int(c) for n, c in meta["node-failures"].items()}
        ledger.set_aside = {int(n): str(r) for n, r in meta["set-aside"].items()}
        ledger.shard_failed = [bool(f) for f in meta["shard-failed"]]
        ledger.failed_rounds = int(meta["failed-rounds"])
        ledger.last_round = int(meta["last-round"])
        return ledger
