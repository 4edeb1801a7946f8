"""A whole deployment on one machine, each part in its own process as on its own machine.

The README's deployment steps, scripted: the operator kit makes the CA, the SuperLink's
certificate and the node keys; a SuperLink runs with TLS, SuperNode authentication and a
database; the user's Flower config gets a TLS connection and registers the nodes; each SuperNode
runs with its own key, runtime port, node-config and state folder (``--isolation process`` adds
one ``flower-superexec`` per node). With ``front_door`` the kit also writes nginx's
configuration and a real nginx (``deploy.frontdoor``) ends TLS on the public port in front of a
SuperLink on the loopback: the nodes connect to nginx, the user's ``lab`` connection goes to the
SuperLink's loopback port (where an operator's SSH tunnel ends) and a second connection,
``public``, to nginx (it must be refused). Used by ``tests/test_deployment.py`` and
``scripts/bench_deployment.py``; every process started here ends with ``Machines.stop``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from deploy.frontdoor import nginx_binary

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ISOLATION_MODES = ("subprocess", "process")


def free_ports(n: int) -> list[int]:
    """``n`` distinct localhost ports that are free now."""
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
    """Processes started in their own session, logging to ``<folder>/<name>.log``; ``stop`` ends
    all of them and their children (SuperExec, ServerApp, ClientApps)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: Mapping[str, str]) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd, cwd=self.folder, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-3000:]}" for n in self.procs)

    def kill(self, name: str) -> None:
        """SIGKILL one machine's process group, as when that machine dies."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs.values():
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    def __enter__(self) -> Machines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, machines: Machines) -> None:
    """Poll ``cond`` until true; on timeout (or the SuperLink exiting) raise with every log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        link = machines.procs.get("superlink")
        if link is not None and link.poll() is not None:
            raise AssertionError(
                f"the SuperLink exited ({link.returncode}) while waiting for {what}\n{machines.logs()}"
            )
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{machines.logs()}")


def deploy(
    folder: Path,
    machines: Machines,
    nodes: tuple[str, ...],
    base_env: Mapping[str, str],
    *,
    rogue: bool = False,
    isolation: str = "subprocess",
    node_config: str = "device='cpu'",
    node_env: Mapping[str, str] | None = None,
    front_door: bool = False,
) -> tuple[dict[str, str], dict[str, int]]:
    """README steps 0-3 on localhost; returns the user's environment (``flwr run . lab`` works in
    it) and the registered node ids. ``rogue`` adds a node with an unregistered key; ``node_env``
    is added to the nodes' environment (e.g. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``);
    ``front_door`` puts nginx in front of the SuperLink (``public`` is then the user's connection
    to nginx, ``lab`` the SuperLink's loopback port)."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation: must be one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
    nginx = nginx_binary() if front_door else None
    if front_door and nginx is None:
        raise RuntimeError("front_door: no nginx on PATH nor /usr/sbin/nginx (Debian: apt-get install nginx)")
    link, *node_ports = free_ports(1 + front_door + len(nodes) + rogue)
    public = node_ports.pop() if front_door else link  # where the nodes connect
    base = {**base_env, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # Flower starts flower-superexec, flwr-clientapp
    started = nodes + ("rogue",) * rogue  # "rogue" gets a key but is never registered
    certs = operator_kit(folder, started, public, base, link if front_door else None)
    start_superlink(folder, machines, link, certs, base)
    if nginx is not None:
        start_front_door(machines, nginx, certs, public, base)
    user, registered = user_connection(folder, nodes, link, certs, base, public if front_door else None)
    for node, node_port in zip(started, node_ports, strict=True):
        env = {**base, **(node_env or {})}
        start_node(folder, machines, node, node_port, public, certs, env, isolation, node_config)
    return user, registered


def operator_kit(
    folder: Path, nodes: tuple[str, ...], port: int, env: Mapping[str, str], superlink_port: int | None = None
) -> Path:
    """README step 0, the operator kit: CA, SuperLink certificate (SAN localhost + 127.0.0.1), one
    key pair per node, and with ``superlink_port`` the front door's nginx configuration (nginx on
    127.0.0.1:``port``); returns the certificates' folder (what it printed is in ``kit.log``)."""
    certs = folder / "certs"
    kit = [sys.executable, "-m", "deploy.kit", str(certs), "--host", "localhost", "--ip", "127.0.0.1"]
    kit += [a for n in nodes for a in ("--node", n)] + ["--port", str(port)]
    if superlink_port is not None:
        kit += ["--front-door", "--superlink-port", str(superlink_port), "--listen", "127.0.0.1"]
    made = subprocess.run(kit, cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=60)
    (folder / "kit.log").write_text(made.stdout + made.stderr)  # which file goes where, as printed
    if made.returncode:
        raise RuntimeError(f"deploy.kit failed: {made.stderr}")
    return certs


