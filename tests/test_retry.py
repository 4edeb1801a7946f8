"""A failing SuperLink on a virtual clock: transient errors on push and pull are retried (logged,
with backoff, never past the round's deadline) and the round ends as if nothing had failed; a push
that failed half-way is completed, not duplicated; fatal errors are not retried; a SuperLink that
keeps failing ends the round at its deadline and, past ``Retry.give_up_after``, stops the run."""

import logging
from collections import Counter, deque
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
from test_dispatch import _msgs
from test_strategy import _strategy, reply

import strategies.dispatch as dispatch_module
from strategies.dispatch import DEADLINE, PULL_FAILED, PUSH_FAILED, NodeQueues, Retry, transient
from strategies.iet import RunStopped
from strategies.msr import check_partition

pytestmark = pytest.mark.usefixtures("flower_task")

LOCKED_BODY = '{"detail":"Internal server error."}'  # what Flower 1.41 answers for `database is locked`


def http_error(code: int, path: str = "/v1/runtime/pull-messages", body: str = LOCKED_BODY) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", f"https://superlink.lab.example:8000{path}")
    response = httpx.Response(code, request=request, text=body)
    return httpx.HTTPStatusError(f"Server error '{code}' for url '{request.url}'", request=request, response=response)


class FlakyGrid:
    """The SuperLink as Flower 1.41's HttpGrid sees it, with scripted failures.

    As HttpGrid, a message gets its id (the hash of its content) before the push; as SqlLinkState,
    an id pushed again answers with that id and completes its objects, and pulling an id the
    SuperLink does not hold (never stored, or its reply already handed over) answers with Flower's
    "message unavailable" error reply. A node starts on a message once all its objects are there
    and its reply is ready ``delay(msg)`` seconds later. ``faults["push"]``/``faults["pull"]``: per
    call, in order, an exception to raise before anything happens (a rolled-back transaction),
    "half" (push: the messages are stored, an object push fails) or "lost" (pull: the ready replies
    are taken and deleted, then the call fails), or None (no fault).
    """

    def __init__(self, clock, nodes, delay=lambda m: 3.0, answer=reply, faults=None):
        self.clock, self.nodes, self.delay, self.answer = clock, list(nodes), delay, answer
        self.faults = {k: deque(v) for k, v in {"push": [], "pull": [], **(faults or {})}.items()}
        self.stored: dict[str, Message] = {}
        self.complete: dict[str, float] = {}  # id -> when its last object arrived
        self.taken: set[str] = set()
        self.trained: Counter[int] = Counter()  # shard -> replies the nodes made
        self.calls = Counter()

    def get_node_ids(self):
        return list(self.nodes)

    def _fault(self, call):
        self.calls[call] += 1
        fault = self.faults[call].popleft() if self.faults[call] else None
        if isinstance(fault, BaseException):
            raise fault
        return fault

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
        fault = self._fault("push")
        for m in messages:
            self.stored.setdefault(m.metadata.message_id, m)
        if fault == "half":
            raise ObjectPushError(messages[-1].object_id, 1, "session")
        for m in messages:
            self.complete.setdefault(m.metadata.message_id, self.clock.t)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        ids = list(ids)
        fault = self._fault("pull")
        out = []
        for mid in ids:
            if mid not in self.stored or mid in self.taken:
                out.append(create_message_error_unavailable_ins_message(mid, 1))
            elif mid in self.complete and self.complete[mid] + self.delay(self.stored[mid]) <= self.clock.t:
                self.taken.add(mid)
                self.trained[int(self.stored[mid].content["config"]["shard"])] += 1
                out.append(self.answer(self.stored[mid]))
        if fault == "lost":
            raise http_error(500, "/v1/runtime/confirm-message-received")
        return out


