"""Adapters on a tiny UNet: what trains, exact merging, and FedAvg of LoRA with A frozen."""

import copy

import pytest
import torch
from diffusers import UNet2DModel
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from clients.state import ShardStateStore
from clients.trainer import ShardState, train_shard
from ddpm.adapters import (
    SCALE,
    AdapterSpec,
    adapter_state,
    attach_adapter,
    load_trainable,
    merged_unet,
    trainable_state,
)
from ddpm.base import model_fingerprint
from ddpm.unet import build_unet
from fl_app.settings import Settings


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_unet("tiny", 8, 1).eval()


def _adapted(base, **spec):
    return attach_adapter(copy.deepcopy(base), AdapterSpec(**spec)).eval()


def _perturb(model, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([3, 400, 999])


def test_lora_trains_only_its_matrices(base):
    lora = _adapted(base, kind="lora", rank=2)
    names = list(trainable_state(lora))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"
    frozen_a = _adapted(base, kind="lora", rank=2, freeze_a=True)
    assert all(".lora_B." in n for n in trainable_state(frozen_a))
    conv = _adapted(base, kind="lora", rank=2, targets="attention+conv")
    assert any(".conv1.lora_A." in n for n in trainable_state(conv))
    x, t = _inputs()
    with torch.no_grad():  # B starts at 0: the adapted model starts as the base
        assert torch.equal(lora(x, t).sample, base(x, t).sample)


def test_difffit_trains_biases_norms_and_one_scale_per_block(base):
    model = _adapted(base, kind="difffit")
    names = set(trainable_state(model))
    scales = {n for n in names if n.endswith(SCALE)}
    blocks = [m for m in base.modules() if type(m).__name__ in ("ResnetBlock2D", "Attention")]
    assert len(scales) == len(blocks)
    assert all(n.endswith((".conv2." + SCALE, ".to_out.0." + SCALE)) for n in scales)
    assert all(n.endswith(".bias") or "norm" in n or n.endswith(SCALE) for n in names)
    assert "conv_norm_out.weight" in names and "conv_in.weight" not in names
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(not n.endswith(".bias") for n in frozen)
    x, t = _inputs()
    with torch.no_grad():  # scales start at 1
        assert torch.equal(model(x, t).sample, base(x, t).sample)


@pytest.mark.parametrize(
    "spec",
    [
        dict(kind="lora", rank=2),
        dict(kind="lora", rank=2, targets="attention+conv", alpha=4.0),
        dict(kind="difffit"),
    ],
)
def test_merged_model_is_plain_and_computes_the_same(base, spec):
    model = _adapted(base, **spec)
    _perturb(model, 3)
    merged = merged_unet(model)
    assert type(merged) is UNet2DModel
    assert set(merged.state_dict()) == set(base.state_dict())
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t).sample, model(x, t).sample, atol=1e-5, rtol=1e-5)


def test_attaching_is_seeded_and_leaves_the_global_rng_alone(base):
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = _adapted(base, kind="lora", rank=2, seed=1)
    assert torch.equal(torch.rand(1), expected)
    b = _adapted(base, kind="lora", rank=2, seed=1)
    c = _adapted(base, kind="lora", rank=2, seed=2)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    assert model_fingerprint(base) != model_fingerprint(a)


def test_fingerprint_sees_one_changed_weight(base):
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(other) != model_fingerprint(base)


def test_loading_other_tensors_is_refused_naming_them(base):
    model = _adapted(base, kind="lora", rank=2)
    with pytest.raises(ValueError, match="missing .*unexpected.*conv_in.weight"):
        load_trainable(model, {"conv_in.weight": base.conv_in.weight})
    state = trainable_state(_adapted(base, kind="lora", rank=2, seed=9))
    load_trainable(model, state)
    assert all(torch.equal(trainable_state(model)[k], v) for k, v in state.items())


def _fedavg(models, weights):
    """The strategy's aggregation (Flower's FedAvg helper) over the models' trainable tensors."""
    records = [
        RecordDict({"arrays": ArrayRecord(trainable_state(m)), "metrics": MetricRecord({"n": w})})
        for m, w in zip(models, weights, strict=True)
    ]
    return aggregate_arrayrecords(records, "n").to_torch_state_dict()


