"""Checking a shard's train reply before anything reads it.

A reply is trusted for nothing but what it must carry: which shard it answers comes from the
message it replies to (the server's own record), never from its content. Every record, key,
type, dtype, shape, byte size and value is checked; a reply that fails any check is dropped with
a one-line reason, and its shard keeps its samples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

REPLY_RECORDS = ("arrays", "metrics", "skips", "info")
METRIC_KEYS = ("num-examples", "train-loss", "skip-rate", "aug-rate", "steps", "train-seconds")
INFO_KEYS = ("shard", "local-step", "fingerprint")
EXCEPTION_LINE = re.compile(r"[\w.]*\w(Error|Exception|Exit|Interrupt): \S")  # "ValueError: what went wrong"
SKIP_KEYS = ("ids", "counts")
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


def _number(value: object, key: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadReply(f"metric {key} must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise BadReply(f"metric {key} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise BadReply(f"metric {key} must be finite, got {value}")
    return value


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

    ``expected_arrays`` maps each weight's key to the global model's (dtype, shape).
    """
    if msg.has_error():
        raise BadReply(f"error reply: {error_summary(msg.error.reason)}")
    if msg.metadata.src_node_id != sent.node:
        raise BadReply(
            f"came from node {msg.metadata.src_node_id}, but shard {sent.shard} was sent to node {sent.node}"
        )
    content = msg.content
    _exact_keys(content, REPLY_RECORDS, "reply record")
    records = {k: content[k] for k in REPLY_RECORDS}
    for key, kind in (("arrays", ArrayRecord), ("metrics", MetricRecord), ("skips", ArrayRecord)):
        if not isinstance(records[key], kind):
            raise BadReply(f"'{key}' must be a {kind.__name__}, got {type(records[key]).__name__}")
    info = records["info"]
    if not isinstance(info, ConfigRecord):
        raise BadReply(f"'info' must be a ConfigRecord, got {type(info).__name__}")

    _exact_keys(info, INFO_KEYS, "info")
    claimed, local_step = info["shard"], info["local-step"]
    if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed != sent.shard:
        raise BadReply(f"claims shard {claimed!r} but answers the message for shard {sent.shard}")
    if isinstance(local_step, bool) or not isinstance(local_step, int) or local_step < 0:
        raise BadReply(f"info local-step must be a non-negative integer, got {local_step!r}")
    if info["fingerprint"] != sent.fingerprint:  # the node checks before training; a reply must agree
        raise BadReply(f"confirms data set {info['fingerprint']!r}, the server's is {sent.fingerprint!r}")

    metrics = records["metrics"]
    _exact_keys(metrics, METRIC_KEYS, "metric")
    values = {k: _number(metrics[k], k, integer=k in ("num-examples", "steps")) for k in METRIC_KEYS}
    if values["num-examples"] != sent.ids.size:
        raise BadReply(f"num-examples {values['num-examples']} != the {sent.ids.size} samples sent")
    if values["steps"] < 1:
        raise BadReply(f"metric steps must be >= 1, got {values['steps']}")
    for key in ("skip-rate", "aug-rate"):
        if not 0.0 <= values[key] <= 1.0:
            raise BadReply(f"metric {key} must be in [0, 1], got {values[key]}")
    for key in ("train-loss", "train-seconds"):
        if values[key] < 0:
            raise BadReply(f"metric {key} must be >= 0, got {values[key]}")

    weights = records["arrays"]
    _exact_keys(weights, tuple(expected_arrays), "weight")
    for key, (dtype, shape) in expected_arrays.items():
        array = weights[key]
        if not isinstance(array, Array):
            raise BadReply(f"weight {key} is a {type(array).__name__}, not an Array")
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise BadReply(f"weight {key} is {array.dtype} {tuple(array.shape)}, the global model's is {dtype} {shape}")
        if not np.isfinite(array_values(array, f"weight {key}")).all():
            raise BadReply(f"weight {key} holds NaN or infinity")

    skips = records["skips"]
    _exact_keys(skips, SKIP_KEYS, "skips")
    ids = array_values(skips["ids"], "skips ids")
    counts = array_values(skips["counts"], "skips counts")
    for name, arr in (("ids", ids), ("counts", counts)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise BadReply(f"skips {name} must be integers, got {arr.dtype}")
        if arr.shape != sent.ids.shape:
            raise BadReply(f"skips {name} has shape {arr.shape} for the {sent.ids.size} samples sent")
    if _wraps_int64(ids) or not np.array_equal(ids.astype(np.int64), sent.ids):
        raise BadReply("skip counts are for other ids than the ones sent")
    if _wraps_int64(counts) or (counts.size and (counts.min() < 0 or counts.max() > sent.max_count)):
        raise BadReply(f"skip counts must be in [0, {sent.max_count}] (one visit per local epoch)")
    return ShardReply(
        sent.shard, sent.node, weights, metrics, counts.astype(np.int64), local_step, msg, sent.fingerprint
    )


def _wraps_int64(arr: np.ndarray) -> bool:
    """True for unsigned values that would wrap when read as int64."""
    return arr.dtype.kind == "u" and arr.size > 0 and int(arr.max()) > INT64_MAX
