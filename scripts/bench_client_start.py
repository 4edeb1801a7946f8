"""What a message costs a node before training starts, as in a deployment: a fresh process each time.

Flower 1.41 starts ``flwr-clientapp`` afresh for every message in a deployment, so the ClientApp
pays its imports, the data set and the model again per shard and round. This script starts a
fresh Python process per measurement that does what the ClientApp does before training (import
the app, load the data set and check its fingerprint, build the UNet and load weights) and times
each step from the moment the process was spawned. Two data-set modes in the same run:

- ``before``: the data set is read and decoded from its source files (``cache_dir="off"``), and
  the UNet is initialised at random before the server's weights overwrite it: what every
  message did before;
- ``after``: the decoded copy on disk is memory-mapped (made once by a warm-up process) and the
  UNet is laid out on the meta device and takes the weights as they are (``initial_model``).

Cases: the embedded digits with the ``tiny`` model, and an image folder of ``--images`` JPEGs
(``--source-size`` pixels square, made by the script; 512 is AFHQ's size) loaded at 64x64 with
the ``afhq64`` model; CIFAR-10 where a copy is on disk.

    python scripts/bench_client_start.py [--repeat 3] [--images 3000] [--source-size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from ddpm.unet import build_unet

CHILD = r"""
import json, sys, time
spawned = float(sys.argv[1]); args = json.loads(sys.argv[2])
started = time.time()
import fl_app.client_app  # noqa: F401  what flwr-clientapp imports: torch, diffusers, flwr, the app
from safetensors.torch import load_file
from ddpm.data import load_dataset
from fl_app.model import initial_model
from fl_app.settings import Settings
from ddpm.unet import build_unet
imported = time.time()
data = load_dataset(**args["data"], cache_dir=args["cache_dir"])
fingerprint = data.fingerprint
loaded = time.time()
weights = load_file(args["weights"])  # stands in for the message's weights (Flower's part, not timed)
ready = time.time()
if args["after"]:  # the ClientApp now: laid out on the meta device, the weights assigned
    settings = Settings.from_run_config({"model": args["model"], "image-size": data.image_size})
    model = initial_model(settings, data.channels, weights)
else:  # before: a random initialisation, then overwritten
    model = build_unet(args["model"], data.image_size, data.channels)
    model.load_state_dict(weights)
built = time.time()
print(json.dumps({"interpreter": started - spawned, "imports": imported - started, "data": loaded - imported,
                  "model": built - ready, "total": built - spawned - (ready - loaded), "fingerprint": fingerprint}))
"""

STEPS = ("interpreter", "imports", "data", "model", "total")


def make_folder(root: Path, n: int, size: int = 64) -> Path:
    """``n`` distinct JPEG images of ``size`` x ``size`` (smooth random colour fields)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(root / f"{i:05d}.jpg", quality=90)
    return root


def one(data: dict, model: str, weights: Path, cache_dir: str) -> dict:
    """Spawn a fresh interpreter that does the ClientApp's work before training; its timings."""
    after = cache_dir != "off"
    payload = json.dumps(
        {"data": data, "model": model, "weights": str(weights), "cache_dir": cache_dir, "after": after}
    )
    spawned = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, repr(spawned), payload], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--source-size", type=int, default=64, help="pixels of the folder's JPEGs (AFHQ: 512)")
    ap.add_argument("--cifar-root", default="", help="a folder holding cifar-10-batches-py (skipped if absent)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = {
            "digits (400), tiny": ({"name": "digits", "image_size": 8, "train_size": 400}, "tiny"),
            f"image folder ({args.images} JPEG {args.source_size}px -> 64), afhq64": (
                {
                    "name": "imagefolder",
                    "root": str(make_folder(tmp / "images", args.images, args.source_size)),
                    "image_size": 64,
                },
                "afhq64",
            ),
        }
        if args.cifar_root and (Path(args.cifar_root) / "cifar-10-batches-py").is_dir():
            cases["cifar10 (50000), cifar"] = (
                {"name": "cifar10", "root": args.cifar_root, "download": False, "image_size": 32},
                "cifar",
            )
        else:
            print("cifar10: skipped (no --cifar-root holding cifar-10-batches-py; no network here to download it)")
        cache = str(tmp / "decoded")
        rows = []
        for name, (data, model) in cases.items():
            weights = tmp / f"{model}.safetensors"
            channels = 1 if data["name"] == "digits" else 3
            save_file(build_unet(model, data["image_size"], channels).state_dict(), weights)
            warm = one(data, model, weights, cache)  # makes the decoded copy (not counted)
            runs = {"before": [], "after": []}
            for _ in range(args.repeat):  # interleaved, so both modes see the same machine load
                runs["before"].append(one(data, model, weights, "off"))
                runs["after"].append(one(data, model, weights, cache))
            assert {r["fingerprint"] for rs in runs.values() for r in rs} == {warm["fingerprint"]}
            for mode, rs in runs.items():
                row = {"case": name, "mode": mode}
                row.update({s: statistics.median(r[s] for r in rs) for s in STEPS})
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"Median seconds over {args.repeat} fresh processes, from spawn:")
    print("| case | mode | interpreter | imports | data + fingerprint | model | total |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['mode']} | {r['interpreter']:.2f} | {r['imports']:.2f} | {r['data']:.3f} | "
            f"{r['model']:.3f} | {r['total']:.2f} |"
        )


if __name__ == "__main__":
    main()
