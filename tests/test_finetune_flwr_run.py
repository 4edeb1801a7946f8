"""Fine-tuning through the real `flwr run` path (`iet-agc run`) ends as the in-process simulation.

Stops machine-wide local simulation SuperLinks (the ``fresh_shell`` fixture), as test_flwr_run.py.
"""

from pathlib import Path

import pandas as pd
import torch
from conftest import THREADS, iet_agc_run
from diffusers import DDPMPipeline
from flwr.simulation import run_simulation

from ddpm.schedule import train_scheduler
from ddpm.unet import build_unet
from fl_app.client_app import app as client_app
from fl_app.server_app import make_server_app

ROOT = Path(__file__).resolve().parents[1]
RUN = {
    "train-size": 80,
    "num-shards": 2,
    "num-rounds": 2,
    "local-epochs": 1,
    "batch-size": 16,
    "eval-num-images": 20,
    "sample-steps": 2,
    "mq-neighbours": 5,
    "fid": False,
    "adapter": "lora",
    "lora-rank": 4,
    "lora-freeze-a": True,
    "lr": 0.01,
}


def test_flwr_run_fine_tunes_as_the_simulation_does(fresh_shell, tmp_path, monkeypatch):
    # Both paths compute with THREADS threads (Ray's actors take OMP_NUM_THREADS where it is set,
    # else their num-cpus; the ServerApps take it too): the same kernels on the same shapes, so the
    # results are compared bitwise.
    monkeypatch.setenv("OMP_NUM_THREADS", str(THREADS))
    env = {**fresh_shell, "OMP_NUM_THREADS": str(THREADS)}
    torch.manual_seed(11)
    base = tmp_path / "base"
    DDPMPipeline(unet=build_unet("tiny", 8, 1), scheduler=train_scheduler()).save_pretrained(base)
    cfg = {**RUN, "init-from": str(base)}
    text = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower()}" for k, v in cfg.items())
    out = tmp_path / "flwr"
    log = iet_agc_run("--run-config", text, "--run-config", f'out-dir="{out}"', env=env)
    assert "adapter lora rank 4" in log and "done in" in log
    (flwr_run,) = out.iterdir()

    sim_out = tmp_path / "sim"
    run_simulation(
        server_app=make_server_app({**cfg, "out-dir": str(sim_out)}),
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": THREADS}},  # no more threads than cores
    )
    (sim_run,) = sim_out.iterdir()
    columns = ["round", "train_loss", "skip_rate", "aug_rate", "moved", "mq_0.5", "copy_5"]
    a, b = (pd.read_csv(r / "rounds.csv")[columns] for r in (flwr_run, sim_run))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    ua, ub = (DDPMPipeline.from_pretrained(r / "pipeline").unet.state_dict() for r in (flwr_run, sim_run))
    assert ua.keys() == ub.keys() and all(torch.equal(ua[key], ub[key]) for key in ua)
