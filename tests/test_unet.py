"""The UNet sizes: single-head attention as in the authors' model.py, at the authors' level."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from ddpm.unet import MODEL_SIZES, build_unet, num_parameters

# name -> (image size, channels, parameters, attention modules, attention channels)
SPECS = {
    "tiny": (8, 1, 701_345, 4, {64}),
    "cifar": (32, 3, 35_746_307, 6, {256}),  # the paper's 35.7M
    "afhq64": (64, 3, 78_700_803, 6, {256, 512}),
}


def _attentions(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


@pytest.fixture(scope="module", params=MODEL_SIZES)
def unet(request):
    size, channels, *_ = SPECS[request.param]
    return request.param, build_unet(request.param, size, channels)


def test_every_attention_is_one_head_over_all_channels(unet):
    name, model = unet
    _, _, params, n_attn, widths = SPECS[name]
    attns = _attentions(model)
    assert len(attns) == n_attn
    assert {a.heads for a in attns.values()} == {1}
    assert {a.inner_dim for a in attns.values()} == widths  # the head spans the block's channels
    assert num_parameters(model) == params


def test_attention_sits_at_level_1_as_the_authors_attn_flag(unet):
    """``--attn=1``: level 1, half the input resolution (CIFAR 32 -> 16x16, AFHQ 64 -> 32x32),
    in both residual blocks down and all three up, plus the middle block. A small input keeps the
    forward cheap; the level is what is checked."""
    name, model = unet
    _, channels, *_ = SPECS[name]
    size = 16
    seen: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].shape[-1]))
        for n, m in _attentions(model).items()
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size), torch.tensor([10]))
    finally:
        for h in hooks:
            h.remove()
    levels = len(model.config.block_out_channels)
    side = {n: s for n, s in seen.items() if not n.startswith("mid_block")}
    assert set(side.values()) == {size // 2}
    assert seen["mid_block.attentions.0"] == size // 2 ** (levels - 1)
    down = [n for n in side if n.startswith("down_blocks.1.")]
    up = [n for n in side if n.startswith(f"up_blocks.{levels - 2}.")]
    assert len(down) == model.config.layers_per_block and len(up) == model.config.layers_per_block + 1


def test_single_head_attention_is_ddpm_attnblock():
    """diffusers' one-head Attention computes Ho et al.'s AttnBlock: GroupNorm, 1x1 q/k/v,
    softmax(q k^T / sqrt(C)) v, 1x1 projection, residual."""
    torch.manual_seed(0)
    attn = build_unet("tiny", 8, 1).mid_block.attentions[0].eval()
    x = torch.randn(2, 64, 4, 4)
    b, c, h, w = x.shape
    hn = attn.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = attn.to_q(hn), attn.to_k(hn), attn.to_v(hn)
    weights = torch.softmax(q @ k.transpose(1, 2) * c**-0.5, dim=-1)
    expect = x + attn.to_out[0](weights @ v).transpose(1, 2).reshape(b, c, h, w)
    with torch.no_grad():
        got = attn(x)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
