"""The ClientApp called directly with a train message, as a SuperNode would."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from ddpm.data import load_dataset
from ddpm.settings import Settings
from ddpm.unet import build_unet
from fl_app.client_app import app

pytestmark = pytest.mark.usefixtures("flower_task")


SETTINGS = Settings(train_size=60, local_epochs=1, batch_size=16, num_shards=2)


def _message(ids, fingerprint=None, server_round=1, shard=1):
    data = load_dataset(**SETTINGS.dataset_kwargs())
    torch.manual_seed(0)
    cfg = ConfigRecord(
        {
            **SETTINGS.to_run_config(),
            "fingerprint": fingerprint or data.fingerprint,
            "ids": list(ids),
            "shard": shard,
            "server-round": server_round,
        }
    )
    weights = ArrayRecord(build_unet("tiny", 8, 1).state_dict())
    return Message(RecordDict({"arrays": weights, "config": cfg}), dst_node_id=0, message_type=MessageType.TRAIN)


def _context():
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def test_train_reply_and_state_kept_per_shard():
    ctx = _context()
    reply = app(_message(range(0, 60, 2)), ctx)
    c = reply.content
    assert c["metrics"]["num-examples"] == 30 and c["info"]["shard"] == 1
    assert np.array_equal(c["skips"]["ids"].numpy(), np.arange(0, 60, 2))
    assert c["skips"]["counts"].numpy().shape == (30,)
    assert "shard-1.arrays" in ctx.state and ctx.state["shard-1.meta"]["step"] == 1
    app(_message(range(0, 60, 2), server_round=2), ctx)
    assert ctx.state["shard-1.meta"]["step"] == 2  # warm-up position carried over


def test_node_with_another_copy_of_the_data_refuses():
    with pytest.raises(ValueError, match="data set mismatch.*refusing"):
        app(_message(range(10), fingerprint="60-0000000000000000"), _context())


def test_ids_outside_the_data_set_are_refused():
    with pytest.raises(ValueError, match="ids outside"):
        app(_message([0, 5, 600]), _context())
