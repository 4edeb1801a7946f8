"""Malformed replies: none raises out of the strategy, each is dropped with its reason (or, where
harmless, accepted), the shards stay an exact partition, and nobody answers for another's shard."""

import io
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from test_strategy import FP, _round, _strategy, push, reply

from strategies.msr import check_partition

pytestmark = pytest.mark.usefixtures("flower_task")

IDS = 4  # shard 0 holds ids 0..3, shard 1 ids 4..7


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _lying_array(declared_dtype="float32", declared_shape=(2, 2), data=None, stype="numpy.ndarray"):
    data = _npy(np.zeros((2, 2), np.float32)) if data is None else data
    return Array(dtype=declared_dtype, shape=declared_shape, stype=stype, data=data)


def _metrics(**changes):
    values = {"num-examples": IDS, "train-loss": 1.0, "skip-rate": 0.1, "aug-rate": 0.2, "steps": 3}
    values["train-seconds"] = 0.5
    values.update(changes)
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def _skips(ids=None, counts=None):
    ids = torch.arange(IDS) if ids is None else ids
    counts = torch.zeros(IDS, dtype=torch.int64) if counts is None else counts
    return ArrayRecord({"ids": ids, "counts": counts})


def _without(record_key):
    def make(msg):
        r = reply(msg)
        del r.content[record_key]
        return r

    return make


def _with(**records):
    return lambda msg: reply(msg, **records)


def _error(msg):
    return Message(Error(code=1, reason="ClientApp crashed"), reply_to=msg)


def _extra_record(msg):
    r = reply(msg)
    r.content["extra"] = ConfigRecord({"x": 1})
    return r


