"""One run of the app in this process: Flower's simulation with the app's ServerApp and ClientApp."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from flwr.simulation import run_simulation

from .client_app import app as client_app
from .recorder import hold_records
from .server_app import make_server_app

# Ray's core worker installs a failure-signal handler (abseil's) that takes SIGTERM from Python and
# aborts the process (exit 134, no cleanup); Ray's documented switch turns it off. Read when ray is
# first imported, which flwr does when the simulation starts.
FAILURE_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"


class _NoSigtermNote(logging.Filter):
    """Ray's warning that ray.init in a thread sets no SIGTERM handler: that is on purpose here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_NO_SIGTERM_NOTE = _NoSigtermNote()


def run_in_process(config: Mapping[str, Any], num_supernodes: int = 2, num_cpus: int = 1) -> None:
    """Run the app with ``config`` (run_config values over the defaults) to its end in this process.

    Called from the main thread, the simulation runs in a daemon thread while the main thread
    waits: Ray's ``ray.init`` in the main thread would replace the caller's SIGTERM handler with
    its own (``sys.exit``), and a waiting main thread runs the caller's SIGINT and SIGTERM handlers
    at once (``iet_agc.stopping`` then ends the simulation's processes, Ray's among them).
    The simulation's exceptions are raised here.

    Parameters
    ----------
    config : Mapping[str, Any]
        Run-config values (``[tool.flwr.app.config]`` keys) over the app's defaults.
    num_supernodes : int (default: 2)
        Simulated SuperNodes.
    num_cpus : int (default: 1)
        CPUs Ray gives each running ClientApp.
    """

    def simulate() -> None:
        run_simulation(
            server_app=make_server_app(dict(config)),
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config={"client_resources": {"num_cpus": num_cpus}},
        )

    if threading.current_thread() is not threading.main_thread():
        simulate()
        return
    os.environ.setdefault(FAILURE_HANDLER, "1")
    logging.getLogger("ray._private.worker").addFilter(_NO_SIGTERM_NOTE)  # once: the same filter is not added twice
    failure: list[BaseException] = []

    def target() -> None:
        try:
            simulate()
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread below
            failure.append(err)

    thread = threading.Thread(target=target, name="simulation", daemon=True)  # its threads are daemons too
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # a bounded wait: signal handlers run within 0.2 s, whichever thread got the signal
    if failure:
        raise failure[0]


def stop_recording() -> None:
    """The simulation in this process records no more rounds (the process is about to end): a round
    failed by the stop itself, as Ray's actors end under it, would otherwise be checkpointed."""
    hold_records()
