"""class-embedding = "per-block": the authors' conditioning network and a class projection in
every residual block, built on diffusers' UNet2DModel; saved, loaded and trained as any other."""

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D

from ddpm.class_embedding import PerBlockClassUNet2DModel, Slot
from ddpm.family import PIXEL_DDPM
from ddpm.schedule import ddim_sample, train_scheduler
from ddpm.unet import build_unet, num_parameters
from fl_app.config import settings_from_run_config
from fl_app.model import initial_model
from fl_app.settings import Settings

AUTHORS_CIFAR100 = 2_902_528  # their ConditionalEmbedding(100 + 1, 128, 512) and 22 cemb_proj, CIFAR-100
AUTHORS_EXTRA = 128 + 4_992  # their frozen padding row, and one bias per residual block (5 x 128 + 17 x 256)


def test_cifar100_parameters_against_the_authors_count():
    plain = num_parameters(build_unet("cifar", 32, 3))
    added = num_parameters(build_unet("cifar", 32, 3, 100))
    per_block = num_parameters(build_unet("cifar", 32, 3, 100, class_embedding="per-block"))
    assert added - plain == 100 * 512  # diffusers' one Embedding(100, 512)
    assert per_block - plain == AUTHORS_CIFAR100 - AUTHORS_EXTRA == 2_897_408


def _embeddings_seen(model, x, t, labels):
    """The embedding every residual block receives (its ``temb`` argument), by block name."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[1]))
        for n, m in model.named_modules()
        if isinstance(m, ResnetBlock2D)
    ]
    try:
        with torch.no_grad():
            out = model(x, t, class_labels=labels).sample
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def test_every_block_projects_the_timestep_and_the_class_embedding_apart():
    """Each block gets [temb(t), cemb(y)] side by side (the two halves of a double-width embedding),
    temb from the timestep alone and cemb from the label alone (the authors' ConditionalEmbedding:
    Embedding, Linear, SiLU, Linear); its time_emb_proj then computes W_t SiLU(temb) + W_c SiLU(cemb) + b."""
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, 10, class_embedding="per-block").eval()
    assert isinstance(model, PerBlockClassUNet2DModel) and model.config.num_class_embeds == 10
    width = 4 * model.config.block_out_channels[0]
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 5, 900]), torch.tensor([2, 7, 2])
    seen, _ = _embeddings_seen(model, x, t, y)
    assert len(seen) == 8  # tiny: 2 down, 2 middle, 4 up
    with torch.no_grad():
        temb = model.time_embedding.inner(model.time_proj(t))
        cemb = model.class_embedding.inner(y)
    embedding = torch.cat([temb, cemb], 1)
    assert embedding.shape == (3, 2 * width)
    for emb in seen.values():
        torch.testing.assert_close(emb, embedding, rtol=0, atol=0)
    assert torch.equal(temb[0], temb[1]) and not torch.equal(temb[0], temb[2])  # the time half: t only
    assert torch.equal(cemb[0], cemb[2]) and not torch.equal(cemb[0], cemb[1])  # the class half: y only
    block = model.down_blocks[0].resnets[0]
    proj = block.time_emb_proj
    w_t, w_c = proj.weight[:, :width], proj.weight[:, width:]
    act = torch.nn.functional.silu
    with torch.no_grad():
        torch.testing.assert_close(proj(act(embedding)), act(temb) @ w_t.T + act(cemb) @ w_c.T + proj.bias)


def test_the_label_conditions_the_prediction_and_trains_every_projection():
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, 10, class_embedding="per-block", init="authors")
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([100, 100, 100, 100])
    y = torch.tensor([1, 1, 1, 4])
    with torch.no_grad():
        out = model.eval()(x[:1].expand(4, -1, -1, -1), t, class_labels=y).sample
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[3])
    model.train()
    loss = PIXEL_DDPM.per_sample_loss(model, train_scheduler(), x, t, torch.randn_like(x), y).mean()
    loss.backward()
    width = 4 * model.config.block_out_channels[0]
    for m in model.modules():
        if isinstance(m, ResnetBlock2D):
            assert m.time_emb_proj.weight.grad[:, width:].abs().sum() > 0  # each block's W_c learns
    table = model.class_embedding.inner[0].weight.grad
    assert table[[1, 4]].abs().sum(1).gt(0).all() and not table[[0, 2, 3, 5]].any()  # only the labels seen


def test_it_saves_and_loads_as_a_diffusers_pipeline(tmp_path):
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1, 10, class_embedding="per-block").eval()
    DDPMPipeline(unet=model, scheduler=train_scheduler()).save_pretrained(tmp_path / "pipeline")
    loaded = DDPMPipeline.from_pretrained(tmp_path / "pipeline").unet
    assert type(loaded) is PerBlockClassUNet2DModel and isinstance(loaded.time_embedding, Slot)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    images = ddim_sample(loaded, 4, steps=2, seed=0)  # labels drawn from the seed, as any conditional UNet
    torch.testing.assert_close(images, ddim_sample(model, 4, steps=2, seed=0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^class-embedding: a PerBlockClassUNet2DModel needs"):
        PerBlockClassUNet2DModel(**{**dict(model.config), "class_embed_type": None})
    assert not isinstance(build_unet("tiny", 8, 1, class_embedding="per-block"), PerBlockClassUNet2DModel)


def test_iet_agc_evaluate_reads_a_per_block_pipeline(tmp_path):
    from iet_agc.evaluate import _load_unet

    torch.manual_seed(0)
    DDPMPipeline(
        unet=build_unet("tiny", 8, 1, 10, class_embedding="per-block"), scheduler=train_scheduler()
    ).save_pretrained(tmp_path)
    assert type(_load_unet(Path(tmp_path))) is PerBlockClassUNet2DModel
    DDPMPipeline(unet=build_unet("tiny", 8, 1, 10), scheduler=train_scheduler()).save_pretrained(tmp_path / "b")
    assert type(_load_unet(tmp_path / "b")) is UNet2DModel


def test_the_app_builds_it_from_the_settings_on_the_server_and_on_nodes():
    settings = Settings(class_conditional=True, class_embedding="per-block", model_init="authors")
    torch.manual_seed(0)
    server = initial_model(settings, 1)
    assert type(server) is PerBlockClassUNet2DModel
    node = initial_model(settings, 1, weights=server.state_dict())  # laid out on meta, given the weights
    assert type(node) is PerBlockClassUNet2DModel
    assert all(torch.equal(a, b) for a, b in zip(node.state_dict().values(), server.state_dict().values(), strict=True))
    preset = settings_from_run_config(
        Settings().to_run_config(), {"dataset": "cifar100", "class-conditional": True, "class-embedding": "per-block"}
    )
    assert preset.num_classes == 100


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"class_embedding": "per-block"},
            r"^class-embedding: 'per-block' conditions on a class, but class-conditional",
        ),
        (
            {"class_embedding": "per-block", "class_conditional": True, "init_from": "a/b"},
            "^class-embedding: .*init-from",
        ),
        ({"model_init": "authors", "init_from": "a/b"}, "^model-init: 'authors' builds a fresh UNet, but init-from"),
        ({"class_embedding": "sum"}, "^class-embedding: must be one of added, per-block"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_both_keys(change, match):
    with pytest.raises(ValueError, match=match):
        Settings(**change)
