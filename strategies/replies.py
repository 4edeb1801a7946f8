"""Checking a shard's train reply before anything reads it.

A reply is trusted for nothing but what it must carry: which shard it answers comes from the
message it replies to (the server's own record), never from its content. Every record, key,
type, dtype, shape, byte size and value is checked; a reply that fails any check is dropped with
a one-line reason, and its shard keeps its samples. A packed reply (several shards of one node)
is split into per-shard contents that go through the same checks: a bad shard result drops that
shard only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from .protocol import (
    ARRAYS,
    FINGERPRINT,
    INFO,
    INFO_KEYS,
    LOCAL_STEP,
    METRICS,
    NUM_EXAMPLES,
    REPLY_RECORDS,
    SHARD,
    SKIP_COUNTS,
    SKIP_IDS,
    SKIP_KEYS,
    SKIPS,
    ReplyMetric,
    reply_metrics,
    split_reply,
)

EXCEPTION_LINE = re.compile(r"[\w.]*\w(Error|Exception|Exit|Interrupt): \S")  # "ValueError: what went wrong"
INT64_MAX = np.iinfo(np.int64).max


def record_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of a weights record as Flower serialises it (each Array a ``.npy`` buffer): what one
    message carries for ``state`` (tensors or arrays), server to node or back."""
    return sum(len(Array(np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)).data) for v in state.values())


class BadReply(ValueError):
    """A reply that cannot be used; the message is the reason recorded for it."""


@dataclass(frozen=True)
class Sent:
    """What the server sent for one shard: the trusted side of a reply's check."""

    shard: int
    node: int
    ids: np.ndarray  # int64, sorted: the samples the shard trained on
    max_count: int  # a sample's skip count can be at most this (one visit per local epoch)
    fingerprint: str = ""  # the data set the server sent with the shard; the node must confirm it
    metrics: tuple[ReplyMetric, ...] | None = None  # the run's reply metrics (None: reply_metrics())


@dataclass(frozen=True)
class ShardReply:
    """A checked reply: its weights and scalar metrics (what FedAvg reads) and its skip counts."""

    shard: int
    node: int
    arrays: ArrayRecord
    metrics: MetricRecord
    counts: np.ndarray  # int64, aligned with Sent.ids
    local_step: int
    message: Message
    fingerprint: str = ""  # the data set the node confirmed (equal to the one sent)


def _exact_keys(record, expected: tuple[str, ...], what: str) -> None:
    keys = set(record.keys())
    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or extra:
        raise BadReply(
            f"{what} keys must be {', '.join(expected)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(map(str, extra))}" if extra else "")
        )


def array_values(array: object, name: str) -> np.ndarray:
    """Deserialise one Array, refusing one whose declared dtype, shape or byte size lies."""
    if not isinstance(array, Array):
        raise BadReply(f"{name} is a {type(array).__name__}, not an Array")
    try:
        values = array.numpy()
    except Exception as err:  # noqa: BLE001 - any failure to decode is a bad reply, named
        raise BadReply(f"{name} cannot be read: {type(err).__name__}: {err}") from None
    if str(values.dtype) != array.dtype or tuple(values.shape) != tuple(array.shape):
        raise BadReply(
            f"{name} declares {array.dtype} {tuple(array.shape)} but holds {values.dtype} {tuple(values.shape)}"
        )
    return values


