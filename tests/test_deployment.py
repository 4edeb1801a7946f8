"""A real Flower deployment on localhost through the front door, each part in its own process as
on its own machine: what the README's deployment section has users run.

The operator kit (``python -m deploy.kit``) makes the CA, the SuperLink's certificate, the
SuperNodes' keys and nginx's configuration, and never overwrites a key; a SuperLink runs on the
loopback with TLS, SuperNode authentication and a database; a real nginx ends TLS on the public
port and passes only the Fleet API. Then, in one run:

- a ``flwr run`` sent to the public port is refused by nginx (403) and nothing runs;
- the node with an unregistered key, connecting through the door, is refused and never trains;
- the two registered nodes (each with its own node-config and state-dir) train through the door,
  more shards than nodes (a node's shards of a round in one message), over three rounds,
  submitted through the loopback (where the operator's SSH tunnel ends);
- one node is killed (SIGKILL) during the last round: Flower answers its messages with "Node
  Unavailable" once its heartbeats stop (2 x 30 s), its shards keep their samples, the run
  completes on the other node and no sample id is lost in any round.

Timing: each message is a fresh ``flwr-clientapp`` process (15-70 s on a 2-core CPU, shared), so
every deadline is generous and the test waits for the events it needs (a log line, a file, a
status), never for a fixed time. The refusals are checked while the ServerApp starts and round 1
runs; the node dies in the last round, where the heartbeat wait overlaps the survivor's work (a
death in round 2 would leave round 3 all shards on one node, one after another: about 2.5 min
more here). That a set-aside node's shards move and train elsewhere is
``tests/test_strategy.py::test_a_failing_node_is_set_aside_and_its_shards_train_elsewhere``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from deploy import localhost
from deploy.localhost import BIN, ROOT, Machines, flwr_json, wait_for
from tests.conftest import newcomer_env

NODES = ("n1", "n2")  # registered; "rogue" joins them with a key nobody registered
SETTINGS = {  # the run: more shards than nodes, three rounds; add a key here to grow it
    "train-size": 81,
    "num-shards": 3,
    "num-rounds": 3,
    "local-epochs": 1,
    "batch-size": 16,
    "eval-every": 0,  # evaluated after the last round only
    "eval-num-images": 20,
    "sample-steps": 2,
    "mq-neighbours": 5,
    "fid": False,
    "min-nodes": 2,  # awaited before round 1 only: the run goes on when a node dies later
    "round-timeout": 300.0,  # the dead node's messages end earlier, with the SuperLink's error reply
    "shards-per-message": 0,  # a node's shards of the round in one message (README's deployment runs)
}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, localhost ports")


def run_config(settings: dict) -> str:
    """``key=value`` pairs for ``flwr run --run-config`` (strings quoted, booleans in TOML's words)."""

    def value(v) -> str:
        return str(v).lower() if isinstance(v, bool) else f"'{v}'" if isinstance(v, str) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in settings.items())


@pytest.fixture
def machines(tmp_path):
    with Machines(tmp_path) as m:
        yield m