def app_run(clock, config: dict, state: Path, nodes=(11,), faults=None, **run_kwargs) -> Path:
    """The app's own ServerApp loop (``fl_app.server_app.run``: evaluation, run folder, checkpoint)
    and its ClientApp, in this process on a ``FlakyGrid`` (replies 2 s after the push on the fake
    clock): a whole run without Ray or a SuperLink. Returns the run folder."""
    from flwr.app import Context, RecordDict

    from fl_app.client_app import app as client_app
    from fl_app.config import settings_from_run_config
    from fl_app.server_app import run

    def node(m):
        ctx = Context(
            run_id=1,
            node_id=m.metadata.dst_node_id,
            node_config={"state-dir": str(state / str(m.metadata.dst_node_id))},
            state=RecordDict(),
            run_config={},
        )
        return client_app(m, ctx)

    clock.t = 0.0
    grid = FlakyGrid(clock, nodes, delay=lambda m: 2.0, answer=node, faults=faults)
    return run(grid, settings_from_run_config(config), **run_kwargs).path


def _by_shard(out):
    """Each reply as (shard, weights, metrics), keyed by the shard of the message it answers."""
    shards = {}
    for r in out.replies:
        m = r.content["metrics"]
        shards[int(r.content["info"]["shard"])] = (r.content["arrays"]["w"].numpy().tolist(), dict(m))
    return shards


def _dispatch(clock, faults=None, timeout=60.0, retry=None):
    clock.t = 0.0
    grid = FlakyGrid(clock, [1, 2], faults=faults)
    d = NodeQueues(per_node=2, poll_interval=0.2, max_poll_interval=2.0, retry=retry, seed=0)
    msgs = _msgs([1, 2, 1, 1])  # 4 shards on 2 nodes: node 1 has 3, two at a time
    return grid, d, msgs, d.send(grid, msgs, timeout=timeout)


def test_transient_push_and_pull_errors_are_retried_and_the_round_ends_as_without_them(clock, caplog):
    _, _, _, clean = _dispatch(clock)
    clean_t = clock.t
    faults = {
        "push": [http_error(500, "/v1/runtime/push-messages"), http_error(503, "/v1/runtime/push-messages")],
        "pull": [
            http_error(500),
            http_error(429, body="Too Many Requests"),
            None,
            httpx.ReadTimeout("timed out"),
            ObjectPushError("ab" * 32, 1, "s"),
            RuntimeError("sqlite3.OperationalError: database is locked"),
        ],
    }
    with caplog.at_level(logging.INFO, logger="flwr"):
        grid, d, msgs, out = _dispatch(clock, faults)
    assert _by_shard(out) == _by_shard(clean) and len(out.replies) == 4
    assert out.unsent == [] and out.late == [] and out.failed == [] and d.outstanding == {}
    assert grid.trained == Counter({0: 1, 1: 1, 2: 1, 3: 1}) and len(grid.stored) == 4  # nothing pushed twice
    assert clock.t < clean_t + 15  # the retries cost seconds, not the round
    text = caplog.text
    assert "SuperLink: push_messages failed (attempt 1): HTTP 500 from /v1/runtime/push-messages" in text
    assert "SuperLink: push_messages failed (attempt 2): HTTP 503" in text
    assert "SuperLink: push_messages succeeded on attempt 3" in text
    assert "pull_messages failed (attempt 2): HTTP 429 from /v1/runtime/pull-messages: Too Many Requests" in text
    assert "pull_messages failed (attempt 1): ReadTimeout: timed out" in text
    assert "pull_messages failed (attempt 3): RuntimeError: sqlite3.OperationalError: database is locked" in text
    assert text.count("retrying in") == 7