def start_superlink(folder: Path, machines: Machines, port: int, certs: Path, env: Mapping[str, str]) -> None:
    """README step 1, the SuperLink machine: TLS, SuperNode authentication, state in a database."""
    machines.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
        + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt")]
        + ["--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth"]
        + ["--database", str(folder / "superlink.db"), "--disable-runtime-dependency-installation"],
        {**env, "FLWR_HOME": str(folder / "superlink-home")},
    )
    wait_for(lambda: "Uvicorn running on https" in machines.log("superlink"), 300, "the SuperLink", machines)


def start_front_door(machines: Machines, nginx: str, certs: Path, port: int, env: Mapping[str, str]) -> None:
    """README step 1's front door: nginx with the kit's configuration (as this user, in the
    foreground so that ``Machines`` holds it), serving once its port takes connections."""
    door = certs / "frontdoor"
    args = ["-p", str(door), "-c", str(door / "nginx.conf"), "-e", str(door / "error.log")]
    proc = machines.start("nginx", [nginx, *args, "-g", "daemon off;"], env)

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited ({proc.returncode})\n{machines.log('nginx')}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(serving, 60, "nginx", machines)


def user_connection(
    folder: Path,
    nodes: tuple[str, ...],
    port: int,
    certs: Path,
    env: Mapping[str, str],
    public: int | None = None,
) -> tuple[dict[str, str], dict[str, int]]:
    """README step 2, the user's machine: a TLS connection ``lab`` in ``$FLWR_HOME/config.toml``
    (and ``public``, to the front door's port, when given) and the nodes' public keys registered;
    returns the user's environment and the node ids."""
    user = {**env, "FLWR_HOME": str(folder / "user-home")}
    Path(user["FLWR_HOME"]).mkdir(exist_ok=True)
    ports = {"lab": port} | ({"public": public} if public is not None else {})
    (Path(user["FLWR_HOME"]) / "config.toml").write_text(
        "".join(
            f'[superlink.{name}]\naddress = "localhost:{p}"\nroot-certificates = "{certs / "ca.crt"}"\n\n'
            for name, p in ports.items()
        )
    )
    registered = {}
    for node in nodes:
        reg = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(certs / "nodes" / f"{node}.pub"), "lab"]
            + ["--format", "json"],
            cwd=folder,
            env=user,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if reg.returncode:
            raise RuntimeError(f"flwr supernode register {node} failed: {reg.stdout}{reg.stderr}")
        registered[node] = int(json.loads(reg.stdout[reg.stdout.index("{") :])["node-id"])
    return user, registered


def start_node(
    folder: Path,
    machines: Machines,
    node: str,
    node_port: int,
    port: int,
    certs: Path,
    env: Mapping[str, str],
    isolation: str,
    node_config: str,
) -> None:
    """README step 3, one node machine: its key, runtime API port, node-config and state-dir
    (``--isolation process`` adds the node's own SuperExec, which starts its ClientApps)."""
    env = {**env, "FLWR_HOME": str(folder / node / "home")}
    machines.start(
        node,
        [str(BIN / "flower-supernode"), "--superlink", f"localhost:{port}"]
        + ["--root-certificates", str(certs / "ca.crt")]
        + ["--auth-supernode-private-key", str(certs / "nodes" / f"{node}.key")]
        + ["--port", str(node_port), "--max-retries", "5", "--isolation", isolation]
        + ["--node-config", f"{node_config} state-dir='{folder / node / 'state'}'"],
        env,
    )
    if isolation == "process":
        machines.start(
            f"{node}-superexec",
            [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{node_port}", "--insecure"],
            env,
        )


def flwr_json(user: Mapping[str, str], *args: str) -> dict:
    """``flwr ARGS --format json`` as the user; the parsed reply."""
    proc = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"], cwd=ROOT, env=dict(user), capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"flwr {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def online(user: Mapping[str, str]) -> set[int]:
    """The ids of the nodes the SuperLink sees online."""
    res = flwr_json(user, "supernode", "ls", "lab")
    return {int(n["node-id"]) for n in res.get("nodes", []) if n["status"] == "online"}
