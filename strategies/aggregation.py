"""The aggregation step under IET: a Flower strategy combines the shard models each round.

The shard layer (``IETStrategy``) owns which shard trains where and what the replies may carry;
the aggregator only shapes the round's instruction (its ``configure_train``, for example FedProx's
``proximal-mu``) and combines the checked replies (its ``aggregate_train``). Any
``flwr.serverapp.strategy.Strategy`` works; the named ones come from the ``aggregation`` setting.
Server optimizers (FedAvgM's momentum, FedAdam's moments) keep state across rounds: the
``Resumable`` ones here put it in the run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Strategy

from .protocol import METRICS, NUM_EXAMPLES

AGGREGATIONS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedtrimmedavg", "fedmedian")  # Flower strategies


@runtime_checkable
class Resumable(Protocol):
    """An aggregator whose state across rounds goes into the run's checkpoint (flat arrays)."""

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class ResumableFedAvgM(FedAvgM):
    """Flower's FedAvgM with its momentum vector in the checkpoint."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"momentum.{i:05d}": np.asarray(v) for i, v in enumerate(self.momentum_vector or [])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.momentum_vector = [state[k] for k in sorted(state) if k.startswith("momentum.")] or None


class ResumableFedAdam(FedAdam):
    """Flower's FedAdam with its first and second moments in the checkpoint."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"m_t.{k}": v for k, v in (self.m_t or {}).items()} | {
            f"v_t.{k}": v for k, v in (self.v_t or {}).items()
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.m_t = {k.removeprefix("m_t."): v for k, v in state.items() if k.startswith("m_t.")} or None
        self.v_t = {k.removeprefix("v_t."): v for k, v in state.items() if k.startswith("v_t.")} or None


def _takes_any_nodes() -> dict:
    return dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        weighted_by_key=NUM_EXAMPLES,
    )


def fedavg() -> FedAvg:
    """IET's own aggregation (the paper's): FedAvg weighted by each shard's sample count."""
    return FedAvg(**_takes_any_nodes())


@dataclass(frozen=True)
class AggregationConfig:
    """Which Flower strategy combines the shard models, and its parameters (the app's
    ``aggregation`` settings; defaults: IET's FedAvg and Flower's usual values).

    Parameters
    ----------
    aggregation : str (default: "fedavg")
        One of ``AGGREGATIONS``: fedavg, fedprox, fedavgm, fedadam, fedtrimmedavg, fedmedian.
    fedprox_mu : float (default: 0.01)
        FedProx's proximal weight mu, sent to the shards as ``proximal-mu``.
    fedavgm_lr : float (default: 1.0)
        FedAvgM's server learning rate.
    fedavgm_momentum : float (default: 0.9)
        FedAvgM's server momentum.
    fedadam_eta : float (default: 1e-3)
        FedAdam's server learning rate.
    fedadam_tau : float (default: 1e-3)
        FedAdam's adaptivity (tau).
    fedtrimmedavg_beta : float (default: 0.25)
        FedTrimmedAvg's fraction cut from each end.
    """

    aggregation: str = "fedavg"
    fedprox_mu: float = 0.01
    fedavgm_lr: float = 1.0
    fedavgm_momentum: float = 0.9
    fedadam_eta: float = 1e-3
    fedadam_tau: float = 1e-3
    fedtrimmedavg_beta: float = 0.25


def make_aggregator(config: AggregationConfig) -> Strategy:
    """The Flower strategy named by ``config.aggregation``, with its parameters from ``config``.

    Node sampling is the shard layer's, so each is built to take whatever nodes it is shown.
    """
    common = _takes_any_nodes()
    name = config.aggregation
    if name == "fedavg":
        return fedavg()
    if name == "fedprox":
        return FedProx(**common, proximal_mu=config.fedprox_mu)
    if name == "fedavgm":
        return ResumableFedAvgM(
            **common, server_learning_rate=config.fedavgm_lr, server_momentum=config.fedavgm_momentum
        )
    if name == "fedadam":
        return ResumableFedAdam(**common, eta=config.fedadam_eta, tau=config.fedadam_tau)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=config.fedtrimmedavg_beta)
    if name == "fedmedian":
        return FedMedian(**common)
    raise ValueError(f"aggregation: one of {', '.join(AGGREGATIONS)}, got {name!r}")


class AggregatorWaits(RuntimeError):
    """The aggregator waits for more nodes than the round has: it must take what it is shown."""


class ShardNodes:
    """The Grid an aggregator's ``configure_train`` sees: the round's nodes, nothing to push.

    Flower's strategies sample nodes there; the shard layer has placed the shards already, so only
    the instruction they build (records and config) is used. A strategy that keeps waiting for more
    nodes (its ``min_available_nodes``) is stopped with a clear error instead of hanging the run.
    """

    def __init__(self, nodes: Iterable[int], strategy: Strategy) -> None:
        self.nodes, self.strategy, self.calls = list(nodes) or [0], strategy, 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        if self.calls > 2:  # Flower's sample_nodes asks again only while it waits for more nodes
            raise AggregatorWaits(
                f"the aggregation strategy {type(self.strategy).__name__} waits for more than the "
                f"{len(self.nodes)} node(s) of this round; the shard layer places the shards, so build it with "
                "min_available_nodes=1 and min_train_nodes=1"
            )
        return list(self.nodes)


def instruction(
    aggregator: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: Iterable[int]
) -> tuple[str, ArrayRecord, ConfigRecord]:
    """The aggregator's train instruction for this round: (its array key, the arrays, the config).

    Every shard's message carries these arrays and config (plus its own shard fields), under the
    app's keys ``arrays`` and ``config``; the aggregator gets the replies under its own key.
    """
    messages = list(
        aggregator.configure_train(server_round, arrays, ConfigRecord(dict(config)), ShardNodes(nodes, aggregator))
    )
    if not messages:
        raise ValueError(
            f"the aggregation strategy {type(aggregator).__name__} configured no training in round {server_round} "
            "(fraction_train 0?); IET needs every shard to train"
        )
    content = messages[0].content
    if len(content.array_records) != 1 or len(content.config_records) != 1:
        raise ValueError(
            f"the aggregation strategy {type(aggregator).__name__} must send one ArrayRecord and one "
            f"ConfigRecord per message, got {sorted(content.array_records)} and {sorted(content.config_records)}"
        )
    (key, sent), config = next(iter(content.array_records.items())), next(iter(content.config_records.values()))
    return key, sent, config


def aggregate(
    aggregator: Strategy, server_round: int, array_key: str, replies: list[tuple[Message, ArrayRecord, dict]]
) -> ArrayRecord | None:
    """The aggregator's combination of checked replies (each: the reply, its arrays, its metrics).

    It sees only what it must: the arrays under the key it sent them with and the scalar metrics,
    in records of its own (FedMedian, for one, empties the records it reads).
    """
    stripped = [
        Message(RecordDict({array_key: ArrayRecord(dict(arrays)), METRICS: MetricRecord(dict(metrics))}), reply_to=msg)
        for msg, arrays, metrics in replies
    ]
    arrays, _ = aggregator.aggregate_train(server_round, stripped)
    return arrays
