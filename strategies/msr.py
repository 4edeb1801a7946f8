"""Memory Samples Redistribute (eq. 10-11) and its controls, as pure functions over id arrays.

Each shard hands its top ``floor(P * |shard|)`` ids by skip count to the next shard, cyclically
(shard K-1 to shard 0). Ties are broken by a seeded random order. A shard whose reply did not
arrive (``counts`` is None) keeps its samples; it may still receive from its predecessor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MSR_MODES = ("memory", "random", "none")  # the msr setting: most-skipped samples, random ones, none


@dataclass(frozen=True)
class Moves:
    """The new shards and what moved: ``moved[i]`` left shard i for shard (i + 1) % K."""

    shards: list[np.ndarray]
    moved: list[np.ndarray]


class Redistribution(Protocol):
    """Chooses, per shard, the ids (positions into the shard) that leave it this round.

    ``counts[i]`` are shard i's skip counts aligned with ``shards[i]``, or None when its reply
    did not arrive (the shard then keeps its samples). Return one index array per shard.
    """

    def __call__(
        self, shards: Sequence[np.ndarray], counts: Sequence[np.ndarray | None], rng: np.random.Generator
    ) -> list[np.ndarray]: ...


def num_to_move(shard_size: int, proportion: float) -> int:
    """|D_i^easy| = floor(P * |D_i|) (eq. 10)."""
    return int(np.floor(proportion * shard_size + 1e-9))


def top_skipped(counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the k largest counts, ties broken by a seeded random order."""
    perm = rng.permutation(len(counts))
    order = perm[np.argsort(-counts[perm], kind="stable")]
    return np.sort(order[:k])


class PerShardRedistribution(ABC):
    """Base of rules that pick floor(P * |shard|) positions per shard from its counts alone."""

    def __init__(self, proportion: float) -> None:
        self.proportion = proportion

    @abstractmethod
    def choose(self, counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Positions (into the shard) of the k samples that leave it."""

    def __call__(self, shards, counts, rng):
        out = []
        for s, c in zip(shards, counts, strict=True):
            k = num_to_move(len(s), self.proportion)
            out.append(np.empty(0, dtype=np.int64) if c is None else self.choose(np.asarray(c), k, rng))
        return out


class MemoryRedistribution(PerShardRedistribution):
    """MSR: move each shard's most-skipped samples (eq. 10-11)."""

    def choose(self, counts, k, rng):
        return top_skipped(counts, k, rng)


class RandomRedistribution(PerShardRedistribution):
    """Table V's control: move the same number of samples, chosen at random."""

    def choose(self, counts, k, rng):
        return np.sort(rng.choice(len(counts), k, replace=False))


class NoRedistribution:
    """MSR off: shards never change."""

    def __call__(self, shards, counts, rng):
        return [np.empty(0, dtype=np.int64) for _ in shards]


def make_redistribution(mode: str, proportion: float) -> Redistribution:
    """The rule named by the ``msr`` setting."""
    if mode == "memory":
        return MemoryRedistribution(proportion)
    if mode == "random":
        return RandomRedistribution(proportion)
    if mode == "none":
        return NoRedistribution()
    raise ValueError(f"msr: must be one of memory, random, none; got {mode!r}")


def hold_moves_into(leaving: Sequence[np.ndarray], refusing: Sequence[bool]) -> list[np.ndarray]:
    """Cancel the moves into every shard i with ``refusing[i]`` (its last round failed): shard i-1
    keeps those samples, so MSR never strands samples in a shard that does not train."""
    k = len(leaving)
    return [np.empty(0, dtype=np.int64) if refusing[(i + 1) % k] else np.asarray(p) for i, p in enumerate(leaving)]


def apply_moves(shards: Sequence[np.ndarray], leaving: Sequence[np.ndarray]) -> Moves:
    """Move ``shards[i][leaving[i]]`` to shard (i + 1) % K, all shards at once (eq. 11)."""
    k = len(shards)
    if k == 1:
        return Moves([np.asarray(shards[0])], [np.empty(0, dtype=np.int64)])
    moved = [np.asarray(s)[np.asarray(p, dtype=np.int64)] for s, p in zip(shards, leaving, strict=True)]
    new = []
    for i, s in enumerate(shards):
        stay = np.delete(np.asarray(s), np.asarray(leaving[i], dtype=np.int64))
        new.append(np.sort(np.concatenate([stay, moved[i - 1]])))
    return Moves(new, moved)


def check_partition(shards: Sequence[np.ndarray], num_samples: int) -> None:
    """Raise if the shards are not an exact partition of 0..N-1 (no id lost or duplicated)."""
    all_ids = np.concatenate([np.asarray(s) for s in shards]) if shards else np.empty(0)
    if all_ids.size != num_samples or not np.array_equal(np.sort(all_ids), np.arange(num_samples)):
        counts = np.bincount(all_ids.astype(np.int64), minlength=num_samples) if all_ids.size else None
        lost = int((counts == 0).sum()) if counts is not None else num_samples
        dup = int((counts > 1).sum()) if counts is not None else 0
        raise RuntimeError(
            f"shard assignment is not a partition of the {num_samples} training ids "
            f"({lost} lost, {dup} duplicated); stopping"
        )
