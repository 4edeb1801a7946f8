"""DP-SGD through Opacus: the step is Opacus' clipped, noised mean; the epsilon is its accountant's;
the accountant and the optimizer survive rounds and a resume; unsound combinations are refused."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from clients.config import PrivacyConfig, TrainConfig
from clients.dp_sgd import PrivateTraining, noise_multiplier_for, poisson_plan
from clients.state import ShardStateStore, dump_accountant, load_accountant
from clients.trainer import ShardState, plain_loss, train_shard
from ddpm.family import PIXEL_DDPM
from ddpm.unet import build_unet
from fl_app.config import settings_from_run_config, train_config

CPU = torch.device("cpu")
DP = {"dp-sgd": True, "agc": False, "taa": False, "msr": "none", "dp-noise-multiplier": 1.0}


def _batch(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=g)
    noise = torch.randn(b, 1, 8, 8, generator=g)
    return x0, t, noise


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_unet("tiny", 8, 1)


def _private(model, n, batch, sigma, clip):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return PrivateTraining(
        model, opt, n, batch, PrivacyConfig(sigma, max_grad_norm=clip, accountant="rdp"), sigma, None
    )


def _dp_gradient(x0, t, noise, sigma: float, clip: float, model=None) -> list[torch.Tensor]:
    """The gradient Opacus' DPOptimizer applies for one logical batch of exactly (x0, t, noise)."""
    model = model or _model()
    private = _private(model, x0.shape[0], x0.shape[0], sigma, clip)  # one batch per epoch: rate 1
    sched = PIXEL_DDPM.train_scheduler()
    loss = PIXEL_DDPM.per_sample_loss(private.model, sched, x0, t, noise, None).mean()
    loss.backward()
    private.optimizer.pre_step()  # clip, sum, noise, scale: what step() applies (without the update)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    private.model._close()
    return grads


def test_with_no_noise_and_no_clipping_a_dp_step_is_the_plain_step():
    x0, t, noise = _batch()
    dp = _dp_gradient(x0, t, noise, sigma=0.0, clip=1e12)
    model = _model()
    plain_loss(model, PIXEL_DDPM.train_scheduler(), x0, t, noise).backward()
    for a, p in zip(dp, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_each_per_sample_gradient_is_clipped_to_c_before_the_mean():
    """Opacus' update = sum_i g_i * min(1, C / ||g_i||) / B, the g_i computed one sample at a time here."""
    x0, t, noise = _batch(b=3, seed=1)
    clip = 0.05
    clipped, norms = [], []
    for i in range(3):
        model = _model()
        plain_loss(model, PIXEL_DDPM.train_scheduler(), x0[i : i + 1], t[i : i + 1], noise[i : i + 1]).backward()
        g = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        norms.append(float(norm))
        clipped.append([x * min(1.0, clip / (float(norm) + 1e-6)) for x in g])
    assert min(norms) > clip  # the clip bites for every sample
    for c in clipped:
        assert float(torch.sqrt(sum((x**2).sum() for x in c))) <= clip * (1 + 1e-5)
    expected = [sum(parts) / 3 for parts in zip(*clipped, strict=True)]
    dp = _dp_gradient(x0, t, noise, sigma=0.0, clip=clip)
    for a, e in zip(dp, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-8)


def test_the_noise_has_std_sigma_c_over_the_expected_batch():
    x0, t, noise = _batch(b=4)
    torch.manual_seed(3)
    quiet = _dp_gradient(x0, t, noise, sigma=0.0, clip=0.01)
    noisy = _dp_gradient(x0, t, noise, sigma=2.0, clip=0.01)
    diff = torch.cat([(a - b).flatten() for a, b in zip(noisy, quiet, strict=True)])
    assert diff.numel() > 100_000
    assert abs(float(diff.std()) / (2.0 * 0.01 / 4) - 1) < 0.01
    assert abs(float(diff.mean())) < 1e-4


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _config(**privacy) -> TrainConfig:
    spec = {"noise_multiplier": 1.0, "accountant": "rdp", **privacy}
    return TrainConfig(local_epochs=2, batch_size=8, agc=False, taa=False, privacy=PrivacyConfig(**spec))


def test_the_epsilon_reported_is_opacus_accountant_for_the_recorded_steps():
    state = ShardState()
    config = _config()
    first = train_shard(_model(), _images(24), config, state, device=CPU, seed=1)
    second = train_shard(_model(), _images(24), config, state, device=CPU, seed=2)
    rate, per_round = poisson_plan(24, 8, 2)
    assert (rate, per_round) == (1 / 3, 6)
    assert first.steps == second.steps == 6 and state.step == 12
    assert state.accountant == {"history": [(1.0, 1 / 3, 12)], "mechanism": "rdp"}
    acc = RDPAccountant()
    acc.history = [(1.0, 1 / 3, 6)]
    assert first.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    acc.history = [(1.0, 1 / 3, 12)]
    assert second.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert second.epsilon > first.epsilon
    assert second.skip_rate == 0 and second.aug_rate == 0 and int(second.skip_counts.sum()) == 0


def test_a_shard_not_a_multiple_of_the_batch_is_accounted_as_planned():
    """28 images in batches of 8: 3 batches an epoch (drop_last, as the plain trainer), rate 1/3."""
    state = ShardState()
    result = train_shard(_model(), _images(28), _config(), state, device=CPU, seed=5)
    assert poisson_plan(28, 8, 2) == (1 / 3, 6)
    assert result.steps == state.step == 6
    assert state.accountant["history"] == [(1.0, 1 / 3, 6)]


def test_a_target_epsilon_is_spent_by_the_last_round_and_not_exceeded():
    state, config = ShardState(), _config(noise_multiplier=0.0, target_epsilon=8.0, rounds=2)
    for r in (1, 2):
        result = train_shard(_model(), _images(24), config, state, device=CPU, seed=r)
    sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=1 / 3, steps=12, accountant="rdp")
    assert state.accountant["history"] == [(sigma, 1 / 3, 12)]
    assert 8.0 - 0.02 <= result.epsilon <= 8.0


