"""The message contract between the server and the shards: instruction keys, reply records, metrics.

Both sides import it, and neither imports the other. A train instruction is a ``RecordDict`` of
the model's arrays (``ARRAYS``) and a ConfigRecord (``CONFIG``): the run's settings plus the
shard's own fields (``SHARD``, ``SERVER_ROUND``, ``IDS``). A reply carries the trained arrays,
the scalar metrics of ``REPLY_METRICS``, the skip counts aligned with the ids (``SKIPS``) and
what the node confirms (``INFO``). Adding a reply metric is one entry in ``REPLY_METRICS``: the
ClientApp packs it, the strategy's reply check checks it, and the run folder records it.

A packed instruction carries several shards of one node (``shards-per-message``): the arrays
once, the config with ``SHARDS`` (the shards, in order) instead of ``SHARD`` and ``IDS``, and one
ConfigRecord of ids per shard (``shard_key(s, IDS)``). ``split_instruction`` turns it into the
single-shard contents above, so each shard trains exactly as if it had come alone. Its reply holds
each shard's reply records under ``shard_key(s, record)``, or ``shard_key(s, ERROR)`` with the
reason that shard failed; ``split_reply`` turns it back into single-shard reply contents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

# records of an instruction and of a reply
ARRAYS, CONFIG = "arrays", "config"
METRICS, SKIPS, INFO = "metrics", "skips", "info"
REPLY_RECORDS = (ARRAYS, METRICS, SKIPS, INFO)
# keys of the instruction's config (beside the run's settings)
SHARD, SERVER_ROUND, IDS = "shard", "server-round", "ids"
FINGERPRINT, BASE_FINGERPRINT, RUN_KEY = "fingerprint", "base-fingerprint", "run-key"
PROXIMAL_MU = "proximal-mu"  # FedProx's key in the aggregator's train config
# keys of a reply's info and skips records
LOCAL_STEP = "local-step"
INFO_KEYS = (SHARD, LOCAL_STEP, FINGERPRINT)
SKIP_IDS, SKIP_COUNTS = "ids", "counts"
# a packed instruction's config: its shards, in order; a packed reply's failed shard: the reason
SHARDS, ERROR, REASON = "shards", "error", "reason"
SKIP_KEYS = (SKIP_IDS, SKIP_COUNTS)
NUM_EXAMPLES = "num-examples"  # what FedAvg weights by
TRAIN_SECONDS = "train-seconds"


@dataclass(frozen=True)
class ReplyMetric:
    """One scalar in a reply's MetricRecord.

    Parameters
    ----------
    key : str
        The MetricRecord key; its column in ``shards.csv`` (and ``rounds.csv``) has ``_`` for ``-``.
    source : str | None (default: None)
        The attribute of the shard's training result that the ClientApp sends; None for the
        values the ClientApp measures itself (``num-examples``, ``train-seconds``).
    integer : bool (default: False)
        Whether the value must be an integer.
    low, high : float (default: 0, infinity)
        The closed range a valid value lies in.
    per_round : bool (default: False)
        Whether ``rounds.csv`` has it too, as the example-weighted mean over the round's shards
        (``reduce = "mean"``) or the largest value so far over all shards (``"max"``).
    setting : str (default: "")
        A boolean setting (kebab-case) without which the reply does not carry this metric; "": always.
    reduce : str (default: "mean")
        How ``rounds.csv`` combines the shards' values: "mean" or "max" (over all rounds so far).
    """

    key: str
    source: str | None = None
    integer: bool = False
    low: float = 0.0
    high: float = math.inf
    per_round: bool = False
    setting: str = ""
    reduce: str = "mean"

    @property
    def column(self) -> str:
        return self.key.replace("-", "_")

    def kind_error(self, value: object) -> str | None:
        """Why ``value`` is not a finite number of this metric's kind, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {self.key} must be a number, got {type(value).__name__}"
        if self.integer and not isinstance(value, int):
            return f"metric {self.key} must be an integer, got {value!r}"
        if not math.isfinite(value):
            return f"metric {self.key} must be finite, got {value}"
        return None

    def range_error(self, value: float) -> str | None:
        """Why the number ``value`` lies outside this metric's range, or None."""
        if self.low <= value <= self.high:
            return None
        span = f">= {self.low:g}" if self.high == math.inf else f"in [{self.low:g}, {self.high:g}]"
        return f"metric {self.key} must be {span}, got {value}"


