"""Which Ray cluster a simulation joins, and what must then stay unset: checked before a run is submitted.

Flower 1.41 has no setting for a Ray address. Its RayBackend calls ``ray.init(runtime_env=...,
**init_args)`` with no address (``flwr/server/superlink/fleet/vce/backend/raybackend.py:102-122``), so
Ray's own rule decides, read in the environment of the process that calls it: ``flwr-simulation``,
which the SuperLink's SuperExec starts with the SuperLink's environment, which is the environment of
whoever started the SuperLink (``flwr run`` when it starts the local one). The rule
(``ray/_private/worker.py:1667-1675`` and ``ray/_private/services.py:408-454``, Ray 2.55):

1. ``RAY_ADDRESS`` when set (``local``: a private instance all the same);
2. else the address the last ``ray start --head`` (or ``ray start --address``) on this machine wrote
   to ``ray_current_cluster`` in Ray's default temp folder (``$RAY_TMPDIR``, else ``$TMPDIR``, else
   ``/tmp``, then ``/ray``; ``ray start --temp-dir DIR`` writes it in DIR instead, where this rule
   does not look; ``ray stop`` removes the default one);
3. else a private instance, sized by ``init-args-num-cpus`` / ``init-args-num-gpus`` (all of the
   machine when unset).

Joining a cluster, Ray refuses ``num_cpus`` and ``num_gpus`` (``ValueError: When connecting to an
existing cluster, num_cpus and num_gpus must not be provided``, ``ray/_private/worker.py:1914-1918``)
in ``flwr-simulation``, after the run was submitted: ``check_federation`` says it before, naming the key.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .inputs import InputError

ADDRESS_VAR = "RAY_ADDRESS"
# The federation-config keys Flower passes to ray.init as num_cpus / num_gpus (flwr/simulation/app.py:99-102).
SIZE_KEYS = ("init-args-num-cpus", "init-args-num-gpus")
REACH_SECONDS = 3.0  # a cluster's GCS answers a TCP connect at once; a firewall may swallow it


@dataclass(frozen=True)
class Cluster:
    """A running Ray cluster the simulation will join: its GCS ``address`` (``host:port``, or
    ``auto``) and where that came from (``RAY_ADDRESS``, or the path of Ray's address file)."""

    address: str
    source: str


def address_file(env: Mapping[str, str]) -> Path:
    """Ray's ``ray_current_cluster`` file for ``env`` (``ray/_common/utils.py:323-345``)."""
    if "RAY_TMPDIR" in env:
        base = env["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in env:
        base = env["TMPDIR"]
    else:
        base = "/tmp"  # Ray's fallback on Linux and macOS (tempfile.gettempdir() elsewhere)
    return Path(base) / "ray" / "ray_current_cluster"


def cluster_to_join(env: Mapping[str, str]) -> Cluster | None:
    """The cluster a ``ray.init()`` without an address joins when run with ``env``; None when it
    starts a private instance instead (Ray's rule, in this module's docstring)."""
    given = env.get(ADDRESS_VAR, "")
    if given == "local":
        return None
    if given:
        return Cluster(given, ADDRESS_VAR)
    path = address_file(env)
    try:
        written = path.read_text().strip()
    except OSError:
        return None
    return Cluster(written, str(path)) if written else None


def _answers(address: str) -> bool | None:
    """Whether something listens at ``host:port`` (None: an address this check cannot judge, such
    as ``auto`` or a Ray Client ``ray://`` one, left to Ray)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_SECONDS):
            return True
    except OSError:
        return False


def check_federation(federation: Mapping[str, Any], env: Mapping[str, str]) -> Cluster | None:
    """The cluster the run will join (None: a private Ray instance), once its federation settings
    fit it: InputError naming the key for ``init-args-num-cpus`` / ``init-args-num-gpus`` with a
    cluster to join (its size is what ``ray start`` gave each machine), and naming where the address
    came from when nothing answers there (a stopped cluster, a wrong host or port)."""
    cluster = cluster_to_join(env)
    if cluster is None:
        return None
    for key in SIZE_KEYS:
        if key in federation:
            raise InputError(
                f"--federation-config: {key}: must be unset when the simulation joins the Ray cluster at "
                f"{cluster.address} (from {cluster.source}): its size is what `ray start --num-cpus/--num-gpus` "
                f"gave each machine, and Ray refuses num_cpus/num_gpus when joining (set RAY_ADDRESS=local "
                "for a private instance)"
            )
    if _answers(cluster.address) is False:
        raise InputError(
            f"{cluster.source}: no Ray cluster answers at {cluster.address} (stopped, or another host or port?): "
            "start it (`ray start --head --port=PORT`), point RAY_ADDRESS at it, or unset RAY_ADDRESS "
            f"(or run `ray stop`, which removes {address_file(env)}) for a private instance"
        )
    return cluster


def superlink_mismatch(superlink_env: list[bytes], env: Mapping[str, str] | None = None) -> str | None:
    """Why a running SuperLink (its ``/proc/PID/environ`` entries) would join another Ray cluster than
    this command asks for (its ``RAY_ADDRESS`` differs from ours), or None: its simulations inherit
    its environment, not ours."""
    env = os.environ if env is None else env
    prefix = f"{ADDRESS_VAR}=".encode()
    theirs = next((e[len(prefix) :].decode(errors="replace") for e in superlink_env if e.startswith(prefix)), "")
    ours = env.get(ADDRESS_VAR, "")
    if theirs == ours:
        return None
    return f"it was started with {ADDRESS_VAR}={theirs or '(unset)'}, this command has {ours or '(unset)'}"
