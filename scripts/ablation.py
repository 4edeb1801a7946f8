"""Table III on the embedded default: default DDPM vs the ablation rows vs full IET-AGC+.

    python scripts/ablation.py [--rows all] [--out runs/ablation] [--set key=value ...]

Every row is the default preset (configs/default.toml) with switches flipped, run in-process
with flwr.simulation. All rows train on the same number of sample-steps: with 400 images and
batch 32, K=1 takes 12 steps per epoch and K=4 takes 4 x 3. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import pandas as pd
from flwr.simulation import run_simulation

from fl_app.client_app import app as client_app
from fl_app.server_app import make_server_app

OFF = {"agc": False, "taa": False, "msr": "none"}
ROWS = {
    "default-ddpm": {"num-shards": 1, **OFF},
    "agc": {"num-shards": 1, **OFF, "agc": True},
    "agc+iet": {**OFF, "agc": True},
    "agc+iet+taa": {**OFF, "agc": True, "taa": True},
    "iet-agc+": {},
    "iet-agc+ random-msr": {"msr": "random"},
}
COLUMNS = ["mq_0.4", "mq_0.5", "mq_0.6", "copy_1", "copy_5", "digit_fd", "fid", "skip_rate", "aug_rate", "moved"]


def run_row(name: str, changes: dict, out: Path, extra: dict) -> dict:
    target = out / name.replace("+", "p").replace(" ", "_")
    cfg = {**changes, **extra, "out-dir": str(target)}
    start = time.monotonic()
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    run_dir = sorted(target.iterdir())[-1]
    rounds = pd.read_csv(run_dir / "rounds.csv")
    last = rounds.iloc[-1].to_dict()
    row = {"row": name, **{c: last.get(c) for c in COLUMNS}}
    row["skip_rate"] = rounds["skip_rate"].mean()  # over the run, not just the last round
    row["aug_rate"] = rounds["aug_rate"].mean()
    row["minutes"] = round((time.monotonic() - start) / 60, 1)
    row["run"] = str(run_dir)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help="comma-separated row names, or all: " + ", ".join(ROWS))
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--set", action="append", default=[], help="extra run-config key=value for every row")
    args = ap.parse_args()
    extra = tomllib.loads("\n".join(args.set)) if args.set else {}
    names = list(ROWS) if args.rows == "all" else args.rows.split(",")
    results = []
    for name in names:
        results.append(run_row(name, ROWS[name], Path(args.out), extra))
        print(json.dumps(results[-1], default=str), flush=True)
    table = pd.DataFrame(results).drop(columns="run")
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