def error_summary(reason: str) -> str:
    """The exception line of an error reply's reason: Flower's simulation sends a whole (Ray) traceback,
    one line per frame, where the log and dropped.csv want the one line that says what went wrong."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]
    return raised[-1] if len(lines) > 1 and raised else " ".join(lines)


def check_train_reply(msg: Message, sent: Sent, expected_arrays: dict[str, tuple[str, tuple[int, ...]]]) -> ShardReply:
    """The checked content of ``msg``, the reply to ``sent``; raises ``BadReply`` with the reason.

    ``expected_arrays`` maps each weight's key to the global model's (dtype, shape). The records
    are those of ``strategies.protocol``, each checked by its own function below.
    """
    check_envelope(msg, sent)
    return check_reply_content(msg.content, sent, expected_arrays, msg)


def check_envelope(msg: Message, sent: Sent) -> None:
    """An error reply, or one from another node than the message went to, is refused whole."""
    if msg.has_error():
        raise BadReply(f"error reply: {error_summary(msg.error.reason)}")
    if msg.metadata.src_node_id != sent.node:
        raise BadReply(
            f"came from node {msg.metadata.src_node_id}, but shard {sent.shard} was sent to node {sent.node}"
        )


def check_packed_reply(
    msg: Message, sent: Sequence[Sent], expected_arrays: dict[str, tuple[str, tuple[int, ...]]]
) -> dict[int, ShardReply | BadReply]:
    """Per shard of a packed instruction (``sent``, one node's): its checked reply, or why it is
    dropped. An error reply, another node's, or records for shards not sent drop every shard;
    anything wrong with one shard's records drops that shard only."""
    try:
        check_envelope(msg, sent[0])
        parts = split_reply(msg.content, [s.shard for s in sent])
    except (BadReply, ValueError) as err:
        bad = err if isinstance(err, BadReply) else BadReply(str(err))
        return {s.shard: bad for s in sent}
    out: dict[int, ShardReply | BadReply] = {}
    for target in sent:
        part = parts[target.shard]
        try:
            if isinstance(part, str):
                raise BadReply(part)
            out[target.shard] = check_reply_content(part, target, expected_arrays, msg)
        except BadReply as err:
            out[target.shard] = err
    return out


def check_reply_content(
    content: RecordDict, sent: Sent, expected_arrays: dict[str, tuple[str, tuple[int, ...]]], msg: Message
) -> ShardReply:
    """One shard's reply records, checked against what was sent; ``msg`` is the reply they came in."""
    _exact_keys(content, REPLY_RECORDS, "reply record")
    records = {k: content[k] for k in REPLY_RECORDS}
    for key, kind in ((ARRAYS, ArrayRecord), (METRICS, MetricRecord), (SKIPS, ArrayRecord), (INFO, ConfigRecord)):
        if not isinstance(records[key], kind):
            raise BadReply(f"'{key}' must be a {kind.__name__}, got {type(records[key]).__name__}")
    local_step = check_info(records[INFO], sent)
    check_metrics(records[METRICS], sent)
    check_weights(records[ARRAYS], expected_arrays)
    counts = check_skips(records[SKIPS], sent)
    return ShardReply(
        sent.shard, sent.node, records[ARRAYS], records[METRICS], counts, local_step, msg, sent.fingerprint
    )


def check_info(info: ConfigRecord, sent: Sent) -> int:
    """The node's confirmation: the shard it answers, its data set; returns its local step."""
    _exact_keys(info, INFO_KEYS, "info")
    claimed, local_step = info[SHARD], info[LOCAL_STEP]
    if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed != sent.shard:
        raise BadReply(f"claims shard {claimed!r} but answers the message for shard {sent.shard}")
    if isinstance(local_step, bool) or not isinstance(local_step, int) or local_step < 0:
        raise BadReply(f"info local-step must be a non-negative integer, got {local_step!r}")
    if info[FINGERPRINT] != sent.fingerprint:  # the node checks before training; a reply must agree
        raise BadReply(f"confirms data set {info[FINGERPRINT]!r}, the server's is {sent.fingerprint!r}")
    return local_step


def check_metrics(metrics: MetricRecord, sent: Sent) -> None:
    """Exactly the protocol's reply metrics, each a number of its kind in its range."""
    specs = reply_metrics() if sent.metrics is None else sent.metrics
    _exact_keys(metrics, tuple(m.key for m in specs), "metric")
    for spec in specs:  # kind and finiteness first, for every metric
        if (why := spec.kind_error(metrics[spec.key])) is not None:
            raise BadReply(why)
    if metrics[NUM_EXAMPLES] != sent.ids.size:
        raise BadReply(f"num-examples {metrics[NUM_EXAMPLES]} != the {sent.ids.size} samples sent")
    for spec in specs:
        if (why := spec.range_error(metrics[spec.key])) is not None:
            raise BadReply(why)


def check_weights(weights: ArrayRecord, expected_arrays: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The global model's keys, dtypes and shapes, every value finite."""
    _exact_keys(weights, tuple(expected_arrays), "weight")
    for key, (dtype, shape) in expected_arrays.items():
        array = weights[key]
        if not isinstance(array, Array):
            raise BadReply(f"weight {key} is a {type(array).__name__}, not an Array")
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise BadReply(f"weight {key} is {array.dtype} {tuple(array.shape)}, the global model's is {dtype} {shape}")
        if not np.isfinite(array_values(array, f"weight {key}")).all():
            raise BadReply(f"weight {key} holds NaN or infinity")


def check_skips(skips: ArrayRecord, sent: Sent) -> np.ndarray:
    """Integer skip counts for exactly the ids sent, each in [0, one per local epoch]; as int64."""
    _exact_keys(skips, SKIP_KEYS, "skips")
    ids = array_values(skips[SKIP_IDS], "skips ids")
    counts = array_values(skips[SKIP_COUNTS], "skips counts")
    for name, arr in (("ids", ids), ("counts", counts)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise BadReply(f"skips {name} must be integers, got {arr.dtype}")
        if arr.shape != sent.ids.shape:
            raise BadReply(f"skips {name} has shape {arr.shape} for the {sent.ids.size} samples sent")
    if _wraps_int64(ids) or not np.array_equal(ids.astype(np.int64), sent.ids):
        raise BadReply("skip counts are for other ids than the ones sent")
    if _wraps_int64(counts) or (counts.size and (counts.min() < 0 or counts.max() > sent.max_count)):
        raise BadReply(f"skip counts must be in [0, {sent.max_count}] (one visit per local epoch)")
    return counts.astype(np.int64)


def _wraps_int64(arr: np.ndarray) -> bool:
    """True for unsigned values that would wrap when read as int64."""
    return arr.dtype.kind == "u" and arr.size > 0 and int(arr.max()) > INT64_MAX


def update_norms(sent: Mapping[str, np.ndarray], replies: list[ArrayRecord]) -> np.ndarray:
    """||w_k - w|| per reply over every array it returns (float64: finite but enormous weights
    give a large norm, not an overflow)."""
    norms = np.zeros(len(replies))
    for key, before in sent.items():
        base = np.asarray(before, dtype=np.float64)
        for k, record in enumerate(replies):
            diff = record[key].numpy().astype(np.float64) - base
            norms[k] += float(np.dot(diff.ravel(), diff.ravel()))
    return np.sqrt(norms)


def outlier_updates(norms: np.ndarray, max_ratio: float) -> dict[int, str]:
    """Replies whose update norm is more than ``max_ratio`` times the median of the other replies'
    (index -> reason); nothing with one reply, when the others did not move, or ``max_ratio`` inf."""
    out: dict[int, str] = {}
    if len(norms) < 2 or not np.isfinite(max_ratio):
        return out
    for k, norm in enumerate(norms):
        others = float(np.median(np.delete(norms, k)))
        if others > 0 and norm > max_ratio * others:
            out[k] = (
                f"its update's norm {norm:.3g} is {norm / others:.3g}x the median of the other replies' "
                f"({others:.3g}), above max-update-ratio {max_ratio:g}"
            )
    return out
