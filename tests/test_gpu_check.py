"""scripts/gpu_check.sh --smoke: the GPU check's own code path at tiny sizes on this CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["environment"]["device"] == "cpu"
    round_ = report["preset_round"]
    assert round_["shards"] == 10 and round_["steps"] > 0 and round_["sample_steps_per_s"] > 0
    assert "random images" in round_["data"]  # offline: CIFAR-10 is not there, and the JSON says so
    rows = {(r["config"], r["loss"]): r for r in report["steps"]}
    assert set(rows) == {(c, loss) for c in ("fp32", "bf16-cl") for loss in ("plain", "taa")}
    assert all(r["step_s"] > 0 and r["ddim_img_per_s"] > 0 for r in rows.values())
    assert rows["fp32", "plain"]["step_vs_fp32"] == 1.0
    assert report["mq_knn"]["pairs_per_s"] > 0 and report["mq_knn"]["values"] == 192
    assert [r["precision"] for r in report["fid_features"]] == ["fp32", "bf16"]
    assert set(report["section_seconds"]) == {"preset_round", "steps", "mq_knn", "fid_features"}
