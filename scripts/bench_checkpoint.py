"""What fault tolerance costs per round: the server's checkpoint and a node's shard state.

Times ``save_checkpoint``/``load_checkpoint`` (global weights, ledger, rows) and the node's
``ShardStateStore.save``/``load`` (Adam moments, warm-up position, memory bank) for the ``tiny``
and ``cifar`` UNets, with the paper's CIFAR ledger (50,000 ids in K = 10 shards, 40 rows), and
prints sizes on disk, medians over ``--repeat`` runs, and the ratio to one training step.

    python scripts/bench_checkpoint.py [--repeat 5] [--models tiny cifar]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clients.state import ShardStateStore
from clients.trainer import ShardState, train_shard
from ddpm.unet import build_unet, num_parameters
from fl_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fl_app.settings import Settings
from strategies.ledger import ShardLedger

SIZES = {"tiny": (8, 1), "cifar": (32, 3)}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(model_name: str, repeat: int) -> dict:
    size, channels = SIZES[model_name]
    torch.manual_seed(0)
    model = build_unet(model_name, size, channels)
    n, k = 50_000, 10
    ledger = ShardLedger(np.array_split(np.random.default_rng(0).permutation(n), k), n)
    meta, arrays = ledger.state_dict()
    rows = [{"round": r, "train_loss": 0.1, "mq_0.5": 0.0, "fid": None} for r in range(1, 41)]
    weights = {k2: v.detach().numpy() for k2, v in model.state_dict().items()}
    ckpt = Checkpoint(40, weights, meta, arrays, rows, Settings().to_run_config(), "bench", "x")

    # one real training step's worth of shard state (Adam moments exist after a step)
    settings = Settings(local_epochs=1, batch_size=8, train_size=8, mq_neighbours=4, image_size=size, model=model_name)
    images = torch.randint(0, 256, (8, channels, size, size), dtype=torch.uint8)
    state = ShardState()
    step = _median_seconds(
        lambda: train_shard(model, images, settings, state, device=torch.device("cpu"), seed=0), max(1, repeat // 2)
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, store = Path(tmp) / "run", ShardStateStore(Path(tmp) / "state")
        run_dir.mkdir()
        save = _median_seconds(lambda: save_checkpoint(run_dir, ckpt), repeat)
        load = _median_seconds(lambda: load_checkpoint(run_dir), repeat)
        ckpt_bytes = _size(run_dir / "checkpoint")
        rounds = iter(range(1, 10_000))
        node_save = _median_seconds(lambda: store.save("bench", 0, next(rounds), state), repeat)
        node_load = _median_seconds(lambda: store.load("bench", 0, 10_000), repeat)
        node_bytes = max(p.stat().st_size for p in (Path(tmp) / "state").rglob("*.safetensors"))
    return {
        "model": model_name,
        "params (M)": round(num_parameters(model) / 1e6, 2),
        "checkpoint (MB)": round(ckpt_bytes / 1e6, 1),
        "save (s)": round(save, 3),
        "load (s)": round(load, 3),
        "node state per shard (MB)": round(node_bytes / 1e6, 1),
        "node save (s)": round(node_save, 3),
        "node load (s)": round(node_load, 3),
        "one step, batch 8 (s)": round(step, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import pandas as pd

    frame = pd.DataFrame([bench(m, args.repeat) for m in args.models])
    print(frame.to_markdown(index=False))


if __name__ == "__main__":
    main()
