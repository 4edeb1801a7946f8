"""A real Flower deployment on localhost, each part in its own process as on its own machine.

The operator kit (``python -m deploy.kit``) makes the CA, the SuperLink's certificate and the
SuperNodes' keys; a SuperLink runs with TLS, SuperNode authentication and a database; two
registered SuperNodes (each with its own node-config and state-dir) train, an unregistered one is
refused; the user's ``flwr run`` goes through a ``[superlink.NAME]`` connection over TLS. A second
test kills one SuperNode during a round: the run completes on the other, no sample id lost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import newcomer_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = (
    "train-size=80 num-shards=2 num-rounds=2 local-epochs=1 batch-size=16 eval-every=0 eval-num-images=20 "
    "sample-steps=2 mq-neighbours=5 fid=false min-nodes=2 round-timeout=300.0"
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, localhost ports")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Machines:
    """Processes started in their own session; all of them (and their children) end with the test."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd, cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-3000:]}" for n in self.procs)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs.values():
                try:
                    os.killpg(proc.pid, sig)  # the whole group: SuperExec, ServerApp, ClientApps
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass


@pytest.fixture
def machines(tmp_path):
    m = Machines(tmp_path)
    try:
        yield m
    finally:
        m.stop()


def wait_for(cond, timeout: float, what: str, machines: Machines) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        link = machines.procs.get("superlink")
        if link is not None and link.poll() is not None:  # e.g. stopped by a test that stops every SuperLink
            raise AssertionError(
                f"the SuperLink exited ({link.returncode}) while waiting for {what}\n{machines.logs()}"
            )
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{machines.logs()}")