REPLY_METRICS: tuple[ReplyMetric, ...] = (
    ReplyMetric(NUM_EXAMPLES, integer=True),  # and equal to the number of ids sent
    ReplyMetric("train-loss", "mean_loss", per_round=True),
    ReplyMetric("skip-rate", "skip_rate", high=1.0, per_round=True),
    ReplyMetric("aug-rate", "aug_rate", high=1.0, per_round=True),
    ReplyMetric("steps", "steps", integer=True, low=1.0),
    ReplyMetric(TRAIN_SECONDS),
    # DP-SGD: the epsilon a shard has spent (Opacus' accountant); the run's is the largest shard's
    ReplyMetric("dp-epsilon", "epsilon", per_round=True, setting="dp-sgd", reduce="max"),
)


def reply_metrics(config: Mapping[str, Any] | None = None) -> tuple[ReplyMetric, ...]:
    """The reply metrics of a run with settings ``config`` (kebab-case; None: those every run has),
    read when called (so a test or an extension can add one here)."""
    on = config or {}
    return tuple(m for m in REPLY_METRICS if not m.setting or on.get(m.setting) is True)


@dataclass(frozen=True)
class Instruction:
    """A train instruction as the shard reads it."""

    shard: int
    server_round: int
    ids: np.ndarray  # int64: the sample ids to train on
    config: ConfigRecord  # the whole config: the run's settings and the fields below
    arrays: ArrayRecord
    fingerprint: str
    base_fingerprint: str
    run_key: str
    proximal_mu: float


def train_message(
    arrays: ArrayRecord, config: Mapping[str, Any], shard: int, server_round: int, ids, node: int
) -> Message:
    """The train message for one shard, addressed to ``node`` (the server's side)."""
    cfg = ConfigRecord(dict(config))
    cfg[SERVER_ROUND], cfg[SHARD], cfg[IDS] = server_round, shard, np.asarray(ids, dtype=np.int64).tolist()
    return Message(content=RecordDict({ARRAYS: arrays, CONFIG: cfg}), dst_node_id=node, message_type=MessageType.TRAIN)


def shard_key(shard: int, record: str) -> str:
    """The name of one shard's ``record`` in a packed instruction or reply ("shard-3.arrays")."""
    return f"shard-{shard}.{record}"


def packed_train_message(
    arrays: ArrayRecord,
    config: Mapping[str, Any],
    shards: Sequence[tuple[int, Any]],
    server_round: int,
    node: int,
) -> Message:
    """One train message for several ``(shard, ids)`` of ``node``: the arrays and the settings
    once, each shard's ids in its own record (the server's side)."""
    cfg = ConfigRecord(dict(config))
    cfg[SERVER_ROUND], cfg[SHARDS] = server_round, [int(s) for s, _ in shards]
    records: dict[str, Any] = {ARRAYS: arrays, CONFIG: cfg}
    for shard, ids in shards:
        records[shard_key(shard, IDS)] = ConfigRecord({IDS: np.asarray(ids, dtype=np.int64).tolist()})
    return Message(content=RecordDict(records), dst_node_id=node, message_type=MessageType.TRAIN)


def is_packed(content: RecordDict) -> bool:
    """Whether a train instruction carries several shards (``packed_train_message``)."""
    return SHARDS in content[CONFIG]


def instruction_shards(msg: Message) -> list[int]:
    """The shards a train message (sent by the server) is for, in order."""
    cfg = msg.content[CONFIG]
    return [int(s) for s in cfg[SHARDS]] if SHARDS in cfg else [int(cfg[SHARD])]


def instruction_shard(msg: Message) -> int:
    """The shard a single-shard train message (sent by the server) is for."""
    return int(msg.content[CONFIG][SHARD])


def split_instruction(content: RecordDict) -> list[RecordDict]:
    """A train instruction's single-shard contents, in order: a packed one's shards each with the
    shared arrays and a config equal to the one a message of its own would carry."""
    if not is_packed(content):
        return [content]
    common = {k: v for k, v in content[CONFIG].items() if k != SHARDS}
    parts = []
    for shard in content[CONFIG][SHARDS]:
        cfg = ConfigRecord(dict(common))
        cfg[SHARD], cfg[IDS] = int(shard), list(content[shard_key(int(shard), IDS)][IDS])
        parts.append(RecordDict({ARRAYS: content[ARRAYS], CONFIG: cfg}))
    return parts