def test_an_empty_poisson_batch_still_takes_a_noisy_counted_step():
    for sigma, moves in ((0.0, False), (1.0, True)):
        model = _model()
        before = copy.deepcopy(model.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        private = PrivateTraining(model, opt, 8, 8, PrivacyConfig(sigma, accountant="rdp"), sigma, None)
        config = TrainConfig(batch_size=8, agc=False, taa=False, privacy=PrivacyConfig(sigma))
        from clients.trainer import _Loop

        rules = (None, None, PIXEL_DDPM)
        loop = _Loop(
            model, list(model.parameters()), config, ShardState(), rules, torch.zeros(8, 1, 8, 8), None, 1, 0.0
        )
        loop.model, loop.optimizer, loop.private = private.model, private.optimizer, private
        assert loop.step(torch.zeros(0, dtype=torch.long))
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert changed == moves and loop.state.step == 1
        assert private.engine.accountant.history == [(sigma, 1.0, 1)]
        private.model._close()


def test_physical_batches_split_a_poisson_batch_but_step_once_per_logical_batch(monkeypatch):
    from clients import trainer

    sizes, real = [], trainer._Loop.step
    monkeypatch.setattr(trainer._Loop, "step", lambda self, pos: sizes.append(pos.numel()) or real(self, pos))
    state = ShardState()
    result = train_shard(_model(), _images(32), _config(max_physical_batch=3), state, device=CPU, seed=4)
    assert max(sizes) <= 3 and len(sizes) > result.steps  # parts of batches ran
    assert result.steps == state.step == 8 and state.accountant["history"] == [(1.0, 1 / 4, 8)]
    assert result.samples_seen == sum(s for s in sizes)  # no empty batch here: every part held images


def test_the_accountant_survives_the_state_file_and_a_damaged_one_is_refused(tmp_path):
    store = ShardStateStore(tmp_path)
    state = ShardState(step=7, accountant={"history": [(1.1, 0.25, 7)], "mechanism": "prv"})
    path = store.save("run", 0, 3, state)
    loaded, r = store.load("run", 0, 4)
    assert r == 3 and loaded.accountant == state.accountant and loaded.step == 7
    assert load_accountant(dump_accountant(None)) is None
    for bad in ('{"mechanism": "xyz", "history": []}', '{"mechanism": "rdp", "history": [[1, 2, 3]]}', "nonsense"):
        with pytest.raises((ValueError, KeyError)):
            load_accountant(bad)
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata={"step": "7", "round": "3", "accountant": '{"mechanism": "rdp"}'})
    with pytest.raises(ValueError, match="dp-sgd: shard state .*round-000003"):
        store.load("run", 0, 4)


