"""The ClientApp called directly with a train message, as a SuperNode would."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.state import ShardStateStore
from ddpm.data import load_dataset
from ddpm.unet import build_unet
from fl_app.client_app import app
from fl_app.settings import Settings

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
            "run-key": "run-a",
        }
    )
    weights = ArrayRecord(build_unet("tiny", 8, 1).state_dict())
    return Message(RecordDict({"arrays": weights, "config": cfg}), dst_node_id=0, message_type=MessageType.TRAIN)


def _context(state_dir=""):
    return Context(run_id=1, node_id=0, node_config={"state-dir": str(state_dir)}, state=RecordDict(), run_config={})


def test_train_reply_and_state_kept_per_shard_on_disk(tmp_path):
    ctx = _context(tmp_path)
    reply = app(_message(range(0, 60, 2)), ctx)
    c = reply.content
    assert c["metrics"]["num-examples"] == 30 and c["info"]["shard"] == 1
    assert np.array_equal(c["skips"]["ids"].numpy(), np.arange(0, 60, 2))
    assert c["skips"]["counts"].numpy().shape == (30,)
    store = ShardStateStore(tmp_path)
    state, loaded = store.load("run-a", 1, before_round=2)
    assert loaded == 1 and state.step == 1 and state.optimizer
    again = app(_message(range(0, 60, 2), server_round=2), _context(tmp_path))  # a fresh process: same disk
    assert again.content["info"]["local-step"] == 2  # warm-up position carried over
    # a round redone after a crash starts from the state before it, not from its own first try
    redo = app(_message(range(0, 60, 2), server_round=2), _context(tmp_path))
    assert redo.content["info"]["local-step"] == 2
    assert np.array_equal(redo.content["skips"]["counts"].numpy(), again.content["skips"]["counts"].numpy())
    assert sorted(p.name for p in (tmp_path / "run-a" / "shard-1").iterdir()) == [
        "round-000001.safetensors",
        "round-000002.safetensors",
    ]


def test_state_store_round_trips_exactly(tmp_path):
    from clients.trainer import ShardState

    state = ShardState(
        optimizer={0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 2), "exp_avg_sq": torch.rand(3, 2)}},
        step=7,
        bank=torch.rand(1000),
    )
    store = ShardStateStore(tmp_path)
    for r in (1, 2, 3):
        store.save("k", 0, r, state)
    back, loaded = store.load("k", 0, before_round=4)
    assert loaded == 3 and back.step == 7 and torch.equal(back.bank, state.bank)
    assert all(torch.equal(back.optimizer[0][k], v) for k, v in state.optimizer[0].items())
    assert store.load("k", 0, before_round=1)[1] is None  # nothing before round 1: a fresh state
    assert len(list((tmp_path / "k" / "shard-0").iterdir())) == 2  # the newest two are kept


def test_node_with_another_copy_of_the_data_refuses(tmp_path):
    with pytest.raises(ValueError, match="data set mismatch.*refusing"):
        app(_message(range(10), fingerprint="60-0000000000000000"), _context(tmp_path))


def test_ids_outside_the_data_set_are_refused(tmp_path):
    with pytest.raises(ValueError, match="ids outside"):
        app(_message([0, 5, 600]), _context(tmp_path))


def test_the_node_adds_each_images_fixed_noise_from_the_seed_and_its_id(tmp_path, monkeypatch):
    """input-noise-fixed: the ClientApp hands train_shard the noise of exactly the shard's ids."""
    from clients import trainer
    from clients.input_noise import fixed_input_noise
    from fl_app import client_app

    got = []

    def spy(*args, **kwargs):
        got.append(kwargs["input_noise"])
        return trainer.train_shard(*args, **kwargs)

    monkeypatch.setattr(client_app, "train_shard", spy)
    msg = _message([4, 9, 2, 30])
    msg.content["config"]["input-noise-variance"] = 0.1
    msg.content["config"]["input-noise-fixed"] = True
    app(msg, _context(tmp_path))
    assert torch.equal(got[0], fixed_input_noise([4, 9, 2, 30], (1, 8, 8), SETTINGS.seed))
    app(_message([4, 9]), _context(tmp_path / "b"))  # the default: no fixed noise
    assert got[1] is None


# ---- the node's door: --node-config, its device, its saved shard states -------------------------
BAD_NODE_CONFIGS = [
    ({"state-dir": 5}, "state-dir"),
    ({"state-dir": "relative/state"}, "state-dir"),
    ({"state-dir": "~nosuchuser_iet/state"}, "state-dir"),
    ({"state-dir": "/tmp/a\0b"}, "state-dir"),
    ({"data-cache": 5}, "data-cache"),
    ({"data-cache": "cache"}, "data-cache"),
    ({"data-cache": "OFF"}, "data-cache"),
    ({"data-cache": True}, "data-cache"),
    ({"device": 5}, "device"),
    ({"device": "gpu0"}, "device"),
    ({"device": "cuda:999"}, "device"),  # well-formed, but not on this machine
    ({"data-root": 5}, "data-root"),
    ({"init-from": 3}, "init-from"),
    ({"statedir": "/tmp/x"}, "statedir"),  # a typo is refused, not ignored
    ({"lr": 0.5}, "lr"),  # a run-config key a node may not change
]


