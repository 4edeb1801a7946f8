"""The message contract (strategies.protocol) is the one place a reply metric is defined: one
added there is sent by the ClientApp, checked by the strategy and recorded in the run folder."""

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from test_client_app import SETTINGS, _context, _message
from test_strategy import FP, FakeGrid, _strategy, reply

from ddpm.data import load_dataset
from fl_app.client_app import app
from fl_app.recorder import RunRecorder
from fl_app.run_folder import RunWriter
from strategies import protocol
from strategies.replies import BadReply, Sent, check_train_reply

pytestmark = pytest.mark.usefixtures("flower_task")

SEEN = protocol.ReplyMetric("samples-seen", "samples_seen", integer=True, low=1.0, per_round=True)


@pytest.fixture
def with_seen(monkeypatch):
    """The protocol with one more reply metric: the samples a shard drew (TrainResult.samples_seen)."""
    monkeypatch.setattr(protocol, "REPLY_METRICS", (*protocol.REPLY_METRICS, SEEN))


def test_an_added_metric_is_sent_and_checked(with_seen, tmp_path):
    ids = np.arange(0, 60, 2)
    msg = _message(ids.tolist())
    out = app(msg, _context(tmp_path))
    per_epoch = ids.size // SETTINGS.batch_size * SETTINGS.batch_size  # full batches only (drop_last)
    assert out.content["metrics"]["samples-seen"] == per_epoch * SETTINGS.local_epochs
    data = load_dataset(**SETTINGS.dataset_kwargs())
    sent = Sent(shard=1, node=out.metadata.src_node_id, ids=ids, max_count=1, fingerprint=data.fingerprint)
    expected = {k: (a.dtype, tuple(a.shape)) for k, a in msg.content["arrays"].items()}
    assert check_train_reply(out, sent, expected).metrics["samples-seen"] == per_epoch * SETTINGS.local_epochs
    bad = dict(out.content["metrics"])
    for value, reason in ((0, "samples-seen must be >= 1, got 0"), (3.5, "samples-seen must be an integer")):
        out.content["metrics"] = MetricRecord({**bad, "samples-seen": value})
        with pytest.raises(BadReply, match=reason):
            check_train_reply(out, sent, expected)
    del bad["samples-seen"]
    out.content["metrics"] = MetricRecord(bad)
    with pytest.raises(BadReply, match="missing samples-seen"):
        check_train_reply(out, sent, expected)


def test_an_added_metric_is_recorded_per_shard_and_per_round(with_seen, tmp_path):
    writer = RunWriter(tmp_path, SETTINGS)
    recorder = RunRecorder(writer, run_key="r", fingerprint=FP, num_rounds=2)
    s = _strategy([[0, 1, 2], [3, 4, 5]], 6, recorder=recorder)
    seen = {1: 3, 2: 4}  # node 1 reports 3 samples seen, node 2 four: weighted by num-examples (3 each)

    def answer(m):
        r = reply(m, 1.0)
        metrics = dict(r.content["metrics"]) | {"samples-seen": seen[m.metadata.dst_node_id]}
        r.content["metrics"] = MetricRecord(metrics)
        return r

    s.start(FakeGrid([1, 2], answer), ArrayRecord({"w": torch.zeros(2, 2)}), num_rounds=2, timeout=5)
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert rounds.columns[:5].tolist() == ["round", "train_loss", "skip_rate", "aug_rate", "samples_seen"]
    assert rounds["samples_seen"].tolist() == [3.5, 3.5]
    shards = pd.read_csv(tmp_path / "shards.csv")
    assert shards.columns[-1] == "samples_seen" and sorted(shards["samples_seen"]) == [3, 3, 4, 4]
    assert (tmp_path / "dropped.csv").read_text().strip() == "round,shard,node,reason"


def test_the_default_contract_keeps_the_run_folder_columns():
    """The columns of runs made before the protocol module existed (resume reads them back)."""
    from fl_app.run_folder import round_columns, shard_columns

    assert round_columns() == ["round", "train_loss", "skip_rate", "aug_rate", "moved", "replies", "dropped"] + [
        "timed_out",
        "seconds",
    ]
    assert shard_columns() == [
        "node",
        "local_step",
        "num_examples",
        "train_loss",
        "skip_rate",
        "aug_rate",
        "steps",
        "train_seconds",
    ]
