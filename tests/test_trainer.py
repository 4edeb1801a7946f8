import torch
from flwr.app import RecordDict

from clients.state import load_shard_state, save_shard_state
from clients.trainer import ShardState, train_shard
from ddpm.data import load_dataset
from ddpm.settings import Settings
from ddpm.unet import build_unet

CPU = torch.device("cpu")


def _setup(**kw):
    data = load_dataset("digits", train_size=60)
    settings = Settings(train_size=60, local_epochs=2, batch_size=16, warmup_epochs=1, **kw)
    torch.manual_seed(0)
    return data.images[:40], settings, build_unet("tiny", 8, 1)


def test_training_is_repeatable_and_counts_are_aligned():
    images, settings, model = _setup()
    a, b = build_unet("tiny", 8, 1), build_unet("tiny", 8, 1)
    a.load_state_dict(model.state_dict())
    b.load_state_dict(model.state_dict())
    sa, sb = ShardState(), ShardState()
    for rnd in range(2):
        ra = train_shard(a, images, settings, sa, device=CPU, seed=rnd)
        rb = train_shard(b, images, settings, sb, device=CPU, seed=rnd)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert ra.mean_loss == rb.mean_loss and torch.equal(ra.skip_counts, rb.skip_counts)
    assert ra.skip_counts.shape == (40,) and ra.skip_counts.dtype == torch.int64
    assert int(ra.skip_counts.sum()) == round(ra.skip_rate * ra.samples_seen)
    assert sa.step == 2 * 2 * (40 // 16) and (sa.bank > 0).any()


def test_agc_off_never_skips_and_taa_off_never_augments():
    images, settings, model = _setup(agc=False, taa=False)
    state = ShardState()
    for rnd in range(2):
        r = train_shard(model, images, settings, state, device=CPU, seed=rnd)
    assert r.skip_rate == 0 and r.aug_rate == 0 and int(r.skip_counts.sum()) == 0
    assert (state.bank > 0).any()  # the bank is kept even with AGC off


def test_a_custom_rule_that_skips_everything_leaves_weights_unchanged():
    images, settings, model = _setup(taa=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = train_shard(model, images, settings, ShardState(), device=CPU, seed=0, skip_rule=lambda ratio: ratio > -1)
    assert r.skip_rate == 1.0
    assert int(r.skip_counts.sum()) == r.samples_seen  # every drawn sample was counted once per draw
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_taa_augments_once_the_bank_is_filled():
    images, settings, model = _setup(aug_range=float("inf"), agc=False)
    state = ShardState(bank=torch.full((1000,), 1e-3))  # every ratio >> lambda: all in range when R = inf
    r = train_shard(model, images, settings, state, device=CPU, seed=0)
    assert r.aug_rate > 0.9


def test_shard_state_round_trips_through_records():
    images, settings, model = _setup()
    state = ShardState()
    train_shard(model, images, settings, state, device=CPU, seed=0)
    records = RecordDict()
    save_shard_state(records, 3, state)
    back = load_shard_state(records, 3)
    assert back.step == state.step and torch.equal(back.bank, state.bank)
    assert back.optimizer.keys() == state.optimizer.keys()
    for i, entry in state.optimizer.items():
        assert all(torch.equal(entry[k], back.optimizer[i][k]) for k in entry)
    fresh = load_shard_state(records, 0)
    assert fresh.optimizer is None and fresh.step == 0 and not fresh.bank.any()
