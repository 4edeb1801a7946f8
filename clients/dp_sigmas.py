"""Opacus' answers to the shipped presets' sigma questions, so that the paper's DP-SGD run starts
at once instead of after Opacus' search (~2-6 min with the PRV accountant on a 2-core CPU).

Each entry is ``opacus.accountants.utils.get_noise_multiplier``'s result for its question, keyed
exactly as ``clients.dp_sgd.searched_sigma`` keys its cache (Opacus' version included: another
version asks again). ``tests/test_dp_sgd.py`` checks every entry against the installed
accountant (its epsilon at the sigma is within the search's tolerance below the target) and that
every preset with a DP target asks only questions answered here.
"""

from __future__ import annotations

KNOWN_SIGMAS: tuple[dict, ...] = (
    {  # configs/table1/dp-sgd.toml: CIFAR-10, 1 shard
        "key": {
            "target_epsilon": 10.0,
            "delta": 1e-05,
            "sample_rate": 1 / 390,  # 50,000 images in batches of 128
            "steps": 780000,  # 390 batches x 50 local epochs x 40 rounds
            "accountant": "prv",
            "opacus": "1.6.0",
        },
        "sigma": 1.319580078125,  # searched 2026-12-03 (340 s on a 2-core CPU)
    },
    {  # the dp-sgd row of configs/sweeps/table1.toml: 200 digits, 1 shard
        "key": {
            "target_epsilon": 10.0,
            "delta": 1e-05,
            "sample_rate": 0.25,  # 200 images in batches of 50
            "steps": 3200,  # 4 batches x 20 local epochs x 40 rounds
            "accountant": "prv",
            "opacus": "1.6.0",
        },
        "sigma": 7.1240234375,  # searched 2026-12-04 (7 s)
    },
)