# (name, make the bad reply to shard 0's message, reason expected in the log; None = accepted)
CASES = [
    ("error reply", _error, "error reply: ClientApp crashed"),
    ("no arrays", _without("arrays"), "missing arrays"),
    ("no metrics", _without("metrics"), "missing metrics"),
    ("no skips", _without("skips"), "missing skips"),
    ("no info", _without("info"), "missing info"),
    ("extra record", _extra_record, "unexpected extra"),
    ("metrics as config", _with(metrics=ConfigRecord({"num-examples": IDS})), "'metrics' must be a MetricRecord"),
    ("arrays as metrics", _with(arrays=MetricRecord({"w": 1.0})), "'arrays' must be a ArrayRecord"),
    ("skips as config", _with(skips=ConfigRecord({"ids": [0]})), "'skips' must be a ArrayRecord"),
    ("info as metrics", _with(info=MetricRecord({"shard": 0})), "'info' must be a ConfigRecord"),
    ("metric missing", _with(metrics=_metrics(**{"train-loss": None})), "missing train-loss"),
    ("metric extra", _with(metrics=_metrics(foo=1.0)), "unexpected foo"),
    ("num-examples float", _with(metrics=_metrics(**{"num-examples": 4.0})), "num-examples must be an integer"),
    ("num-examples wrong", _with(metrics=_metrics(**{"num-examples": 400})), "num-examples 400"),
    ("num-examples negative", _with(metrics=_metrics(**{"num-examples": -4})), "num-examples -4"),
    ("steps zero", _with(metrics=_metrics(steps=0)), "steps must be >= 1"),
    ("loss nan", _with(metrics=_metrics(**{"train-loss": float("nan")})), "train-loss must be finite"),
    ("loss inf", _with(metrics=_metrics(**{"train-loss": float("inf")})), "train-loss must be finite"),
    ("loss negative", _with(metrics=_metrics(**{"train-loss": -1.0})), "train-loss must be >= 0"),
    ("skip-rate > 1", _with(metrics=_metrics(**{"skip-rate": 1.5})), "skip-rate must be in [0, 1]"),
    ("aug-rate < 0", _with(metrics=_metrics(**{"aug-rate": -0.1})), "aug-rate must be in [0, 1]"),
    ("seconds nan", _with(metrics=_metrics(**{"train-seconds": float("nan")})), "train-seconds must be finite"),
    ("metric list", _with(metrics=_metrics(**{"train-loss": [1.0, 2.0]})), "train-loss must be a number"),
    ("info no local-step", _with(info=ConfigRecord({"shard": 0, "fingerprint": FP})), "missing local-step"),
    ("info no fingerprint", _with(info=ConfigRecord({"shard": 0, "local-step": 3})), "missing fingerprint"),
    (
        "info other data set",
        _with(info=ConfigRecord({"shard": 0, "local-step": 3, "fingerprint": "8-ffffffff"})),
        "confirms data set '8-ffffffff', the server's is '8-0123abcd'",
    ),
    ("info extra", _with(info=ConfigRecord({"shard": 0, "local-step": 3, "fingerprint": FP, "x": 1})), "unexpected x"),
    (
        "info claims shard 1",
        _with(info=ConfigRecord({"shard": 1, "local-step": 3, "fingerprint": FP})),
        "claims shard 1",
    ),
    (
        "info shard string",
        _with(info=ConfigRecord({"shard": "0", "local-step": 3, "fingerprint": FP})),
        "claims shard '0'",
    ),
    (
        "local-step negative",
        _with(info=ConfigRecord({"shard": 0, "local-step": -1, "fingerprint": FP})),
        "local-step must be",
    ),
    (
        "local-step float",
        _with(info=ConfigRecord({"shard": 0, "local-step": 3.0, "fingerprint": FP})),
        "local-step must be",
    ),
    ("weights key missing", _with(arrays=ArrayRecord({"v": torch.zeros(2, 2)})), "missing w"),
    ("weights key extra", _with(arrays=ArrayRecord({"w": torch.zeros(2, 2), "v": torch.zeros(1)})), "unexpected v"),
    ("weights shape", _with(arrays=ArrayRecord({"w": torch.zeros(4)})), "global model's is float32 (2, 2)"),
    ("weights float64", _with(arrays=ArrayRecord({"w": torch.zeros(2, 2, dtype=torch.float64)})), "is float64"),
    ("weights int32", _with(arrays=ArrayRecord({"w": torch.zeros(2, 2, dtype=torch.int32)})), "is int32"),
    ("weights nan", _with(arrays=ArrayRecord({"w": torch.full((2, 2), float("nan"))})), "NaN or infinity"),
    ("weights inf", _with(arrays=ArrayRecord({"w": torch.full((2, 2), float("inf"))})), "NaN or infinity"),
    (
        "weights dtype lies",
        _with(arrays=ArrayRecord({"w": _lying_array(data=_npy(np.zeros((2, 2), np.float64)))})),
        "holds float64",
    ),
    (
        "weights size lies",
        _with(arrays=ArrayRecord({"w": _lying_array(data=_npy(np.zeros((3, 3), np.float32)))})),
        "holds float32 (3, 3)",
    ),
    ("weights garbage", _with(arrays=ArrayRecord({"w": _lying_array(data=b"\x00garbage")})), "cannot be read"),
    (
        "weights truncated",
        _with(arrays=ArrayRecord({"w": _lying_array(data=_npy(np.zeros((2, 2), np.float32))[:-5])})),
        "cannot be read",
    ),
    ("weights other stype", _with(arrays=ArrayRecord({"w": _lying_array(stype="torch.pickle")})), "cannot be read"),
    ("weights empty", _with(arrays=ArrayRecord()), "missing w"),
    ("skips no counts", _with(skips=ArrayRecord({"ids": torch.arange(IDS)})), "missing counts"),
    (
        "skips extra",
        _with(skips=ArrayRecord({"ids": torch.arange(IDS), "counts": torch.zeros(4), "x": torch.zeros(1)})),
        "unexpected x",
    ),  # noqa: E501
    ("skips other ids", _with(skips=_skips(ids=torch.arange(4, 8))), "other ids"),
    ("skips ids float", _with(skips=_skips(ids=torch.arange(IDS).double())), "ids must be integers"),
    ("skips counts float", _with(skips=_skips(counts=torch.zeros(IDS))), "counts must be integers"),
    ("skips counts negative", _with(skips=_skips(counts=torch.tensor([0, -1, 0, 0]))), "must be in [0, 10]"),
    ("skips counts too big", _with(skips=_skips(counts=torch.tensor([0, 11, 0, 0]))), "must be in [0, 10]"),
    (
        "skips counts uint64 wrap",
        _with(
            skips=ArrayRecord(
                {"ids": Array(np.arange(IDS)), "counts": Array(np.array([0, 2**64 - 1, 0, 0], np.uint64))}
            )
        ),
        "must be in [0, 10]",
    ),
    ("skips counts short", _with(skips=_skips(counts=torch.zeros(3, dtype=torch.int64))), "shape (3,)"),
    ("skips counts 2-D", _with(skips=_skips(counts=torch.zeros(2, 2, dtype=torch.int64))), "shape (2, 2)"),
    ("skips counts bool", _with(skips=_skips(counts=torch.zeros(IDS, dtype=torch.bool))), "counts must be integers"),
    ("skips counts int32 (harmless)", _with(skips=_skips(counts=torch.ones(IDS, dtype=torch.int32))), None),
    ("skips ids int32 (harmless)", _with(skips=_skips(ids=torch.arange(IDS, dtype=torch.int32))), None),
]