def _merged_weights(model):
    return merged_unet(model).state_dict()


def test_freezing_a_makes_fedavg_exactly_the_mean_update(base):
    """With A fixed, W = W0 + s B A is linear in B: averaging the Bs averages the merged models."""
    start = _adapted(base, kind="lora", rank=2, freeze_a=True)
    shards = [copy.deepcopy(start) for _ in range(3)]
    for i, m in enumerate(shards):
        _perturb(m, 10 + i)
    weights = [1, 2, 3]
    averaged = copy.deepcopy(start)
    load_trainable(averaged, _fedavg(shards, weights))
    w0 = _merged_weights(start)
    merged = [_merged_weights(m) for m in shards]
    got = _merged_weights(averaged)
    total = sum(weights)
    for key, value in got.items():
        mean_update = sum(w * (m[key] - w0[key]) for w, m in zip(weights, merged, strict=True)) / total
        torch.testing.assert_close(value, w0[key] + mean_update, atol=1e-6, rtol=1e-5)


def test_averaging_a_and_b_separately_is_not_the_mean_update(base):
    """The known inexactness: mean(B) mean(A) != mean(B A) once the As differ (README)."""
    start = _adapted(base, kind="lora", rank=2)
    shards = [copy.deepcopy(start) for _ in range(2)]
    for i, m in enumerate(shards):
        _perturb(m, 20 + i)
    averaged = copy.deepcopy(start)
    load_trainable(averaged, _fedavg(shards, [1, 1]))
    merged = [_merged_weights(m) for m in shards]
    key = "down_blocks.1.attentions.0.to_q.weight"
    exact = (merged[0][key] + merged[1][key]) / 2
    assert (_merged_weights(averaged)[key] - exact).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["lora", "difffit"])
def test_training_moves_only_the_adapter_and_its_state_is_stored(base, kind, tmp_path):
    settings = Settings(
        init_from="unused-in-this-test", adapter=kind, lora_rank=2, local_epochs=1, batch_size=8, lr=1e-2
    )
    model = _adapted(base, kind=kind, rank=2)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: v.clone() for n, v in trainable_state(model).items()}
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    state = ShardState()
    train_shard(model, images, settings, state, device=torch.device("cpu"), seed=0, augment=None)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    moved = [n for n, v in trainable_state(model).items() if not torch.equal(v, trainable_before[n])]
    assert moved
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    assert [state.optimizer[i]["exp_avg"].shape for i in range(len(shapes))] == shapes
    store = ShardStateStore(tmp_path)
    store.save("run", 0, 1, state)
    loaded, r = store.load("run", 0, 2)
    assert r == 1 and loaded.step == state.step
    for i in range(len(shapes)):
        assert torch.equal(loaded.optimizer[i]["exp_avg_sq"], state.optimizer[i]["exp_avg_sq"])


def test_adapter_alone_keeps_frozen_a(base):
    model = _adapted(base, kind="lora", rank=2, freeze_a=True)
    alone = adapter_state(model)
    assert any(".lora_A." in n for n in alone) and any(".lora_B." in n for n in alone)
    assert not any(".lora_A." in n for n in trainable_state(model))


def test_lora_on_a_base_without_attention_names_the_key():
    base = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        add_attention=False,
    )
    with pytest.raises(ValueError, match="^lora-targets: 'attention' .* matches no layer"):
        attach_adapter(base, AdapterSpec("lora", rank=2))
    conv = attach_adapter(base, AdapterSpec("lora", rank=2, targets="attention+conv"))
    assert any(".conv2.lora_B." in n for n in trainable_state(conv))


def test_a_model_given_its_weights_is_laid_out_without_a_random_draw():
    from fl_app.model import initial_model
    from fl_app.settings import Settings

    settings = Settings.from_run_config({"model": "tiny", "image-size": 8})
    torch.manual_seed(0)
    weights = {k: v.clone() for k, v in initial_model(settings, 1).state_dict().items()}
    state = torch.random.get_rng_state()
    model = initial_model(settings, 1, weights)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing was drawn
    assert all(torch.equal(p, weights[n]) and p.device.type == "cpu" for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="1 missing"):
        initial_model(settings, 1, {k: v for k, v in list(weights.items())[1:]})
