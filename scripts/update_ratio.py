"""How far apart are honest shards' updates? The largest ||w_k - w|| / median(others) per round.

Trains K shards from the same global model with the app's own pieces (``train_shard``, FedAvg),
records each shard's update norm ratio to the median of the other shards' (what
``max-update-ratio`` compares), and prints the largest ratio over every round of each setting::

    python scripts/update_ratio.py --rounds 5 --set "num-shards=4" --set "num-shards=8 msr='none'"
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.trainer import ShardState, shard_seed, train_shard  # noqa: E402
from ddpm.adapters import load_trainable, trainable_state  # noqa: E402
from ddpm.data import load_dataset  # noqa: E402
from fl_app.config import settings_from_run_config, train_config  # noqa: E402
from fl_app.model import initial_model, model_family  # noqa: E402
from strategies.replies import update_norms  # noqa: E402
from strategies.shards import make_shards  # noqa: E402


def ratios(overrides: dict, rounds: int) -> list[float]:
    """Per round, the largest norm / median(other norms) over the shards."""
    settings = settings_from_run_config({"out-dir": "/tmp/update-ratio", **overrides})
    data = load_dataset(**settings.dataset_kwargs())
    labels = None if data.labels is None else data.labels.numpy()
    shards = make_shards(len(data), settings.num_shards, labels, settings.seed)
    torch.manual_seed(settings.seed)
    model = initial_model(settings, data.channels)
    states = [ShardState() for _ in shards]
    out = []
    for r in range(1, rounds + 1):
        sent = {k: v.detach().numpy().copy() for k, v in trainable_state(model).items()}
        replies = []
        for s, ids in enumerate(shards):
            local = copy.deepcopy(model)
            train_shard(
                local,
                data.images[torch.from_numpy(ids)],
                train_config(settings),
                states[s],
                device=torch.device("cpu"),
                seed=shard_seed(settings.seed, r, s),
                family=model_family(settings),
                desc=f"shard {s}, round {r}",
            )
            replies.append(ArrayRecord(trainable_state(local)))
        norms = update_norms(sent, replies)
        out.append(max(n / np.median(np.delete(norms, k)) for k, n in enumerate(norms)))
        sizes = np.array([len(ids) for ids in shards], dtype=np.float64)
        mean = {k: sum(w * x[k].numpy() for w, x in zip(sizes / sizes.sum(), replies, strict=True)) for k in sent}
        load_trainable(model, {k: torch.from_numpy(v.astype(np.float32)) for k, v in mean.items()})
        print(f"  round {r}: norms {np.round(norms, 4).tolist()} max ratio {out[-1]:.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="'key=value ...' over the defaults (repeatable)")
    args = parser.parse_args()
    import tomllib

    for spec in args.set or [""]:
        overrides = tomllib.loads("\n".join(shlex.split(spec))) if spec else {}
        found = ratios(overrides, args.rounds)
        print(f"{spec or 'defaults'}: largest ratio {max(found):.3f} over {args.rounds} rounds", flush=True)


if __name__ == "__main__":
    main()