def read_instruction(msg: Message | RecordDict) -> Instruction:
    """A single-shard train instruction (a message or its content; the shard's side; the settings
    are checked by the caller)."""
    content = msg.content if isinstance(msg, Message) else msg
    cfg = content[CONFIG]
    return Instruction(
        shard=int(cfg[SHARD]),
        server_round=int(cfg[SERVER_ROUND]),
        ids=np.asarray(cfg[IDS], dtype=np.int64),
        config=cfg,
        arrays=content[ARRAYS],
        fingerprint=str(cfg[FINGERPRINT]),
        base_fingerprint=str(cfg.get(BASE_FINGERPRINT, "")),
        run_key=str(cfg[RUN_KEY]),
        proximal_mu=float(cfg.get(PROXIMAL_MU, 0.0)),
    )


def pack_reply(
    msg: Message,
    arrays: Mapping[str, torch.Tensor],
    metrics: Mapping[str, int | float],
    counts: torch.Tensor,
    *,
    local_step: int,
    fingerprint: str,
) -> Message:
    """The reply to the single-shard instruction ``msg``: the trained ``arrays``, one value per
    reply metric, the skip ``counts`` aligned with the instruction's ids, and what the node confirms."""
    content = reply_content(
        msg.content[CONFIG], arrays, metrics, counts, local_step=local_step, fingerprint=fingerprint
    )
    return Message(content=content, reply_to=msg)


def reply_content(
    cfg: Mapping[str, Any],
    arrays: Mapping[str, torch.Tensor],
    metrics: Mapping[str, int | float],
    counts: torch.Tensor,
    *,
    local_step: int,
    fingerprint: str,
) -> RecordDict:
    """The reply records to a single-shard instruction whose config is ``cfg``: see ``pack_reply``."""
    expected = [m.key for m in reply_metrics(cfg)]
    if sorted(metrics) != sorted(expected):
        raise ValueError(f"reply metrics must be {', '.join(expected)}, got {', '.join(metrics)}")
    ids = torch.from_numpy(np.asarray(cfg[IDS], dtype=np.int64))
    return RecordDict(
        {
            ARRAYS: ArrayRecord(dict(arrays)),
            METRICS: MetricRecord({key: metrics[key] for key in expected}),
            SKIPS: ArrayRecord({SKIP_IDS: ids, SKIP_COUNTS: counts}),
            INFO: ConfigRecord({SHARD: int(cfg[SHARD]), LOCAL_STEP: local_step, FINGERPRINT: fingerprint}),
        }
    )


def pack_replies(msg: Message, results: Sequence[tuple[int, RecordDict | str]]) -> Message:
    """The reply to the packed instruction ``msg``: per ``(shard, result)`` its reply records
    (``reply_content``), or the reason it failed (a string)."""
    records: dict[str, Any] = {}
    for shard, result in results:
        if isinstance(result, str):
            records[shard_key(shard, ERROR)] = ConfigRecord({REASON: result})
        else:
            records.update({shard_key(shard, key): record for key, record in result.items()})
    return Message(content=RecordDict(records), reply_to=msg)


def split_reply(content: RecordDict, shards: Sequence[int]) -> dict[int, RecordDict | str]:
    """A packed reply's content per shard sent: its records (as a single-shard reply's content,
    still to be checked), or why there are none (the node's reason, or a missing result). Raises
    ValueError, naming them, for records that belong to no shard sent."""
    names = {shard_key(s, key): (s, key) for s in shards for key in (*REPLY_RECORDS, ERROR)}
    if extra := sorted(k for k in content.keys() if k not in names):
        raise ValueError(f"records for no shard of the message: {', '.join(extra[:5])}")
    out: dict[int, RecordDict | str] = {}
    for shard in shards:
        error = content.get(shard_key(shard, ERROR))
        found = {key: content[shard_key(shard, key)] for key in REPLY_RECORDS if shard_key(shard, key) in content}
        if error is not None:
            reason = error.get(REASON) if isinstance(error, ConfigRecord) else None
            out[shard] = f"error reply: {reason}" if isinstance(reason, str) else "error reply without a reason string"
            if found:
                out[shard] += " (and it carries results as well)"
        elif not found:
            out[shard] = "no result for it in the node's reply"
        else:
            out[shard] = RecordDict(found)
    return out
