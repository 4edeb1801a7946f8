import math

import pytest
import torch

from clients.agc import NeverSkip, RatioSkip, kept_mean, loss_ratio, update_memory_bank


def _sequential(bank, t, losses, eta):
    bank = bank.clone()
    for ti, li in zip(t.tolist(), losses.tolist(), strict=True):
        bank[ti] = eta * bank[ti] + (1 - eta) * li
    return bank


@pytest.mark.parametrize("seed", range(20))
def test_memory_bank_equals_sequential_updates_with_repeats(seed):
    g = torch.Generator().manual_seed(seed)
    bank = torch.rand(7, generator=g, dtype=torch.float64) * (seed % 2)  # half the cases start at 0
    t = torch.randint(0, 7, (33,), generator=g)  # 33 draws over 7 timesteps: many repeats
    losses = torch.rand(33, generator=g, dtype=torch.float64)
    got = update_memory_bank(bank, t, losses, 0.8)
    torch.testing.assert_close(got, _sequential(bank, t, losses, 0.8), rtol=1e-12, atol=1e-12)


def test_memory_bank_hand_case():
    bank = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    got = update_memory_bank(bank, torch.tensor([2, 0, 2]), torch.tensor([4.0, 3.0, 6.0], dtype=torch.float64), 0.5)
    # t=0: 0.5*1 + 0.5*3 = 2; t=2: 0.5*(0.5*2 + 0.5*4) + 0.5*6 = 4.5; t=1 untouched
    assert got.tolist() == [2.0, 0.0, 4.5]


def test_ratio_and_skip_rule():
    losses = torch.tensor([0.1, 0.5, 2.0, 0.3])
    bank_t = torch.tensor([1.0, 1.0, 1.0, 0.0])
    r = loss_ratio(losses, bank_t)
    assert r[:3].tolist() == pytest.approx([0.1, 0.5, 2.0]) and math.isinf(r[3])
    skip = RatioSkip(0.5)(r)
    assert skip.tolist() == [True, False, False, False]  # r == lambda is kept; empty bank never skips
    assert not NeverSkip()(r).any()
    with pytest.raises(ValueError, match="skip-threshold"):
        RatioSkip(0.0)


def test_kept_mean_is_mean_over_kept_and_safe_when_all_skipped():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert kept_mean(x, torch.tensor([True, False, True, True])).item() == pytest.approx(10 / 3)
    assert kept_mean(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0