def test_the_backoff_doubles_with_seeded_jitter_and_never_passes_the_deadline(clock, caplog):
    r = Retry(first_delay=0.5, max_delay=4.0)
    a, b = NodeQueues(seed=3), NodeQueues(seed=3)
    delays = [r.delay(n, a.rng) for n in range(1, 8)]
    assert delays == [r.delay(n, b.rng) for n in range(1, 8)]  # seeded: the same run waits the same
    for n, wait in enumerate(delays, start=1):
        assert 0.5 * min(4.0, 0.5 * 2 ** (n - 1)) <= wait < min(4.0, 0.5 * 2 ** (n - 1))
    clock.t = 0.0
    sleeps = []
    clock.sleep = lambda s: (sleeps.append(s), setattr(clock, "t", clock.t + s))
    d = NodeQueues(retry=Retry(first_delay=0.5, max_delay=30.0, give_up_after=600.0))
    with pytest.raises(dispatch_module.PastDeadline):
        d.call("pull_messages", lambda: (_ for _ in ()).throw(http_error(500)), deadline=7.0)
    assert clock.t == 7.0 and sum(sleeps) == 7.0  # the last attempt comes at the deadline, none after it
    assert d.failing_since == {"pull_messages": 0.0}  # the run of failures goes on counting into the next pull


def test_a_push_that_failed_half_way_is_completed_not_duplicated(clock, caplog):
    _, _, _, clean = _dispatch(clock)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        grid, d, msgs, out = _dispatch(clock, {"push": ["half", "half"]})
    assert _by_shard(out) == _by_shard(clean)
    assert len(grid.stored) == 4 and grid.trained == Counter({0: 1, 1: 1, 2: 1, 3: 1})
    assert "push_messages failed (attempt 2): ObjectPushError" in caplog.text


def test_replies_lost_after_the_superlink_handed_them_over_come_back_as_errors_and_free_their_node(clock):
    """A pull that fails after the SuperLink deleted the replies (HttpGrid's confirm failed): the
    retry gets Flower's "message unavailable" for them; they are replies with an error, which the
    strategy drops (their shards keep their samples), never a node waiting forever."""
    # pulls at t = 0, 0.2, 0.6, 1.4 find nothing; the one at 3.0 takes three replies and fails
    grid, d, msgs, out = _dispatch(clock, {"pull": [None, None, None, None, "lost"]})
    errors = [r for r in out.replies if r.has_error()]
    assert len(errors) == 3 and all(r.error.code == ErrorCode.MESSAGE_UNAVAILABLE for r in errors)
    assert {r.metadata.reply_to_message_id for r in errors} == {m.metadata.message_id for m in msgs[:3]}
    assert len(out.replies) == 4 and d.outstanding == {} and out.late == [] and out.failed == []


@pytest.mark.parametrize(
    ("err", "retried"),
    [
        (http_error(500), True),
        (http_error(502), True),
        (http_error(504), True),
        (http_error(429), True),
        (http_error(400), False),
        (http_error(404), False),
        (http_error(409), False),
        (http_error(413), False),
        (httpx.ConnectError("refused"), True),
        (httpx.RemoteProtocolError("closed"), True),
        (ObjectPushError("ab" * 32, 1, "s"), True),
        (RuntimeError("(sqlite3.OperationalError) database is locked"), True),
        (ValueError("Invalid message: ..."), False),
        (ValueError("database is locked"), False),
        (KeyError("x"), False),
    ],
)
def test_which_errors_are_transient(err, retried):
    assert transient(err) is retried


