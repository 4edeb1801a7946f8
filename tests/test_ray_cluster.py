"""A simulation on a Ray cluster started with `ray start`: which cluster a run joins, the settings that
must then stay unset, and one real run that joins a one-machine cluster this test starts and stops."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import iet_agc_run

from iet_agc.cli import build_parser, main
from iet_agc.ray_cluster import ADDRESS_VAR, address_file, check_federation, cluster_to_join
from iet_agc.run import prepare_run

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listening():
    """``host:port`` where something accepts connections (a stand-in for a cluster's GCS)."""
    server = socket.create_server(("127.0.0.1", 0))
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_the_cluster_to_join_follows_rays_rule(tmp_path):
    base = {"RAY_TMPDIR": str(tmp_path)}
    assert cluster_to_join(base) is None  # no RAY_ADDRESS, no `ray start`: a private instance
    address_file(base).parent.mkdir()
    address_file(base).write_text("10.0.0.5:6379\n")  # what `ray start --head` writes
    found = cluster_to_join(base)
    assert (found.address, found.source) == ("10.0.0.5:6379", str(tmp_path / "ray" / "ray_current_cluster"))
    assert cluster_to_join({**base, ADDRESS_VAR: "10.0.0.7:6379"}).address == "10.0.0.7:6379"  # RAY_ADDRESS wins
    assert cluster_to_join({**base, ADDRESS_VAR: "local"}) is None  # Ray's word for a private instance
    assert address_file({}) == Path("/tmp/ray/ray_current_cluster")  # `ray start`'s default, on Linux and macOS
    if sys.platform.startswith("linux"):
        assert address_file({"TMPDIR": "/x"}) == Path("/x/ray/ray_current_cluster")


def test_init_args_sizes_are_refused_when_joining_and_kept_otherwise(listening):
    joining = {ADDRESS_VAR: listening}
    for key in ("init-args-num-cpus", "init-args-num-gpus"):
        with pytest.raises(ValueError, match=rf"^--federation-config: {key}: must be unset when .* {listening}"):
            check_federation({"num-supernodes": 2, key: 2}, joining)
    assert check_federation({"client-resources-num-cpus": 2}, joining).address == listening
    assert check_federation({"init-args-num-cpus": 2}, {ADDRESS_VAR: "local"}) is None  # a private instance: its size


def test_a_cluster_that_does_not_answer_is_refused_naming_where_its_address_came_from(tmp_path):
    with pytest.raises(ValueError, match=rf"^{ADDRESS_VAR}: no Ray cluster answers at 127.0.0.1:{(p := _free_port())}"):
        check_federation({}, {ADDRESS_VAR: f"127.0.0.1:{p}"})
    env = {"RAY_TMPDIR": str(tmp_path), ADDRESS_VAR: ""}
    address_file(env).parent.mkdir()
    address_file(env).write_text(f"127.0.0.1:{p}")  # a cluster that died without `ray stop`
    with pytest.raises(ValueError, match=rf"^{address_file(env)}: no Ray cluster answers"):
        check_federation({}, env)


def test_iet_agc_run_exits_2_before_submitting(monkeypatch, listening, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(ADDRESS_VAR, listening)
    code = main(["run", "--federation-config", "init-args-num-cpus=4", "-c", "num-rounds=1"])
    err = capsys.readouterr().err
    assert code == 2 and "iet-agc run: error: --federation-config: init-args-num-cpus: must be unset" in err
    args, _ = build_parser().parse_known_args(["run", "--supernodes", "3"])
    assert "num-supernodes=3" in prepare_run(args)[-1]  # no size key: accepted, and it says so
    assert f"joins the Ray cluster at {listening} (from {ADDRESS_VAR})" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_superlink_with_another_ray_address_is_stale(tmp_path, monkeypatch):
    from iet_agc.run import ENV_FLAG, _stale_superlinks

    fake = tmp_path / "bin" / "flower-superlink"  # a stand-in SuperLink of "our" environment (below)
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(60)\n")
    base = {k: v for k, v in os.environ.items() if k != ADDRESS_VAR} | {ENV_FLAG: "1"}
    addresses = [None, "x:1", "10.0.0.5:6379"]
    procs = [
        subprocess.Popen([sys.executable, str(fake), "--simulation"], env=base | ({ADDRESS_VAR: a} if a else {}))
        for a in addresses
    ]
    monkeypatch.setattr(sys, "executable", str(fake.parent / "python"))  # ours: the fake's folder
    monkeypatch.setenv(ADDRESS_VAR, "10.0.0.5:6379")
    try:
        deadline = time.monotonic() + 60  # generous: the loop ends as soon as all are seen
        while time.monotonic() < deadline:
            stale = _stale_superlinks()
            if all(p.pid in stale for p in procs[:2]):
                break
            time.sleep(0.1)
        assert stale[procs[0].pid] == "it was started with RAY_ADDRESS=(unset), this command has 10.0.0.5:6379"
        assert "started with RAY_ADDRESS=x:1" in stale[procs[1].pid]
        assert procs[2].pid not in stale  # the same cluster: kept
    finally:
        for p in procs:
            p.kill()


# ---- a real run on a one-machine cluster ------------------------------------------------------


def _cluster_processes(temp: Path, sid: int) -> list[psutil.Process]:
    """The cluster's processes: those of the session ``ray start`` ran in (its daemons do not leave
    it), those naming its temp folder, and everything they started (the raylet's workers)."""
    roots = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getsid(proc.pid) == sid or any(str(temp) in part for part in proc.cmdline()):
                roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    return [p for p in found.values() if p.pid != os.getpid()]


def _stop_cluster(temp: Path, sid: int) -> list[psutil.Process]:
    """End this test's cluster only (``ray stop`` would end every Ray process on the machine):
    SIGTERM, then SIGKILL after 5 s; returns what was still there after that."""
    procs = _cluster_processes(temp, sid)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p for p in _cluster_processes(temp, sid) if p.is_running()]


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-machine Ray cluster (`ray start --head` on a free port, 2 CPUs, its own temp folder and
    cache folder), stopped after the test: (address, temp folder, the cluster's XDG_CACHE_HOME, the
    session id its processes share)."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray is None:
        pytest.skip("the `ray` CLI is not installed (it comes with flwr[simulation])")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    cache = tmp_path / "cluster-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_"))} | {"XDG_CACHE_HOME": str(cache)}
    port = _free_port()
    cmd = [ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0"]
    cmd += [f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"]
    cmd += ["--object-store-memory=80000000"]  # 80 MB of shared memory, not 30 % of the machine's
    # ports that default to fixed numbers, free ones here: another Ray on this machine may hold those
    cmd += [f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"]
    log = tmp_path / "ray-start.log"  # a file, not a pipe: the daemons it leaves behind may hold a pipe open
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(timeout=120) == 0, log.read_text(errors="replace")[-3000:]
        yield f"127.0.0.1:{port}", temp, cache, proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
        left = _stop_cluster(temp, proc.pid)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"cluster processes left: {[p.pid for p in left]}"


def test_a_run_joins_a_cluster_started_with_ray_start(ray_cluster, fresh_shell, tmp_path):
    address, temp, cluster_cache, sid = ray_cluster
    out = tmp_path / "runs"
    config = (
        "train-size=40 num-shards=2 num-rounds=1 local-epochs=1 batch-size=16 eval-num-images=20 sample-steps=2 "
        f'mq-neighbours=5 fid=false out-dir="{out}"'
    )
    env = {**fresh_shell, ADDRESS_VAR: address}
    log = iet_agc_run("--run-config", config, env=env)
    assert f"joins the Ray cluster at {address} (from {ADDRESS_VAR})" in log
    assert "round 1/1: loss" in log and "done in" in log
    # The ClientApps ran in the cluster's workers: Ray named their actors in the cluster's own logs,
    # and they kept shard state where the cluster's environment says (`ray start` had XDG_CACHE_HOME
    # = cluster-cache), not where the run's does (a private Ray's workers inherit the run's environment).
    logs = [p for p in temp.glob("session_*/logs/**/*") if p.suffix in (".out", ".err")]
    assert any(":actor_name:ClientAppActor" in p.read_text(errors="replace") for p in logs), logs
    assert list((cluster_cache / "iet-agc" / "state").rglob("*")), "no shard state in the cluster's cache"
    assert not (Path(fresh_shell["XDG_CACHE_HOME"]) / "iet-agc" / "state").exists()
    with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=3):
        pass  # the run left the user's cluster running, and its actors ended with its driver:
    deadline = time.monotonic() + 30
    while (actors := _actors(temp, sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not actors, actors


def _actors(temp: Path, sid: int) -> list[str]:
    """The cluster's ClientApp actors still alive (Ray titles an actor's process ``ray::ClassName``)."""
    titles = []
    for proc in _cluster_processes(temp, sid):
        with contextlib.suppress(psutil.Error):
            if (title := " ".join(proc.cmdline())).startswith("ray::ClientAppActor"):
                titles.append(f"{proc.pid} {title}")
    return titles
