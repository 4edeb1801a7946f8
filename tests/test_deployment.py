"""A real Flower deployment on localhost, each part in its own process as on its own machine.

The operator kit (``python -m deploy.kit``) makes the CA, the SuperLink's certificate and the
SuperNodes' keys; a SuperLink runs with TLS, SuperNode authentication and a database; two
registered SuperNodes (each with its own node-config and state-dir) train, an unregistered one is
refused; the user's ``flwr run`` goes through a ``[superlink.NAME]`` connection over TLS. A second
test kills one SuperNode during a round: the run completes on the other, no sample id lost.

Timing: a round here is a fresh ``flwr-clientapp`` process per message (~30-45 s on a 2-core CPU),
so every deadline is generous (several times that, for CPUs twice as slow and busy) and the tests
wait for the events they need (a log line, a file, a status), never for a fixed time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from deploy import localhost
from deploy.localhost import BIN, ROOT, Machines, flwr_json, online, wait_for
from tests.conftest import newcomer_env

CONFIG = (
    "train-size=80 num-shards=2 num-rounds=2 local-epochs=1 batch-size=16 eval-every=0 eval-num-images=20 "
    "sample-steps=2 mq-neighbours=5 fid=false min-nodes=2 round-timeout=300.0"
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, localhost ports")


@pytest.fixture
def machines(tmp_path):
    with Machines(tmp_path) as m:
        yield m


def deploy(tmp_path: Path, machines: Machines, nodes: tuple[str, ...], rogue: bool) -> tuple[dict, dict[str, int]]:
    """README steps 0-3 (``deploy.localhost``), plus what the kit must never do: overwrite keys."""
    user, registered = localhost.deploy(tmp_path, machines, nodes, newcomer_env(tmp_path), rogue=rogue)
    certs, printed = tmp_path / "certs", (tmp_path / "kit.log").read_text()
    assert "--auth-supernode-private-key" in printed and "flwr supernode register" in printed
    assert (certs / "nodes" / f"{nodes[0]}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    kit = [sys.executable, "-m", "deploy.kit", str(certs), "--host", "localhost", "--node", nodes[0]]
    again = subprocess.run(kit, cwd=ROOT, env=user, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr  # keys are never replaced
    return user, registered


def flwr_run(user: dict, config: str, timeout: float = 900) -> subprocess.CompletedProcess:
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
    wait_for(lambda: rogue.poll() is not None, 300, "the unregistered SuperNode to be refused", machines)
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
    # round-timeout stays 300 s: the dead node's message ends earlier, with the error reply the
    # SuperLink gives once the node's heartbeats stop (Flower 1.41: 2 x 30 s)
    config = CONFIG.replace("num-rounds=2", "num-rounds=3")

    def flwr(*args: str) -> dict:
        return flwr_json(user, *args)

    # min-nodes=2 is awaited before round 1 only: the run goes on when a node dies later
    wait_for(lambda: online(user) >= set(registered.values()), 300, "both nodes online", machines)
    # submitted without --stream: this test follows the run through `flwr ls` and the run folder
    run_id = flwr("run", ".", "lab", "--run-config", f"{config} out-dir='{out}' node-max-failures=1")["run-id"]

    def rounds_done() -> int:
        f = next(out.glob("*/rounds.csv"), None)
        return 0 if f is None else len(f.read_text().splitlines()) - 1

    wait_for(lambda: rounds_done() >= 1, 600, "round 1", machines)
    # n2 has pulled its round-2 message (one message per node and round): kill it mid-round
    wait_for(lambda: machines.log("n2").count("Receiving: train message") >= 2, 600, "n2's round-2 message", machines)
    machines.kill("n2")

    def status() -> str:  # `flwr ls --format json` exits 0 also when it fails: read "success"
        res = flwr("ls", "lab", "--run-id", str(run_id))
        return res["runs"][0]["status"] if res.get("success") else f"error: {res}"

    try:
        wait_for(lambda: status().startswith("finished"), 1200, "the run to finish", machines)
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
