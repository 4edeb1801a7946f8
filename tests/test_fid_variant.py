"""The authors' FID variant (DCR's metrics/fid.py, also in IET-AGC_SD): its double-normalised
input transform against the formula, and its figure labelled and cached apart from pytorch-fid's."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms as T

from evaluation import fid as fidmod


def test_authors_fid_variant_input_transform():
    """DCR's FID transform (Resize 299, CenterCrop 299, Normalize 0.5) then pytorch-fid's own
    2x - 1: a [0, 1] image reaches the Inception network as 4x - 3, in [-3, 1]."""
    x = torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(8))
    ref = T.Compose([T.Resize(299), T.CenterCrop(299), T.Normalize([0.5] * 3, [0.5] * 3)])
    torch.testing.assert_close(fidmod.authors_fid_inputs(x), ref(x))
    square = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(fidmod.authors_fid_inputs(square), 2 * square - 1)

    class Seen(Exception):
        pass

    net, seen = fidmod.random_inception(), []

    def stop(_module, args):
        seen.append(args[0])
        raise Seen  # what the first convolution would get is all this test needs

    net.blocks[0].register_forward_pre_hook(stop)
    for model, expected in [(fidmod.AuthorsVariantInputs(net), 4 * square - 3), (net, 2 * square - 1)]:
        with pytest.raises(Seen):
            model(square)
        torch.testing.assert_close(seen.pop(), expected)


def test_authors_fid_variant_is_labelled_and_cached_apart(tmp_path):
    """On constant-colour images a mean-colour "network" sees 2c - 1 for colour c, so the authors'
    variant is 4x the plain FID: the two numbers differ and their statistics never mix."""
    gen = torch.rand(30, 3, 1, 1, generator=torch.Generator().manual_seed(10)).expand(-1, -1, 8, 8)
    ref = torch.rand(40, 3, 1, 1, generator=torch.Generator().manual_seed(11)).expand(-1, -1, 12, 12)

    def mean_colour(x):
        return x.mean(dim=(2, 3))

    options = {"model": mean_colour, "reference_key": "toy", "cache": str(tmp_path), "resamples": 2}
    plain = fidmod.fid_score(gen, ref, **options).value
    authors = fidmod.fid_authors_variant(gen, ref, **options).value
    assert authors == pytest.approx(4 * plain, rel=1e-4)
    names = {p.name for p in (tmp_path / "fid").glob("toy-*.npz")}
    assert names == {"toy-custom-function.npz", f"toy-custom-function-{fidmod.AUTHORS_VARIANT_TAG}.npz"}
