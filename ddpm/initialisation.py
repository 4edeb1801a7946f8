"""How a fresh UNet's weights are drawn: diffusers' defaults, or the authors' (their ``model.py``).

The authors (as Ho et al.'s DDPM code before them) draw every convolution and linear layer
xavier-uniform with zero bias, and the last convolution of every residual block and the
network's output convolution xavier-uniform with gain 1e-5: each residual block starts as its
shortcut and the untrained network predicts almost zero noise (output std about 1e-5 of
diffusers' default draw; ``tests/test_unet.py`` measures it). Their attention blocks set gain
1e-5 on the output projection too, but each sits inside a residual block whose initialisation
runs afterwards and redraws it with gain 1: so here the attention projections get gain 1.
"""

from __future__ import annotations

from diffusers import UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

MODEL_INITS: tuple[str, ...] = ("diffusers", "authors")
OUTPUT_GAIN = 1e-5  # the authors' gain on each residual block's last convolution and the output convolution


def authors_init(model: UNet2DModel) -> UNet2DModel:
    """Redraw ``model``'s weights as the authors' ``model.py`` does (in place; returns it).

    Embeddings (a class table) and normalisation layers keep their draw (PyTorch's defaults, as
    the authors' ``nn.Embedding`` and ``nn.GroupNorm``).
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            nn.init.xavier_uniform_(module.conv2.weight, gain=OUTPUT_GAIN)
    nn.init.xavier_uniform_(model.conv_out.weight, gain=OUTPUT_GAIN)
    return model


def initialise(model: UNet2DModel, init: str) -> UNet2DModel:
    """``model`` with its weights drawn the ``init`` way (``diffusers``: as built, unchanged)."""
    if init not in MODEL_INITS:
        raise ValueError(f"model-init: must be one of {', '.join(MODEL_INITS)}, got {init!r}")
    return authors_init(model) if init == "authors" else model
