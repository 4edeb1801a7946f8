import torch

from clients.config import TrainConfig
from clients.state import ShardStateStore
from clients.trainer import ShardState, train_shard
from ddpm.data import load_dataset
from ddpm.unet import build_unet
from fl_app.settings import Settings

CPU = torch.device("cpu")


def _setup(**kw):
    data = load_dataset("digits", train_size=60)
    settings = TrainConfig(local_epochs=2, batch_size=16, warmup_epochs=1, **kw)
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


def test_shard_state_round_trips_through_the_node_store(tmp_path):
    images, settings, model = _setup()
    state = ShardState()
    train_shard(model, images, settings, state, device=CPU, seed=0)
    store = ShardStateStore(tmp_path)
    store.save("run", 3, 1, state)
    back, loaded = store.load("run", 3, before_round=2)
    assert loaded == 1
    assert back.step == state.step and torch.equal(back.bank, state.bank)
    assert back.optimizer.keys() == state.optimizer.keys()
    for i, entry in state.optimizer.items():
        assert all(torch.equal(entry[k], back.optimizer[i][k]) for k in entry)
    fresh, loaded = store.load("run", 0, before_round=2)
    assert loaded is None
    assert fresh.optimizer is None and fresh.step == 0 and not fresh.bank.any()


class _Echo(torch.nn.Module):
    """A stand-in model predicting the noisy input itself: the loss then depends on x0."""

    def forward(self, x, t):
        return type("Out", (), {"sample": x})()


def test_eq8_loss_on_a_tiny_batch():
    from clients.agc import RatioSkip
    from clients.trainer import agc_taa_loss
    from ddpm.schedule import train_scheduler

    sched = train_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 2, 2, generator=g)
    t = torch.tensor([10, 500, 999, 3])
    plain = (sched.add_noise(x0, noise, t) - noise).pow(2).flatten(1).mean(1)
    # bank so that ratios are: sample 0 -> 0.2 (skip), 1 -> 0.6 (augment), 2 -> 3.0 (plain), 3 -> bank 0 (plain)
    bank = torch.zeros(1000)
    bank[10], bank[500], bank[999] = plain[0] / 0.2, plain[1] / 0.6, plain[2] / 3.0
    settings = TrainConfig(skip_threshold=0.5, aug_range=1.7)
    invert = lambda images, rho: 1 - images  # noqa: E731 - a deterministic augmentation for the check
    out = agc_taa_loss(_Echo(), sched, x0, t, noise, bank, RatioSkip(0.5), invert, settings)
    x_aug = -x0[1:2]  # 1 - (x+1)/2 mapped back to [-1, 1]
    aug_loss = (sched.add_noise(x_aug, noise[1:2], t[1:2]) - noise[1:2]).pow(2).mean()
    expect = (aug_loss + plain[2] + plain[3]) / 3
    assert out.skip.tolist() == [True, False, False, False]
    assert out.aug.tolist() == [False, True, False, False]
    torch.testing.assert_close(out.loss, expect)
    torch.testing.assert_close(out.losses, plain)


def test_the_app_settings_give_the_trainers_config_and_its_defaults_are_the_settings():
    from fl_app.config import train_config

    assert train_config(Settings()) == TrainConfig()  # one set of defaults: the CPU preset's
    got = train_config(Settings(lr=0.02, taa=False, local_epochs=3))
    assert (got.lr, got.taa, got.local_epochs) == (0.02, False, 3)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_local_steps_replace_epochs_and_equal_them_when_they_match():
    """local-steps = E x steps-per-epoch trains exactly as E epochs; other counts cut the last epoch."""
    images, config, model = _setup(taa=False)
    per_epoch = 40 // 16
    a, b, c = (build_unet("tiny", 8, 1) for _ in range(3))
    for m in (a, b, c):
        m.load_state_dict(model.state_dict())
    ra = train_shard(a, images, config, ShardState(), device=CPU, seed=3)
    steps = TrainConfig(**{**config.__dict__, "local_steps": config.local_epochs * per_epoch})
    rb = train_shard(b, images, steps, ShardState(), device=CPU, seed=3)
    assert _same(a, b) and ra.mean_loss == rb.mean_loss and ra.steps == rb.steps == 4
    state = ShardState()
    five = TrainConfig(**{**config.__dict__, "local_steps": 5})
    rc = train_shard(c, images, five, state, device=CPU, seed=3)
    assert rc.steps == 5 == state.step and rc.samples_seen == 5 * 16
    assert int(rc.skip_counts.sum()) == round(rc.skip_rate * rc.samples_seen)


def test_warmup_steps_and_adamw_reach_the_optimizer():
    """warmup-steps sets the linear warm-up in steps (lr * min(s, w) / w); adamw is torch's AdamW
    with the given weight decay; the defaults stay torch's Adam without decay."""
    from clients.trainer import make_optimizer, warmup_schedule, warmup_steps

    images, config, model = _setup(taa=False, agc=False)
    params = list(model.parameters())
    assert type(make_optimizer(params, config)) is torch.optim.Adam
    assert make_optimizer(params, config).defaults["weight_decay"] == 0
    w = TrainConfig(optimizer="adamw", weight_decay=0.01, warmup_steps=4, lr=0.1)
    opt = make_optimizer(params, w)
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.01
    assert warmup_steps(w, 7) == 4 and warmup_steps(config, 7) == 7  # warmup-epochs 1 x 7 steps
    schedule = warmup_schedule(opt, warmup_steps(w, 7), 2)  # resumed after 2 steps
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == [0.1 * 2 / 4, 0.1 * 3 / 4, 0.1, 0.1]
    state = ShardState()
    train_shard(
        model,
        images,
        TrainConfig(**{**config.__dict__, "optimizer": "adamw", "weight_decay": 0.5}),
        state,
        device=CPU,
        seed=0,
    )
    assert state.step == 4 and state.optimizer  # AdamW's moments are kept like Adam's


def test_local_steps_are_refused_with_dp_sgd_naming_both_keys():
    import pytest

    with pytest.raises(ValueError, match="local-steps.*dp-sgd|dp-sgd.*local-steps"):
        Settings(dp_sgd=True, dp_noise_multiplier=1.0, agc=False, taa=False, local_steps=10).validate()