@pytest.mark.parametrize(("node_config", "key"), BAD_NODE_CONFIGS, ids=[k for _, k in BAD_NODE_CONFIGS])
def test_bad_node_config_values_are_refused_naming_the_key(tmp_path, node_config, key):
    config = {"state-dir": str(tmp_path), **node_config}
    ctx = Context(run_id=1, node_id=0, node_config=config, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=f"^{key}: "):
        app(_message(range(0, 60, 2)), ctx)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_good_node_config_values_and_flowers_own_keys_are_taken(tmp_path):
    from fl_app.config import read_node_config

    node = read_node_config(
        {"state-dir": "~/s", "data-cache": "off", "device": "cpu", "partition-id": 0, "num-partitions": 2}
    )
    assert node.state_dir == "~/s" and node.data_cache == "off" and node.overrides == {"device": "cpu"}
    assert read_node_config(None) == read_node_config({})


def test_an_unwritable_state_dir_is_refused_before_training(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ValueError, match="^state-dir: cannot write shard states"):
        app(_message(range(0, 60, 2)), _context(blocked / "state"))


def test_a_saved_state_that_cannot_train_the_model_is_set_aside_and_the_shard_restarts(tmp_path, caplog):
    from clients.trainer import ShardState

    store = ShardStateStore(tmp_path)
    app(_message(range(0, 60, 2)), _context(tmp_path))  # round 1: a good state
    good, _ = store.load("run-a", 1, before_round=2)
    bad = ShardState(optimizer=good.optimizer, step=good.step, bank=torch.zeros(7))  # a bank of another length
    store.save("run-a", 1, 2, bad)
    with caplog.at_level("WARNING"):
        reply = app(_message(range(0, 60, 2), server_round=3), _context(tmp_path))
    assert reply.content["info"]["local-step"] == 2  # went on from round 1's good state
    assert "memory bank has shape (7,)" in caplog.text and "set aside" in caplog.text
    names = sorted(p.name for p in (tmp_path / "run-a" / "shard-1").iterdir())
    assert "round-000002.safetensors.bad" in names


def test_state_problems_are_named(tmp_path):
    from clients.state import state_problem
    from clients.trainer import ShardState

    params = [torch.zeros(2, 3), torch.zeros(4)]
    moments = {0: {"exp_avg": torch.zeros(2, 3), "exp_avg_sq": torch.zeros(2, 3), "step": torch.tensor(3.0)}}
    assert state_problem(ShardState(optimizer=moments), params) is None
    assert "tensor 0 has shape (3, 2)" in state_problem(
        ShardState(optimizer={0: {"exp_avg": torch.zeros(3, 2)}}), params
    )
    assert "tensor 5" in state_problem(ShardState(optimizer={5: {"exp_avg": torch.zeros(4)}}), params)
    assert "non-finite" in state_problem(ShardState(bank=torch.full((1000,), float("nan"))), params)
    assert "step is -1" in state_problem(ShardState(step=-1), params)
    nan = {1: {"exp_avg_sq": torch.tensor([0.0, float("inf"), 0.0, 0.0])}}
    assert "non-finite" in state_problem(ShardState(optimizer=nan), params)


def _packed(shards, server_round=1):
    """One message for several ``(shard, ids)``, as the strategy packs a node's shards."""
    from strategies.protocol import CONFIG, IDS, SHARD, packed_train_message

    one = _message(shards[0][1], server_round=server_round, shard=shards[0][0]).content
    common = {k: v for k, v in one[CONFIG].items() if k not in (SHARD, IDS, "server-round")}
    return packed_train_message(one["arrays"], common, shards, server_round, node=0)


def _records(content, prefix=""):
    """A reply's records as plain values (train-seconds aside: a clock, not a result)."""
    out = {}
    for name in ("arrays", "metrics", "skips", "info"):
        record = content[prefix + name]
        for k, v in record.items():
            if k != "train-seconds":
                out[(name, k)] = v.numpy().tobytes() if hasattr(v, "numpy") else v
    return out


def _state_file(path):
    """A saved shard state's tensors (as bytes) and metadata (safetensors orders the latter freely)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_shards_packed_in_one_message_train_as_if_each_came_alone(tmp_path):
    """Bitwise: weights, metrics, skip counts and each shard's state file, over two rounds (the
    second reads the first's state); a shard that fails in a packed message fails alone."""
    from strategies.protocol import shard_key, split_reply

    shards = [(0, list(range(0, 60, 2))), (1, list(range(1, 60, 2)))]
    first = {}
    for server_round in (1, 2):
        alone = {
            s: app(_message(ids, server_round=server_round, shard=s), _context(tmp_path / "a")) for s, ids in shards
        }
        first = first or alone
        packed = app(_packed(shards, server_round), _context(tmp_path / "b"))
        parts = split_reply(packed.content, [0, 1])
        for s, _ in shards:
            assert _records(parts[s]) == _records(alone[s].content), (server_round, s)
    for s, _ in shards:
        for r in (1, 2):
            name = f"run-a/shard-{s}/round-{r:06d}.safetensors"
            assert _state_file(tmp_path / "a" / name) == _state_file(tmp_path / "b" / name), name
    mixed = app(_packed([(0, list(range(0, 60, 2))), (1, [0, 5, 600])]), _context(tmp_path / "c"))
    parts = split_reply(mixed.content, [0, 1])
    assert parts[1].startswith("error reply: ValueError: shard 1: ids outside 0..")
    assert shard_key(1, "arrays") not in mixed.content
    assert _records(parts[0]) == _records(first[0].content)  # the other shard trained as it would alone