def deploy(tmp_path: Path, machines: Machines) -> tuple[dict, dict[str, int]]:
    """README steps 0-3 with the front door (``deploy.localhost``), plus what the kit must never
    do: overwrite keys."""
    user, registered = localhost.deploy(tmp_path, machines, NODES, newcomer_env(tmp_path), rogue=True, front_door=True)
    certs, printed = tmp_path / "certs", (tmp_path / "kit.log").read_text()
    assert "--auth-supernode-private-key" in printed and "flwr supernode register" in printed
    assert "Front door (nginx" in printed and "ssh -N -L" in printed
    assert (certs / "nodes" / f"{NODES[0]}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    kit = [sys.executable, "-m", "deploy.kit", str(certs), "--host", "localhost", "--node", NODES[0]]
    again = subprocess.run(kit, cwd=ROOT, env=user, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr  # keys are never replaced
    return user, registered


def flwr(user: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=user, capture_output=True, text=True, timeout=300)


def run_ids(user: dict) -> list[int]:
    """The runs the SuperLink holds, asked through the loopback (``flwr ls lab``)."""
    res = flwr_json(user, "ls", "lab")
    assert res.get("success", True), res
    return [int(r["run-id"]) for r in res.get("runs", [])]


def assert_partitions(folder: Path, rounds: int, size: int) -> None:
    """After every round the shards form an exact partition of the training set: no id lost or doubled."""
    assignments = pd.read_csv(folder / "assignments.csv")
    for r in range(1, rounds + 1):
        ids = assignments.loc[assignments["round"] == r, "sample_id"].tolist()
        assert sorted(ids) == list(range(size)), f"round {r}: ids lost or duplicated"


def refusals(user: dict, machines: Machines, config: str) -> None:
    """A run sent to the public port is refused by nginx and nothing runs; the unregistered node,
    coming through the door, is refused and stops without a node id (so it never trains)."""
    sent = flwr(user, "run", ".", "public", "--run-config", config)
    said = sent.stdout + sent.stderr
    assert sent.returncode != 0 and "403 Forbidden" in said and "/v1/control/start-run" in said, said
    assert len(run_ids(user)) == 1  # only the run submitted on the loopback: the SuperLink never saw it
    rogue = machines.procs["rogue"]
    wait_for(lambda: rogue.poll() is not None, 300, "the unregistered SuperNode to be refused", machines)
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in machines.log("rogue"), machines.log("rogue")
    assert "SuperNode ID:" not in machines.log("rogue")


def follow(user: dict, machines: Machines, run_id: int, out: Path) -> None:
    """Kill n2 once it has a message of the last round, then wait for the run to end."""

    def rounds_done() -> int:
        f = next(out.glob("*/rounds.csv"), None)
        return 0 if f is None else len(f.read_text().splitlines()) - 1

    def received() -> int:
        return machines.log("n2").count("Receiving: train message")

    last = SETTINGS["num-rounds"]
    wait_for(lambda: rounds_done() >= last - 1, 900, f"round {last - 1}", machines)
    before = received()  # the last round's messages are made after the one before is recorded
    wait_for(lambda: received() > before, 600, f"n2's round-{last} message", machines)
    machines.kill("n2")

    def status() -> str:  # `flwr ls --format json` exits 0 also when it fails: read "success"
        res = flwr_json(user, "ls", "lab", "--run-id", str(run_id))
        return res["runs"][0]["status"] if res.get("success") else f"error: {res}"

    try:
        wait_for(lambda: status().startswith("finished"), 1200, "the run to finish", machines)
    except AssertionError as err:  # add the ServerApp's own log (kept by the SuperLink)
        show = flwr(user, "log", str(run_id), "lab", "--show")
        raise AssertionError(f"{err}\n--- ServerApp ---\n{show.stdout[-6000:]}") from None
    assert status() == "finished:completed", status() + machines.logs()


def test_a_deployment_through_the_front_door(tmp_path, machines, nginx):
    user, registered = deploy(tmp_path, machines)
    out = tmp_path / "runs"
    config = run_config({**SETTINGS, "out-dir": str(out)})
    # 4. submitted through the loopback (the operator's tunnel) without --stream: followed by
    # `flwr ls`; the ServerApp waits for min-nodes=2 before round 1
    run_id = int(flwr_json(user, "run", ".", "lab", "--run-config", config)["run-id"])
    refusals(user, machines, config)
    follow(user, machines, run_id, out)
    assert run_ids(user) == [run_id]  # the refused submission never became a run
    assert "Installing application dependencies" not in machines.log("superlink")

    (folder,) = out.iterdir()
    size, shards = SETTINGS["train-size"], SETTINGS["num-shards"]
    rounds = pd.read_csv(folder / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2, 3]
    assert rounds["replies"].tolist()[:2] == [shards, shards]
    assert rounds["mq_0.5"].notna().iloc[-1]  # evaluated after the last round
    assert_partitions(folder, 3, size)
    trained = pd.read_csv(folder / "shards.csv", dtype={"node": str})  # node ids are uint64
    first = {int(n) for n in trained.loc[trained["round"] == 1, "node"]}
    assert first == set(registered.values())  # both registered nodes, no other
    late = {int(n) for n in trained.loc[trained["round"] == 3, "node"]}
    assert late == {registered["n1"]}, trained  # the dead node's shards of round 3 never replied
    dropped = pd.read_csv(folder / "dropped.csv", dtype={"node": str})
    assert {int(n) for n in dropped["node"]} == {registered["n2"]}, dropped
    assert set(dropped["round"]) == {3} and dropped["reason"].str.contains("Node Unavailable").all(), dropped
    assert rounds["replies"].iloc[2] == shards - len(dropped) >= 1
    packed = [n for n in NODES if "trained shards [" in machines.log(n)]  # 3 shards on 2 nodes: one gets 2
    assert packed and "in one message" in machines.log(packed[0]), machines.logs()
    for node in NODES:
        assert any((tmp_path / node / "state").rglob("*")), f"{node} kept no shard state"
        assert f"SuperNode ID: {registered[node]}" in machines.log(node)
    assert not (tmp_path / "rogue" / "state").exists()

    # the nodes came through the door; every Control API call that came there was refused
    door = (tmp_path / "certs" / "frontdoor" / "access.log").read_text().splitlines()
    assert any('"POST /v1/fleet/push-messages HTTP/1.1" 200' in line for line in door)
    control = [line for line in door if "/v1/control/" in line]
    assert control and all('" 403 ' in line for line in control), control