def test_the_settings_make_the_shards_privacy_config():
    settings = settings_from_run_config({**DP, "dp-accountant": "rdp", "dp-max-physical-batch": 4, "num-rounds": 3})
    config = train_config(settings)
    assert config.privacy == PrivacyConfig(1.0, 0.0, 1e-5, 1.0, "rdp", 4, 3)
    assert train_config(settings_from_run_config({})).privacy is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agc": True}, "agc: not with dp-sgd"),
        ({"taa": True}, "taa: not with dp-sgd"),
        ({"msr": "memory"}, "msr: not with dp-sgd"),
        ({"aggregation": "fedprox"}, "aggregation: not with dp-sgd"),
        ({"dp-noise-multiplier": 0.0}, "dp-noise-multiplier: with dp-sgd, set exactly one"),
        ({"dp-target-epsilon": 5.0}, "dp-noise-multiplier: with dp-sgd, set exactly one"),
        ({"dp-noise-multiplier": 0.0, "dp-target-epsilon": 1e-9, "dp-accountant": "rdp"}, "dp-target-epsilon: 1e-09"),
    ],
)
def test_unsound_or_unreachable_dp_settings_stop_before_training(change, message):
    with pytest.raises(ValueError, match=message):
        settings_from_run_config({**DP, **change})


def test_the_trainer_refuses_rules_the_accountant_does_not_cover():
    with pytest.raises(ValueError, match="dp-sgd: AGC and TAA"):
        train_shard(
            _model(), _images(8), TrainConfig(agc=True, privacy=PrivacyConfig(1.0)), ShardState(), device=CPU, seed=0
        )
    with pytest.raises(ValueError, match="dp-sgd: FedProx"):
        train_shard(_model(), _images(8), _config(), ShardState(), device=CPU, seed=0, proximal_mu=0.1)


def test_an_unreachable_target_names_the_key_and_the_plan():
    config = PrivacyConfig(0.0, target_epsilon=1e-9, accountant="rdp")  # at rate 1 RDP is closed form: fast
    with pytest.raises(
        ValueError, match=r"dp-target-epsilon: 1e-09 .* cannot be reached in 100 steps at sample rate 1 "
    ):
        noise_multiplier_for(config, 1.0, 100)


# ---- end to end: the federation, its tables, and a resume ---------------------------------------


def _simulate(config: dict) -> Path:
    from fl_app.simulation import run_in_process

    run_in_process(config)
    return sorted(Path(config["out-dir"]).iterdir())[-1]


DP_RUN = {
    **DP,
    "train-size": 48,
    "num-shards": 2,
    "num-rounds": 3,
    "local-epochs": 1,
    "batch-size": 8,
    "eval-every": 0,
    "eval-num-images": 16,
    "sample-steps": 2,
    "mq-neighbours": 4,
    "fid": False,
    "dp-accountant": "rdp",
}


