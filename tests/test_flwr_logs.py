"""What a user sees in `flwr run --stream`: the strategy's waits and drops, progress lines, curves.

Real `flwr run` / `iet-agc run` subprocesses on the local simulation SuperLink, in a fresh FLWR_HOME.
"""

import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from conftest import TINY_RUN, iet_agc_run

from iet_agc.run import ENV_FLAG

ROOT = Path(__file__).resolve().parents[1]
FAULTY_CLIENT = '''
"""A ClientApp whose shard 0 always fails: the reply Flower sends back carries the error."""
from flwr.clientapp import ClientApp

from fl_app.client_app import make_client_app

inner = make_client_app()
app = ClientApp()


@app.train()
def train(msg, context):
    if int(msg.content["config"]["shard"]) == 0:
        raise RuntimeError("test fault: shard 0 refuses to train")
    return inner(msg, context)
'''


def _pairs(values: dict) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read by a thread (None at the end), so a test can wait with a deadline."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_waiting_for_nodes_is_printed_in_the_stream(fresh_shell, tmp_path):
    """min-nodes above the connected nodes: the ServerApp's wait shows in `flwr run --stream`."""
    config = _pairs({**TINY_RUN, "min-nodes": 2, "out-dir": f"'{tmp_path / 'runs'}'"})
    env = {**fresh_shell, ENV_FLAG: "1"}
    cmd = ["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=1", "--run-config", config]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seen, run_id = _lines(proc), [], None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            run_id = run_id or (m := re.search(r"started run (\d+)", line)) and m.group(1)
            if "waiting for nodes: 1 connected, 2 required" in line:
                break
        log = "".join(seen)
        assert "waiting for nodes: 1 connected, 2 required" in log, log[-3000:]
        assert re.search(r"INFO\S*\s*:\s+waiting for nodes", re.sub(r"\x1b\[[0-9;]*m", "", log))  # Flower's format
    finally:
        if run_id:
            subprocess.run(["flwr", "stop", run_id], cwd=ROOT, env=env, capture_output=True, timeout=60)
        proc.terminate()
        proc.wait(timeout=30)


def test_dropped_reply_reason_and_progress_lines_in_the_stream(fresh_shell, tmp_path):
    """A node's failure is printed with its reason; long work (here: anything over 0.01 s) logs
    progress lines from the ServerApp and from the ClientApps; the run folder has its curves."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    text = (app / "pyproject.toml").read_text().replace('"fl_app.client_app:app"', '"faulty_client:app"')
    (app / "pyproject.toml").write_text(text)
    (app / "faulty_client.py").write_text(FAULTY_CLIENT)
    out = tmp_path / "runs"
    config = _pairs({**TINY_RUN, "num-shards": 2, "num-rounds": 1, "out-dir": f"'{out}'"})
    env = {**fresh_shell, "IET_AGC_PROGRESS_SECONDS": "0.01"}
    log = iet_agc_run(str(app), "--run-config", config, env=env, cwd=tmp_path)
    assert re.search(r"round 1: dropped a reply from node \d+ \(shard 0\): error reply: .*test fault: shard 0", log), (
        log[-4000:]
    )
    assert "round 1/1: loss" in log and ", 1 dropped, 0 timed out" in log  # the summary line says so too
    assert re.search(r"shard 1, round 1: local training: \d+/\d+ step", log), log[-4000:]  # a ClientApp's line
    assert re.search(r"DDIM sampling \(4 steps\): \d+/60 img", log), log[-4000:]  # the ServerApp's evaluation
    (run,) = out.iterdir()
    assert (run / "curves.png").is_file() and "![curves](curves.png)" in (run / "report.md").read_text()
