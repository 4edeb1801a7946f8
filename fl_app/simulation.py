"""One run of the app in this process: Flower's simulation with the app's ServerApp and ClientApp."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.simulation import run_simulation

from .client_app import app as client_app
from .server_app import make_server_app


def run_in_process(config: Mapping[str, Any], num_supernodes: int = 2, num_cpus: int = 1) -> None:
    """Run the app with ``config`` (run_config values over the defaults) to its end in this process.

    Parameters
    ----------
    config : Mapping[str, Any]
        Run-config values (``[tool.flwr.app.config]`` keys) over the app's defaults.
    num_supernodes : int (default: 2)
        Simulated SuperNodes.
    num_cpus : int (default: 1)
        CPUs Ray gives each running ClientApp.
    """
    run_simulation(
        server_app=make_server_app(dict(config)),
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": num_cpus}},
    )
