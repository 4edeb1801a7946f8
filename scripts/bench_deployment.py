"""Per-round overhead of a real deployment on localhost, per isolation mode and data-set mode.

Starts the README's deployment with ``deploy.localhost`` (TLS, SuperNode authentication, a
database; ``--nodes`` SuperNodes, one SuperNode by default, so its shards run one after another),
runs a short job of ``--shards`` K shards with ``flwr run . lab`` and reads the run folder: a
round's overhead is its wall time minus the busiest node's training seconds (nodes train side by
side), per message = overhead / (messages of the round per node). Rounds 2..R-1 are used (round 1
also waits for the nodes and installs the app; the last one evaluates). Variants, all in one call:

- isolation ``subprocess`` (Flower's default: the SuperNode starts ``flwr-clientapp`` per message)
  or ``process`` (a ``flower-superexec`` next to the node starts it);
- data set decoded per message (node-config ``data-cache='off'``: what every message did
  before) or memory-mapped from the node's decoded copy (the default);
- ``messages-per-node`` 1 (a node's next shard is sent once it has answered) or 2 (the next one
  waits at the SuperLink, so the SuperNode skips Flower's 3 s idle poll);
- ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (how often the node's SuperExec asks for a task to start,
  default 1 s) at 0.1 s;
- the ``tiny`` UNet (0.7M parameters) or the ``cifar`` one (35.7M, 143 MB per message each way);
- ``shards-per-message`` 1 (a message per shard: a ``flwr-clientapp`` start per shard) or 0 (all of
  a node's shards of the round in one message: one start per node and round).

Also times, in this process, what the app itself does with a ``cifar`` model's weights per
message: ``ArrayRecord(state_dict)`` (serialise) and ``to_torch_state_dict`` (deserialise).

    python scripts/bench_deployment.py [--rounds 4] [--variants all] [--images 3000] [--shards 4] [--nodes 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.localhost import BIN, ROOT, Machines, deploy, online, wait_for  # noqa: E402

BASE = (
    "local-epochs=1 batch-size=16 eval-every=0 eval-num-images=20 sample-steps=2 "
    "mq-neighbours=5 fid=false round-timeout=600.0"
)
DIGITS = "dataset='digits' train-size=128 image-size=8 model='tiny'"
CIFAR_MODEL = "dataset='digits' train-size=64 image-size=32 model='cifar'"
FAST_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
# name: (isolation, node data-cache, data and model, messages-per-node, extra node environment,
# shards-per-message)
VARIANTS = {
    "before: subprocess, decoded, 1 per node": ("subprocess", "off", DIGITS, 1, {}, 1),
    "subprocess, mapped, 1 per node": ("subprocess", "", DIGITS, 1, {}, 1),
    "after: subprocess, mapped, 2 per node": ("subprocess", "", DIGITS, 2, {}, 1),
    "process, mapped, 2 per node": ("process", "", DIGITS, 2, {}, 1),
    "subprocess, mapped, 2 per node, SuperExec poll 0.1 s": ("subprocess", "", DIGITS, 2, FAST_POLL, 1),
    "folder: decoded, 1 per node": ("subprocess", "off", "FOLDER", 1, {}, 1),
    "folder: mapped, 2 per node": ("subprocess", "", "FOLDER", 2, {}, 1),
    "cifar model: mapped, 2 per node": ("subprocess", "", CIFAR_MODEL, 2, {}, 1),
    "packed: subprocess, mapped, a node's shards in one message": ("subprocess", "", DIGITS, 2, {}, 0),
    "cifar model: packed": ("subprocess", "", CIFAR_MODEL, 2, {}, 0),
}


def run_variant(
    name: str,
    isolation: str,
    cache: str,
    data: str,
    per_node: int,
    node_env: dict,
    per_message: int,
    rounds: int,
    tmp: Path,
    shards: int = 4,
    nodes: int = 1,
) -> dict:
    folder = tmp / f"variant-{len(list(tmp.glob('variant-*')))}"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env["XDG_CACHE_HOME"] = str(tmp / "cache")  # one node-side cache for all variants (made by the first)
    node_config = "device='cpu'" + (f" data-cache='{cache}'" if cache else "")
    out = folder / "runs"
    with Machines(folder) as machines:
        user, registered = deploy(
            folder,
            machines,
            tuple(f"n{i + 1}" for i in range(nodes)),
            env,
            isolation=isolation,
            node_config=node_config,
            node_env=node_env,
        )
        wait_for(lambda: online(user) >= set(registered.values()), 120, "the node online", machines)
        started = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "lab", "--stream", "--run-config"]
            + [
                f"{BASE} {data} num-shards={shards} min-nodes={nodes} messages-per-node={per_node} "
                f"shards-per-message={per_message} num-rounds={rounds} out-dir='{out}'"
            ],
            cwd=ROOT,
            env=user,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        wall = time.monotonic() - started
        (folder / "flwr-run.log").write_text(proc.stdout + proc.stderr)  # the ServerApp's stream
        if proc.returncode or not list(out.glob("*/rounds.csv")):
            raise RuntimeError(f"{name}: the run failed\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}\n{machines.logs()}")
    (run,) = out.iterdir()
    per_round = pd.read_csv(run / "rounds.csv").set_index("round")["seconds"]
    rows = pd.read_csv(run / "shards.csv", dtype={"node": str})
    train = rows.groupby(["round", "node"])["train_seconds"].sum().groupby("round").max()  # the busiest node
    middle = range(2, rounds)
    overhead = {r: per_round[r] - train[r] for r in middle}
    per_node = rows.groupby(["round", "node"]).size().groupby("round").max()  # the busiest node's shards
    starts = {r: -(-per_node[r] // per_message) if per_message else 1 for r in middle}  # its messages
    return {
        "variant": name,
        "shards": shards,
        "nodes": nodes,
        "shards_per_message": per_message,
        "round_s": float(statistics.median(per_round[r] for r in middle)),
        "train_s": float(statistics.median(train[r] for r in middle)),
        "overhead_per_round_s": float(statistics.median(overhead.values())),
        "messages_per_node": float(statistics.median(starts.values())),
        "overhead_per_message_s": float(statistics.median(overhead[r] / starts[r] for r in middle)),
        "run_wall_s": wall,
    }


def weights_cost(repeat: int = 3) -> dict:
    """Seconds to turn the ``cifar`` UNet's weights into an ArrayRecord and back, and its bytes."""
    import torch
    from flwr.app import ArrayRecord

    from ddpm.unet import build_unet

    state = build_unet("cifar", 32, 3).state_dict()
    ser, de = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        record = ArrayRecord(state)
        ser.append(time.perf_counter() - t)
        t = time.perf_counter()
        back = record.to_torch_state_dict()
        de.append(time.perf_counter() - t)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    nbytes = sum(len(a.data) for a in record.values())
    return {"cifar_bytes": nbytes, "serialise_s": statistics.median(ser), "deserialise_s": statistics.median(de)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--variants", default="all", help="separated by semicolons, or all: " + "; ".join(VARIANTS))
    ap.add_argument("--images", type=int, default=3000, help="JPEGs (64x64) in the image-folder variants")
    ap.add_argument("--shards", type=int, default=4, help="K, num-shards")
    ap.add_argument("--nodes", type=int, default=1, help="SuperNodes (registered, each its own key and port)")
    ap.add_argument("--keep", default="", help="a folder to keep every deployment's logs and run folder in")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark stops its deployment too
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(";")]
    print(json.dumps(weights_cost()), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() if not args.keep else contextlib.nullcontext(args.keep) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        if any(VARIANTS[n][2] == "FOLDER" for n in names):
            from scripts.bench_client_start import make_folder

            images = make_folder(tmp / "images", args.images)
        for name in names:
            isolation, cache, data, per_node, node_env, per_message = VARIANTS[name]
            if data == "FOLDER":
                data = f"dataset='imagefolder' data-root='{images}' image-size=64 model='tiny' train-size=128"
            rows.append(
                run_variant(
                    name,
                    isolation,
                    cache,
                    data,
                    per_node,
                    node_env,
                    per_message,
                    args.rounds,
                    tmp,
                    args.shards,
                    args.nodes,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
