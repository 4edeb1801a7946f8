"""The real `flwr run` path through the README's command (`iet-agc run`), in a fresh FLWR_HOME."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import iet_agc_run

ROOT = Path(__file__).resolve().parents[1]


def test_flwr_run_end_to_end(fresh_shell, tmp_path):
    out = tmp_path / "runs"
    config = (
        f"train-size=80 num-shards=2 num-rounds=1 local-epochs=1 batch-size=16 eval-num-images=20 sample-steps=2 "
        f'mq-neighbours=5 fid=false out-dir="{out}"'
    )
    log = iet_agc_run("--run-config", config, env=fresh_shell)
    assert "round 1/1: loss" in log and "done in" in log
    assert "Installing application dependencies" not in log  # no per-run environment was built
    (run,) = out.iterdir()
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["round"].tolist() == [1] and rounds["mq_0.5"].notna().all()


def test_invalid_setting_exits_2_naming_the_key(fresh_shell):
    proc = subprocess.run(
        ["iet-agc", "run", "--run-config", "lr=-0.1"], cwd=ROOT, env=fresh_shell, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "lr:" in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_superlinks_from_elsewhere_or_without_the_flag_are_stale(tmp_path):
    from iet_agc.run import ENV_FLAG, _stale_superlinks

    fake = tmp_path / "bin" / "flower-superlink"  # a stand-in SuperLink from another environment
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(60)\n")
    base = {k: v for k, v in os.environ.items() if k != ENV_FLAG}
    procs = [
        subprocess.Popen([sys.executable, str(fake), "--simulation"], env={**base, ENV_FLAG: "1"}),
        subprocess.Popen([sys.executable, str(fake), "--simulation"], env=base),
    ]
    try:
        deadline = time.monotonic() + 60  # generous: the loop ends as soon as both are seen
        while time.monotonic() < deadline:  # wait until both show up in /proc with their command lines
            stale = _stale_superlinks()
            if all(p.pid in stale for p in procs):
                break
            time.sleep(0.1)
        assert "another environment" in stale[procs[0].pid]
        assert "without" in stale[procs[1].pid]
    finally:
        for p in procs:
            p.kill()