@pytest.mark.parametrize(("name", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_malformed_reply_is_dropped_with_its_reason(name, make, reason, caplog):
    s = _strategy([range(0, 4), range(4, 8)], 8)
    msgs = _round(s, 1, [1, 2])
    good = reply(msgs[1], 2.0, [5, 4, 0, 0])
    bad = make(msgs[0])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = s.aggregate_train(1, [bad, good])
    check_partition(s.shards, 8)
    if reason is None:  # accepted: both averaged
        assert s.log[1].dropped == [] and sorted(s.log[1].shard_metrics) == [0, 1]
        return
    assert [(shard, why) for shard, _, why in s.log[1].dropped] == [(0, s.log[1].dropped[0][2])]
    assert reason in s.log[1].dropped[0][2], s.log[1].dropped[0][2]
    assert reason in caplog.text
    assert np.allclose(arrays["w"].numpy(), 2.0)  # only the good reply is averaged
    assert s.log[1].metrics["dropped"] == 1 and s.log[1].metrics["replies"] == 1
    # shard 0 keeps its samples and, its round failed, receives none (MSR holds shard 1's moves)
    assert [x.tolist() for x in s.shards] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_an_impersonating_reply_never_replaces_the_real_one():
    s = _strategy([range(0, 4), range(4, 8)], 8)
    msgs = _round(s, 1, [1, 2])  # shard 0 -> node 1, shard 1 -> node 2
    forged = reply(msgs[0], 99.0)  # node 2 answers the message sent to node 1
    forged.metadata.__dict__["_src_node_id"] = 2
    own = reply(
        msgs[1], 99.0, info=ConfigRecord({"shard": 0, "local-step": 3, "fingerprint": FP})
    )  # node 2 claims shard 0
    real = [reply(msgs[0], 1.0), reply(msgs[1], 3.0)]
    arrays, _ = s.aggregate_train(1, [forged, own, *real])
    reasons = [why for _, _, why in s.log[1].dropped]
    assert any("came from node 2" in r for r in reasons) and any("claims shard 0" in r for r in reasons)
    assert sorted(s.log[1].shard_metrics) == [0, 1] and s.log[1].shard_metrics[0]["node"] == 1
    assert np.allclose(arrays["w"].numpy(), 2.0)  # (1 * 4 + 3 * 4) / 8: the forgeries weigh nothing


def test_second_reply_late_reply_and_unknown_reply_are_dropped():
    s = _strategy([range(0, 4), range(4, 8)], 8)
    old = _round(s, 1, [1, 2])
    s.aggregate_train(1, [reply(old[0]), reply(old[1])])
    msgs = _round(s, 2, [1, 2])
    stranger = Message(RecordDict({"config": msgs[0].content["config"]}), dst_node_id=1, message_type="train")
    push([stranger])
    replies = [reply(msgs[0], 1.0), reply(msgs[0], 5.0), reply(old[1], 7.0), reply(stranger), reply(msgs[1], 1.0)]
    arrays, _ = s.aggregate_train(2, replies)
    reasons = [why for _, _, why in s.log[2].dropped]
    assert sum("second reply" in r for r in reasons) == 1 and sum("answers no message" in r for r in reasons) == 2
    assert np.allclose(arrays["w"].numpy(), 1.0)
    check_partition(s.shards, 8)


def test_each_node_confirmation_of_the_data_set_is_logged_once(caplog):
    s = _strategy([range(0, 4), range(4, 8)], 8)
    with caplog.at_level(logging.INFO, logger="flwr"):
        for server_round in (1, 2):
            msgs = _round(s, server_round, [1, 2])
            s.aggregate_train(server_round, [reply(m) for m in msgs])
    lines = [r.getMessage() for r in caplog.records if "confirmed data set" in r.getMessage()]
    assert sorted(lines) == [f"node 1 confirmed data set {FP}", f"node 2 confirmed data set {FP}"]


RAY_REASON = """<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)
  File "fl_app/client_app.py", line 34, in train
    raise ValueError(
ValueError: data set mismatch on node 7: the server's copy has fingerprint a, this node's has b

The above exception was the direct cause of the following exception:

  File "flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException:
Exception ClientAppException occurred. Message: data set mismatch on node 7'>"""


def test_an_error_reply_is_dropped_with_the_line_that_says_what_went_wrong():
    from strategies.replies import error_summary

    assert (
        error_summary(RAY_REASON)
        == "ValueError: data set mismatch on node 7: the server's copy has fingerprint a, this node's has b"
    )
    assert error_summary("ClientApp crashed") == "ClientApp crashed"  # one line: as it is
    assert error_summary("Node Unavailable\n  while waiting") == "Node Unavailable while waiting"  # no exception line