def deploy(tmp_path: Path, machines: Machines, nodes: tuple[str, ...], rogue: bool) -> tuple[dict, dict[str, int]]:
    """The README's steps 0-3 on localhost; returns the user's environment and the registered node ids."""
    port, *node_ports = free_ports(1 + len(nodes) + rogue)
    certs = tmp_path / "certs"
    base = newcomer_env(tmp_path)
    base["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"

    # 0. the operator kit: CA, SuperLink certificate (SAN localhost + 127.0.0.1), node key pairs
    kit = [sys.executable, "-m", "deploy.kit", str(certs), "--host", "localhost", "--ip", "127.0.0.1"]
    kit += [a for n in nodes + ("rogue",) * rogue for a in ("--node", n)] + ["--port", str(port)]
    made = subprocess.run(kit, cwd=ROOT, env=base, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert "--auth-supernode-private-key" in made.stdout and "flwr supernode register" in made.stdout
    assert (certs / "nodes" / f"{nodes[0]}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = subprocess.run(kit, cwd=ROOT, env=base, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr  # keys are never replaced

    # 1. the SuperLink machine: TLS, SuperNode authentication, state in a database
    machines.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
        + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt")]
        + ["--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth"]
        + ["--database", str(tmp_path / "superlink.db"), "--disable-runtime-dependency-installation"],
        {**base, "FLWR_HOME": str(tmp_path / "superlink-home")},
    )
    wait_for(lambda: "Uvicorn running on https" in machines.log("superlink"), 60, "the SuperLink", machines)

    # 2. the user's machine: a TLS connection in $FLWR_HOME/config.toml, the nodes registered
    user = {**base, "FLWR_HOME": str(tmp_path / "user-home")}
    Path(user["FLWR_HOME"]).mkdir()
    (Path(user["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink.lab]\naddress = "localhost:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    registered = {}
    for node in nodes:
        reg = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(certs / "nodes" / f"{node}.pub"), "lab"]
            + ["--format", "json"],
            cwd=tmp_path,
            env=user,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reg.returncode == 0, reg.stdout + reg.stderr
        registered[node] = int(json.loads(reg.stdout[reg.stdout.index("{") :])["node-id"])

    # 3. the node machines (each its own runtime API port, node-config and state-dir); "rogue" is unregistered
    for node, node_port in zip(nodes + ("rogue",) * rogue, node_ports, strict=True):
        state = tmp_path / node / "state"
        machines.start(
            node,
            [str(BIN / "flower-supernode"), "--superlink", f"localhost:{port}"]
            + ["--root-certificates", str(certs / "ca.crt")]
            + ["--auth-supernode-private-key", str(certs / "nodes" / f"{node}.key")]
            + ["--port", str(node_port), "--max-retries", "5"]
            + ["--node-config", f"device='cpu' state-dir='{state}'"],
            {**base, "FLWR_HOME": str(tmp_path / node / "home")},
        )
    return user, registered


def flwr_run(user: dict, config: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), "run", ".", "lab", "--stream", "--run-config", config],
        cwd=ROOT,
        env=user,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_partitions(folder: Path, rounds: int, size: int) -> None:
    """After every round the shards form an exact partition of the training set: no id lost or doubled."""
    assignments = pd.read_csv(folder / "assignments.csv")
    for r in range(1, rounds + 1):
        ids = assignments.loc[assignments["round"] == r, "sample_id"].tolist()
        assert sorted(ids) == list(range(size)), f"round {r}: ids lost or duplicated"


def test_tls_authenticated_deployment_on_localhost(tmp_path, machines):
    user, registered = deploy(tmp_path, machines, ("n1", "n2"), rogue=True)

    # the unregistered node is refused and stops: it never gets a node id, so it never trains
    rogue = machines.procs["rogue"]
    wait_for(lambda: rogue.poll() is not None, 90, "the unregistered SuperNode to be refused", machines)
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in machines.log("rogue"), machines.log("rogue")
    assert "SuperNode ID:" not in machines.log("rogue")

    # 4. a tiny run through the TLS connection; the ServerApp writes its run folder on the SuperLink side
    out = tmp_path / "runs"
    run = flwr_run(user, f"{CONFIG} out-dir='{out}'")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:] + machines.logs()
    assert "done in" in log, log[-3000:] + machines.logs()
    assert "Installing application dependencies" not in log + machines.log("superlink")

    (folder,) = out.iterdir()
    rounds = pd.read_csv(folder / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2] and rounds["replies"].tolist() == [2, 2]
    assert rounds["mq_0.5"].notna().iloc[-1]  # evaluated after the last round
    shards = pd.read_csv(folder / "shards.csv", dtype={"node": str})  # node ids are uint64
    assert {int(n) for n in shards["node"]} == set(registered.values())  # both registered nodes, no other
    assert_partitions(folder, 2, 80)
    for node in ("n1", "n2"):
        assert any((tmp_path / node / "state").rglob("*")), f"{node} kept no shard state"
        assert f"SuperNode ID: {registered[node]}" in machines.log(node)
    assert not (tmp_path / "rogue" / "state").exists()


def test_run_completes_when_a_node_dies_mid_round(tmp_path, machines):
    """SIGKILL one SuperNode (and its ClientApp) during round 2: the run ends on the other node, no id lost."""
    user, registered = deploy(tmp_path, machines, ("n1", "n2"), rogue=False)
    out = tmp_path / "runs"
    config = CONFIG.replace("num-rounds=2", "num-rounds=3").replace("round-timeout=300.0", "round-timeout=60.0")

    def flwr(*args: str) -> dict:
        proc = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"], cwd=ROOT, env=user, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout[proc.stdout.index("{") :])

    def online() -> set[int]:
        res = flwr("supernode", "ls", "lab")
        return {int(n["node-id"]) for n in res.get("nodes", []) if n["status"] == "online"}

    # min-nodes=2 is awaited before round 1 only: the run goes on when a node dies later
    wait_for(lambda: online() >= set(registered.values()), 90, "both nodes online", machines)
    # submitted without --stream: this test follows the run through `flwr ls` and the run folder
    run_id = flwr("run", ".", "lab", "--run-config", f"{config} out-dir='{out}' node-max-failures=1")["run-id"]

    def rounds_done() -> int:
        f = next(out.glob("*/rounds.csv"), None)
        return 0 if f is None else len(f.read_text().splitlines()) - 1

    wait_for(lambda: rounds_done() >= 1, 240, "round 1", machines)
    time.sleep(3)  # round 2 has been sent to both nodes
    os.killpg(machines.procs["n2"].pid, signal.SIGKILL)

    def status() -> str:  # `flwr ls --format json` exits 0 also when it fails: read "success"
        res = flwr("ls", "lab", "--run-id", str(run_id))
        return res["runs"][0]["status"] if res.get("success") else f"error: {res}"

    try:
        wait_for(lambda: status().startswith("finished"), 300, "the run to finish", machines)
    except AssertionError as err:  # add the ServerApp's own log (kept by the SuperLink)
        show = subprocess.run(
            [str(BIN / "flwr"), "log", str(run_id), "lab", "--show"], cwd=ROOT, env=user, capture_output=True, text=True
        )
        raise AssertionError(f"{err}\n--- ServerApp ---\n{show.stdout[-6000:]}") from None
    assert status() == "finished:completed", status() + machines.logs()
    (folder,) = out.iterdir()
    rounds = pd.read_csv(folder / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2, 3]
    assert rounds["replies"].tolist()[0] == 2 and all(r >= 1 for r in rounds["replies"])
    assert rounds["mq_0.5"].notna().iloc[-1]
    assert_partitions(folder, 3, 80)
    shards = pd.read_csv(folder / "shards.csv", dtype={"node": str})
    late = {int(n) for n in shards.loc[shards["round"] == 3, "node"]}
    assert late == {registered["n1"]}, shards  # the last round trained on the surviving node only