def test_grpc_codes_are_read_when_a_grid_raises_them():
    class Code:
        def __init__(self, name):
            self.name = name

    class RpcError(Exception):
        def __init__(self, name):
            self._name = name

        def code(self):
            return Code(self._name)

    assert [transient(RpcError(n)) for n in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")] == [True] * 3
    assert not transient(RpcError("PERMISSION_DENIED")) and not transient(RpcError("INVALID_ARGUMENT"))


@pytest.mark.parametrize("call", ["push", "pull"])
def test_fatal_errors_are_raised_at_once(clock, caplog, call):
    faults = {call: [http_error(400, body="bad request") if call == "push" else ValueError("Invalid message")]}
    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises((httpx.HTTPStatusError, ValueError)):
        _dispatch(clock, faults)
    assert "retrying" not in caplog.text
    assert clock.t == 0.0  # the first pull comes right after the push: no wait before the error


def test_a_superlink_failing_until_the_deadline_ends_the_round_and_its_nodes_wait_for_an_answer(clock):
    # pulls fail for the whole round: the pushed messages end without a reply, their node busy
    always = [http_error(500)] * 100
    grid, d, msgs, out = _dispatch(clock, {"pull": always}, timeout=20.0)
    assert clock.t == 20.0 and out.replies == [] and out.late == []
    assert sorted((int(m.content["config"]["shard"]), why) for m, why in out.failed) == [
        (0, PULL_FAILED),
        (1, PULL_FAILED),
        (2, PULL_FAILED),
    ]
    assert [int(m.content["config"]["shard"]) for m, _ in out.unsent] == [3]  # its node had no room
    assert d.busy_nodes() == {1, 2}
    # the SuperLink is back: the late replies free the nodes and go nowhere else
    grid.faults["pull"].clear()
    clock.t = 40.0
    second = _msgs([1, 2])
    out2 = d.send(grid, second, timeout=20.0)
    assert len(out2.discarded) == 3 and d.outstanding == {} and out2.unsent == [] and len(out2.replies) == 2

    # pushes fail for the whole round: the messages got their ids, so their nodes wait until the
    # SuperLink says what became of them (here: it never stored them, "message unavailable")
    clock.t = 0.0
    grid = FlakyGrid(clock, [1, 2], faults={"push": [http_error(503, "/v1/runtime/push-messages")] * 100})
    d = NodeQueues(per_node=2, retry=Retry(give_up_after=600.0))
    msgs = _msgs([1, 2])
    out = d.send(grid, msgs, timeout=20.0)
    assert clock.t == 20.0 and [why for _, why in out.failed] == [PUSH_FAILED, PUSH_FAILED] and grid.stored == {}
    assert d.busy_nodes() == {1, 2}
    grid.faults["push"].clear()
    out2 = d.send(grid, _msgs([1, 2]), timeout=20.0)
    assert len(out2.discarded) == 2 and all(r.has_error() for r in out2.discarded) and d.outstanding == {}


def test_a_superlink_that_keeps_failing_stops_the_run_with_its_last_rounds_recorded(clock, caplog):
    recorded = []

    class Recorder:
        def round_done(self, rlog, arrays, evaluation, state):
            recorded.append((rlog.server_round, rlog.failed, dict(rlog.timed_out)))

    s = _strategy(
        [range(0, 4), range(4, 8), range(8, 12)],
        12,
        max_failed_rounds=10,
        recorder=Recorder(),
        dispatcher=NodeQueues(1, retry=Retry(first_delay=0.5, max_delay=4.0, give_up_after=45.0)),
    )
    grid = FlakyGrid(clock, [1, 2], faults={"pull": [None, None] + [http_error(500)] * 1000})
    stop = "round 3: the SuperLink kept failing pull_messages for 4[5-9] s"
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(RunStopped, match=stop):
        s.start(grid, ArrayRecord({"w": torch.zeros(2, 2)}), num_rounds=10, timeout=20)
    assert [r for r, _, _ in recorded] == [1, 2]  # the rounds before the stop are recorded (checkpoints)
    assert all(failed for _, failed, _ in recorded)
    assert set(recorded[0][2].values()) == {PULL_FAILED, DEADLINE}
    assert s.ledger.set_aside == {}  # the SuperLink's failures count against no node
    for r in s.log:
        check_partition(s.log[r].assignment, 12)


def test_retries_inside_a_strategy_run_leave_its_rounds_as_an_uninterrupted_run_s(clock):
    def run(faults):
        clock.t = 0.0
        s = _strategy([range(0, 4), range(4, 8), range(8, 12)], 12, dispatcher=NodeQueues(2, max_poll_interval=2.0))
        answer = lambda m: reply(m, float(m.content["config"]["server-round"] + m.content["config"]["shard"]))  # noqa: E731
        grid = FlakyGrid(clock, [1, 2], answer=answer, faults=faults)
        result = s.start(grid, ArrayRecord({"w": torch.zeros(2, 2)}), num_rounds=3, timeout=30)
        return s, grid, result.arrays["w"].numpy()

    clean, _, clean_w = run(None)
    faults = {
        "push": [None, "half", http_error(500, "/v1/runtime/push-messages"), "half"],
        "pull": [http_error(500), None, http_error(502), httpx.ReadError("reset"), None, http_error(429)] * 3,
    }
    flaky, grid, w = run(faults)
    assert grid.calls["push"] > 3 and np.array_equal(w, clean_w)
    assert grid.trained == Counter({0: 3, 1: 3, 2: 3})  # each shard trained once per round
    for r in (1, 2, 3):
        a, b = flaky.log[r], clean.log[r]
        assert a.shard_metrics == b.shard_metrics and a.timed_out == b.timed_out == {} and a.dropped == []
        assert [x.tolist() for x in a.assignment] == [x.tolist() for x in b.assignment]
        assert [x.tolist() for x in a.moved] == [x.tolist() for x in b.moved] and a.metrics == b.metrics


def test_a_whole_run_through_a_flaky_superlink_writes_the_rows_of_an_uninterrupted_run(
    clock, tmp_path, tiny_run, caplog
):
    """The app's own ServerApp loop (``fl_app.server_app.run``: evaluation, run folder, checkpoint)
    and its ClientApp, 3 shards on 2 nodes, 2 rounds (MSR moves between them), against a SuperLink
    that fails on pushes and pulls: the run's tables and weights equal those of a run against a
    SuperLink that never fails."""

    from safetensors.numpy import load_file

    runs = []
    for faults in (
        None,
        {"push": ["half", http_error(500)], "pull": [http_error(500), None, http_error(503), "x"] * 3},
    ):
        small = {"train-size": 36, "local-epochs": 1, "eval-num-images": 20}  # one step per shard and round
        config = {**tiny_run, **small, "num-shards": 3, "num-rounds": 2, "out-dir": str(tmp_path / f"runs{len(runs)}")}
        with caplog.at_level(logging.WARNING, logger="flwr"):
            runs.append(app_run(clock, config, tmp_path / f"state{len(runs)}", nodes=(11, 22), faults=faults))
    assert "SuperLink: pull_messages failed (attempt 1): HTTP 500" in caplog.text
    clean, flaky = runs
    a, b = (pd.read_csv(p / "rounds.csv") for p in (clean, flaky))
    timing = [c for c in a.columns if "seconds" in c]
    pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing), check_exact=True)
    assert len(a) == 2 and (a["replies"] == 3).all() and a.at[0, "moved"] > 0
    for name in ("assignments.csv", "moved.csv", "skip_counts.csv"):
        assert (clean / name).read_bytes() == (flaky / name).read_bytes(), name
    weights = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
    wa, wb = load_file(clean / weights), load_file(flaky / weights)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_run_whose_superlink_keeps_failing_stops_with_its_checkpoint_and_the_resume_command(
    clock, tmp_path, tiny_run, caplog
):
    from fl_app.config import settings_from_run_config
    from fl_app.server_app import run

    grid = FlakyGrid(clock, [11, 22], faults={"pull": [http_error(500)] * 10_000})
    config = {**tiny_run, "num-shards": 3, "num-rounds": 20, "round-timeout": 250.0, "max-failed-rounds": 50}
    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises(RunStopped, match="kept failing pull_messages"):
        run(grid, settings_from_run_config(config))
    (run_dir,) = Path(tiny_run["out-dir"]).iterdir()
    assert "round 3: the SuperLink kept failing pull_messages for 600 s" in caplog.text  # rounds 1-2 end at 250 s each
    assert f"The checkpoint is kept; to continue: iet-agc run --resume {run_dir}" in caplog.text
    assert len(pd.read_csv(run_dir / "rounds.csv")) == 2 and (run_dir / "checkpoint").is_dir()