def test_a_dp_run_records_epsilon_and_resumes_exactly(tmp_path, monkeypatch):
    """rounds.csv's dp_epsilon is the largest shard's so far, equal to Opacus' accountant; a run
    stopped after round 2 and resumed ends with the uninterrupted run's weights and epsilon."""
    whole = _simulate({**DP_RUN, "out-dir": str(tmp_path / "whole")})
    rounds, shards = pd.read_csv(whole / "rounds.csv"), pd.read_csv(whole / "shards.csv")
    acc = RDPAccountant()
    for r in (1, 2, 3):
        acc.history = [(1.0, 1 / 3, 3 * r)]  # shards of 24 images, batch 8: rate 1/3, 3 steps a round
        assert rounds.loc[r - 1, "dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        assert shards[shards["round"] == r]["dp_epsilon"].max() == rounds.loc[r - 1, "dp_epsilon"]
    report = (whole / "report.md").read_text()
    assert f"epsilon {rounds['dp_epsilon'].iloc[-1]:.2f}" in report

    from fl_app import recorder

    real = recorder.RunRecorder.round_done

    def stop_after_2(self, rlog, *args, **kwargs):
        real(self, rlog, *args, **kwargs)
        if rlog.server_round == 2:
            raise KeyboardInterrupt("stopped after round 2")

    monkeypatch.setattr(recorder.RunRecorder, "round_done", stop_after_2)
    part = tmp_path / "part"
    try:  # the simulated crash, however Flower's simulation reports it
        _simulate({**DP_RUN, "out-dir": str(part)})
    except BaseException:  # noqa: BLE001, S110
        pass
    monkeypatch.setattr(recorder.RunRecorder, "round_done", real)
    stopped = sorted(part.iterdir())[-1]
    assert len(pd.read_csv(stopped / "rounds.csv")) == 2
    resumed = _simulate({**DP_RUN, "out-dir": str(part), "resume": str(stopped)})
    assert resumed == stopped
    again = pd.read_csv(resumed / "rounds.csv")
    assert again["dp_epsilon"].tolist() == rounds["dp_epsilon"].tolist()
    assert math.isclose(again["train_loss"].iloc[-1], rounds["train_loss"].iloc[-1], rel_tol=0, abs_tol=0)
    from diffusers import UNet2DModel

    a = UNet2DModel.from_pretrained(whole / "pipeline" / "unet").state_dict()
    b = UNet2DModel.from_pretrained(resumed / "pipeline" / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_opacus_sigma_search_is_asked_once_per_question_and_a_bad_cache_file_is_asked_again(tmp_path, monkeypatch):
    import clients.dp_sgd as dp

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real = dp.get_noise_multiplier

    def counted(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(dp, "get_noise_multiplier", counted)
    config = PrivacyConfig(0.0, target_epsilon=8.0, delta=1e-5, accountant="rdp", rounds=2)
    dp.searched_sigma.cache_clear()
    sigma = noise_multiplier_for(config, 1.0, 12)
    assert sigma == get_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=1.0, steps=12, accountant="rdp"
    )
    assert noise_multiplier_for(config, 1.0, 12) == sigma and len(calls) == 1  # this process
    dp.searched_sigma.cache_clear()
    assert noise_multiplier_for(config, 1.0, 12) == sigma and len(calls) == 1  # another process: the file
    (kept,) = dp.sigma_cache_dir().glob("*.json")
    for bad in ("{not json", '{"key": {}, "sigma": 1.0, "problem": ""}', kept.read_text().replace(str(sigma), "-1.0")):
        kept.write_text(bad)
        dp.searched_sigma.cache_clear()
        assert noise_multiplier_for(config, 1.0, 12) == sigma  # asked again, and the file mended
    assert len(calls) == 4 and not list(dp.sigma_cache_dir().glob("*.tmp"))
    unreachable = PrivacyConfig(0.0, target_epsilon=1e-6, delta=1e-5, accountant="rdp", rounds=2)
    for _ in range(2):  # a refusal is kept as well, and still names the key
        dp.searched_sigma.cache_clear()
        with pytest.raises(ValueError, match="^dp-target-epsilon: 1e-06 "):
            noise_multiplier_for(unreachable, 1.0, 100)
    assert len(calls) == 5


def test_shipped_sigmas_are_opacus_answers_and_answer_every_dp_preset(tmp_path, monkeypatch):
    """``clients.dp_sigmas``: each answer meets Opacus' own stopping rule for its question (its
    epsilon at most the target and within the search's tolerance of it), and the shipped presets
    (and the Table I sweep's DP rows) ask nothing else, so the paper's DP run never waits for a search."""
    import tomllib

    from opacus.accountants.utils import create_accountant

    import clients.dp_sgd as dp
    from clients.dp_sigmas import KNOWN_SIGMAS
    from iet_agc import sweep_file as sf

    for known in KNOWN_SIGMAS:
        q = known["key"]
        accountant = create_accountant(mechanism=q["accountant"])
        accountant.history = [(known["sigma"], q["sample_rate"], q["steps"])]
        eps = accountant.get_epsilon(delta=q["delta"])
        assert q["target_epsilon"] - 0.01 <= eps <= q["target_epsilon"], (known, eps)  # epsilon_tolerance 0.01

    def not_shipped(**question):
        raise AssertionError(f"a shipped preset asks Opacus for sigma; answer it in clients/dp_sigmas.py: {question}")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no answer kept from earlier tests
    monkeypatch.setattr(dp, "get_noise_multiplier", not_shipped)
    dp.searched_sigma.cache_clear()
    root = Path(__file__).resolve().parents[1]
    with open(root / "pyproject.toml", "rb") as fh:
        base = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    presets = []
    for path in sorted((root / "configs").rglob("*.toml")):
        if "sweeps" not in path.parts:
            with open(path, "rb") as fh:
                presets.append(tomllib.load(fh))
    sweep = sf.load_sweep(root / "configs" / "sweeps" / "table1.toml")
    presets += [sweep.config(cell, sweep.seeds[0]) for cell in sweep.cells]
    private = [p for p in presets if p.get("dp-sgd") and p.get("dp-target-epsilon", 0) > 0]
    assert len(private) >= 2
    try:
        for preset in private:  # the server's check asks for every shard size of the run
            settings_from_run_config(base, {**preset, "out-dir": str(tmp_path / "runs")})
    finally:
        dp.searched_sigma.cache_clear()
