"""model-init: the authors' weight draw (their model.py): xavier-uniform, zero biases, gain 1e-5 on
each residual block's last convolution and on the output convolution."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ddpm.initialisation import OUTPUT_GAIN, authors_init, initialise
from ddpm.unet import build_unet


def _xavier_bound(weight: torch.Tensor, gain: float = 1.0) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def test_authors_init_draws_every_layer_as_their_model_py():
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, 10, init="authors").requires_grad_(False)
    small = {id(m.conv2.weight) for m in model.modules() if isinstance(m, ResnetBlock2D)} | {id(model.conv_out.weight)}
    assert len(small) == 2 + 2 + 4 + 1  # 8 residual blocks (down 2, mid 2, up 4) and conv_out
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        assert layer.bias is None or not layer.bias.any()  # zero biases everywhere
        gain = OUTPUT_GAIN if id(layer.weight) in small else 1.0
        bound, top = _xavier_bound(layer.weight, gain), float(layer.weight.abs().max())
        assert top <= bound * (1 + 1e-6)
        if layer.weight.numel() >= 64:  # uniform on [-bound, bound]: the largest draw is near the bound
            assert top > 0.8 * bound
    # the attention's output projection keeps gain 1: their ResBlock re-initialises its AttnBlock
    outs = [m.to_out[0].weight for m in model.modules() if isinstance(m, Attention)]
    assert outs and all(float(w.abs().max()) > 0.8 * _xavier_bound(w) for w in outs)
    assert isinstance(model.class_embedding, nn.Embedding)  # the class table keeps its N(0, 1) draw
    assert 0.8 < float(model.class_embedding.weight.std()) < 1.2


@pytest.mark.parametrize(("size", "image", "channels"), [("tiny", 8, 1), ("cifar", 32, 3)])
def test_the_untrained_network_predicts_almost_zero_with_the_authors_init(size, image, channels):
    """Output std at initialisation on N(0, 1) inputs at random timesteps (seed 0, batch 8):
    cifar 8.3e-6 with the authors' draw against 0.35 with diffusers' (tiny 7.5e-6 against 0.34)."""
    x = torch.randn(8, channels, image, image, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2))
    std = {}
    for init in ("diffusers", "authors"):
        torch.manual_seed(0)
        with torch.no_grad():
            std[init] = float(build_unet(size, image, channels, init=init).eval()(x, t).sample.std())
    assert 2e-6 < std["authors"] < 2e-5
    assert 0.2 < std["diffusers"] < 0.6


def test_diffusers_init_is_the_build_unchanged_and_an_unknown_init_is_refused():
    torch.manual_seed(0)
    a = build_unet("tiny", 8, 1)
    torch.manual_seed(0)
    b = build_unet("tiny", 8, 1, init="diffusers")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert initialise(a, "diffusers") is a and authors_init(a) is a
    with pytest.raises(ValueError, match="^model-init: must be one of diffusers, authors, got 'kaiming'$"):
        build_unet("tiny", 8, 1, init="kaiming")
