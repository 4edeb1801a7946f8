"""Stopping a command on SIGINT or SIGTERM, from a terminal or from any other process, with every
process it started.

``iet-agc run`` and ``iet-agc sweep`` start process trees of their own: ``flwr run``, the local
SuperLink, its SuperExec and ``flwr-simulation``, and Ray's head (GCS, raylet, dashboard, log
monitor) with the raylet's agents and actors below it. Two things went wrong before:

- SIGINT sent by another process was ignored: a shell starts a background job (``cmd &`` in a
  script, a supervisor's child) with SIGINT ignored, and Python then keeps it ignored.
  :func:`exit_on_signals` installs its own handlers whatever the command inherited.
- Ray's agents outlived a stopped command, orphaned: ``ray.shutdown`` ends the raylet first, its
  children (DashboardAgent, RuntimeEnvAgent) lose their parent and are no longer anyone's
  descendants, and they ignored SIGTERM. The tree is therefore taken when the signal arrives,
  before anything ends, and what is left of it after a grace period gets SIGKILL.
- In a sweep the simulation's Ray driver lives in the command's own process: Ray's core worker
  takes SIGTERM at the C level and aborts (``fl_app.simulation`` turns that handler off), and it
  ends the process itself, exit code 1, once the raylet goes. So the stopped command first
  becomes a small program under its own pid (``os.execv``) that then ends the tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE = 2.0  # seconds a process has to end on SIGTERM before SIGKILL


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM; ``tree`` is the command's process tree then."""

    def __init__(self, signum: int, tree: list[psutil.Process]):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.tree = signum, tree

    @property
    def code(self) -> int:
        """The exit code of a process ended by this signal: 128 + its number (130, 143)."""
        return 128 + self.signum


def in_worker_thread() -> bool:
    """Signal handlers can only be set from the main thread (a test calling the CLI in a thread)."""
    return threading.current_thread() is not threading.main_thread()


def process_tree(pid: int) -> list[psutil.Process]:
    """The live descendants of ``pid`` (not ``pid`` itself), and every process of a session that one
    of them leads (a child started with ``start_new_session``, as Flower starts the local SuperLink
    and SuperExec, keeps its session after its parent is gone)."""
    try:
        found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    leaders = set()
    for p in list(found.values()):
        try:
            if os.getsid(p.pid) == p.pid:
                leaders.add(p.pid)
        except OSError:
            continue
    if leaders:
        for p in psutil.process_iter():
            try:
                if p.pid not in found and p.pid != pid and os.getsid(p.pid) in leaders:
                    found[p.pid] = p
            except (OSError, psutil.Error):
                continue
    return list(found.values())


def _alive(proc: psutil.Process) -> bool:
    try:  # is_running also compares the start time: a reused pid is not the same process
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_processes(procs: Iterable[psutil.Process], grace: float = GRACE) -> list[psutil.Process]:
    """SIGTERM to every process, SIGKILL to those still alive ``grace`` seconds later (Ray's agents
    ignore SIGTERM). Returns once all have ended (waiting at most 5 s more after the SIGKILL), with
    the processes that needed SIGKILL."""
    procs = [p for p in procs if _alive(p)]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _wait_ended(procs, grace)
    killed = [p for p in procs if _alive(p)]
    for p in killed:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_ended(killed, 5)  # a killed process with a large memory takes a moment to go
    return killed


def _wait_ended(procs: list[psutil.Process], timeout: float) -> None:
    """Until every process has ended or ``timeout`` passes. Not ``psutil.wait_procs``: a process that
    is not ours stays a zombie until its own parent reaps it, and ``wait_procs`` counts a zombie
    as alive (it would wait the whole timeout); a zombie has ended here (``_alive``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.05)


def _noted(signum: int, frame: object) -> None:
    """A second signal while the first one ends the tree changes nothing (a handler, not SIG_IGN:
    processes started meanwhile, such as ``flwr stop``, must not inherit an ignored signal)."""


def _raise(signum: int, frame: object) -> None:
    for sig in SIGNALS:
        signal.signal(sig, _noted)
    raise Stopped(signum, process_tree(os.getpid()))


# What this process becomes once stopped: a small program under the same pid that ends the tree and
# exits with the code (``_end_listed``). Its own SIGINT and SIGTERM are ignored while it works.
_ENDING = """
import signal, sys
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
sys.path.insert(0, sys.argv[1])
from iet_agc.stopping import _end_listed
sys.exit(_end_listed(sys.argv[2:]))
"""


def _end_listed(argv: list[str]) -> int:
    """``CODE GRACE PID:START ...``: end the listed processes (those still alive, started when listed)
    and return CODE; this process's own children, Ray's head among them, are reaped."""
    code, grace, listed = int(argv[0]), float(argv[1]), argv[2:]
    procs = []
    for item in listed:
        pid, started = item.split(":")
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - float(started)) < 0.01:  # not another process under a reused pid
                procs.append(p)
        except psutil.Error:
            continue
    killed = end_processes(procs, float(grace))
    if os.environ.get("IET_AGC_STOP_DEBUG"):  # what needed SIGKILL, for whoever measures a stop
        print(f"[iet-agc] ended {len(procs)} processes, SIGKILL for {[p.pid for p in killed]}", file=sys.stderr)
    psutil.wait_procs(psutil.Process().children(), timeout=0.5)  # reaped: no zombies left behind
    return code


def _become_ending(procs: list[psutil.Process], grace: float, code: int) -> None:
    """Replace this process (``os.execv``: same pid, its threads gone at once) by ``_ENDING``.

    Ending Ray's processes from here would not do: Ray's driver in this process ends the process
    itself (exit code 1) as soon as the raylet it is connected to goes ("the connection to the
    plasma store is failed"), and ``ray.shutdown`` races with the simulation's threads still in
    ``ray.get``. After the exec there is no driver, no ServerApp thread that could record a round
    failed by the stop, and the run folder's lock is released (its descriptor closes on exec).
    """
    listed = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            listed.append(f"{p.pid}:{p.create_time()!r}")
    sys.stdout.flush()
    sys.stderr.flush()
    home = str(Path(__file__).resolve().parents[1])
    try:
        os.execv(sys.executable, [sys.executable, "-c", _ENDING, home, str(code), str(grace), *listed])
    except OSError:  # no exec here: end them from this process
        end_processes(procs, grace)
        os._exit(code)


@contextmanager
def exit_on_signals(
    on_stop: Callable[[Stopped], Iterable[psutil.Process] | None] | None = None, grace: float = GRACE
) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the command: :class:`Stopped` is raised in the main
    thread (the block's ``finally`` clauses run), then ``on_stop(err)`` (say how to continue; it may
    return more processes to end), then this process becomes a small program (same pid) that ends
    every process of the tree taken when the signal arrived (:func:`end_processes`) and exits with
    128 + the signal's number (130, 143).

    A ``KeyboardInterrupt`` raised otherwise counts as SIGINT. Outside the main thread the block
    runs as it is (no handler can be set there).
    """
    if in_worker_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    except KeyboardInterrupt as err:
        stop = err if isinstance(err, Stopped) else Stopped(signal.SIGINT, process_tree(os.getpid()))
        for sig in SIGNALS:
            signal.signal(sig, _noted)
        more = on_stop(stop) if on_stop is not None else None
        _become_ending([*stop.tree, *(more or [])], grace, stop.code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
