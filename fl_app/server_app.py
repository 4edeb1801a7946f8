"""ServerApp: validated settings -> where the run starts -> IET strategy rounds -> run folder.

One run, in order: ``start_point`` (fl_app/start.py: new shards or the checkpoint), the
evaluator (evaluation/), ``IETStrategy`` over the aggregator (strategies/), each round recorded by
``RunRecorder`` into the run folder (fl_app/recorder.py, fl_app/run_folder.py), ``finish_run``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid import InMemoryGrid

from ddpm.adapters import load_trainable, trainable_state
from ddpm.data import ImageSet, load_dataset
from ddpm.device import resolve_device
from ddpm.family import PIXEL_DDPM
from ddpm.precision import choose
from evaluation.evaluator import Evaluation, Evaluator, MemorizationEvaluator
from evaluation.text_metrics import text_scorers
from strategies import protocol
from strategies.aggregation import Resumable, make_aggregator
from strategies.dispatch import DEPLOYMENT_MAX_POLL, NodeQueues
from strategies.iet import IETStrategy, RunStopped
from strategies.msr import Redistribution, make_redistribution

from .checkpoint import checkpoint_settings
from .config import aggregation_config, eval_config, settings_from_run_config
from .model import model_family
from .parent import parent_gone
from .recorder import EVAL_SECONDS, RunRecorder, finish_run, model_line
from .resume import resumed_settings, run_folder_lock
from .run_folder import RunWriter, new_run_dir, run_result
from .settings import Settings
from .start import Start, start_point
from .trackers import TRACKER_KEYS, RunTracker, tracking


def eval_rounds(settings: Settings) -> set[int]:
    """Rounds after which the global model is evaluated: every ``eval-every`` and the last."""
    every = settings.eval_every
    return {settings.num_rounds} | (set(range(every, settings.num_rounds + 1, every)) if every else set())


class EvaluateFn:
    """Flower's ``evaluate_fn``: the evaluator's metrics for the rounds in ``rounds``, else None; keeps
    the latest ``Evaluation`` in ``latest`` (``finish_run`` saves its images as the run's samples)."""

    def __init__(self, evaluator: Evaluator, model: torch.nn.Module, rounds: set[int]) -> None:
        self.evaluator, self.model, self.rounds = evaluator, model, rounds
        self.latest: Evaluation | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round not in self.rounds:
            return None
        load_trainable(self.model, arrays.to_torch_state_dict())
        started = time.monotonic()
        self.latest = self.evaluator(server_round, self.model)
        values = {k: float("nan") if v is None else float(v) for k, v in self.latest.metrics.items()}
        return MetricRecord({**values, EVAL_SECONDS: time.monotonic() - started})


def evaluator_extras(settings: Settings, data: ImageSet, device: torch.device) -> dict[str, Any]:
    """The evaluator's family (none for the pixel DDPM: its default) and, for the text-conditional
    family, its scorers: Sim Score from ``sscd-weights``, CLIP score from ``clip-model`` (each
    unavailable with its reason when its network cannot be had; evaluation/text_metrics.py)."""
    family = model_family(settings, data)
    if family is PIXEL_DDPM:
        return {}
    extra: dict[str, Any] = {"family": family}
    if settings.text_conditional:
        extra["scorers"] = text_scorers(eval_config(settings), device)
    return extra


def run(
    grid: Grid,
    settings: Settings,
    *,
    redistribution: Redistribution | None = None,
    evaluator_factory: Callable[..., Evaluator] = MemorizationEvaluator,
    aggregator: Strategy | None = None,
) -> RunWriter:
    """Run IET-AGC+ end to end on ``grid`` (or continue the run named by ``resume``); returns the
    writer of the run folder. ``aggregator`` (any Flower strategy) replaces the ``aggregation``
    setting's. Only one process writes a run folder at a time (``.lock``). With ``tracker``, each
    round also goes to the tracker (fl_app/trackers.py), opened before training."""
    started = time.monotonic()
    data = load_dataset(**settings.dataset_kwargs())
    if len(data) < settings.mq_neighbours:
        raise ValueError(f"mq-neighbours: must be <= the {len(data)} training images, got {settings.mq_neighbours}")
    run_dir = Path(settings.resume) if settings.resume else new_run_dir(settings)
    with run_folder_lock(run_dir):
        start = start_point(settings, data, run_dir)
        device = resolve_device(settings.device)
        named = aggregator is None  # the aggregation setting's, else the caller's own strategy
        aggregator = make_aggregator(aggregation_config(settings)) if named else aggregator
        log(
            INFO,
            _first_line(settings, data, start, device, settings.aggregation if named else type(aggregator).__name__),
        )
        evaluator = evaluator_factory(
            eval_config(settings), data, start.writer.path, device, **evaluator_extras(settings, data, device)
        )
        with tracking(settings, run_dir, start.writer.rows) as tracker:  # before training: refused here
            strategy = make_strategy(
                settings, data, start, redistribution, aggregator, tracker, simulated=isinstance(grid, InMemoryGrid)
            )
            evaluate_fn = EvaluateFn(evaluator, start.model, eval_rounds(settings))
            try:
                result = strategy.start(
                    grid=grid,
                    initial_arrays=ArrayRecord(trainable_state(start.model)),  # after the base, only what trains
                    num_rounds=settings.num_rounds,
                    timeout=settings.round_timeout,
                    evaluate_fn=evaluate_fn,
                    first_round=start.first_round,
                )
            except RunStopped as err:
                start.writer.save_curves()
                log(ERROR, "stopped: %s. The checkpoint is kept; to continue: iet-agc run --resume %s", err, run_dir)
                raise
            load_trainable(start.model, result.arrays.to_torch_state_dict())
            finish_run(start.writer, settings, start.model, strategy, evaluate_fn.latest, evaluator.fid_reason, started)
            if tracker is not None:
                tracker.finish(run_result(start.writer.path))
    return start.writer


def make_strategy(
    settings: Settings,
    data: ImageSet,
    start: Start,
    redistribution: Redistribution | None,
    aggregator: Strategy,
    tracker: RunTracker | None = None,
    *,
    simulated: bool = False,
) -> IETStrategy:
    """The IET strategy of this run: its ledger, what every message carries (never how the server
    tracks the run: nodes need no tracker credentials), its rules and recorder. In a deployment
    (not ``simulated``: Flower's in-memory grid) the pulls back off while no reply comes: each is
    two write transactions on the SuperLink's SQLite file."""
    if start.aggregator_state:
        if not isinstance(aggregator, Resumable):
            raise ValueError(
                f"aggregation: the checkpoint holds a server optimizer's state, which {type(aggregator).__name__} "
                "cannot take (resume with the run's own aggregation)"
            )
        aggregator.load_state_dict(start.aggregator_state)
    return IETStrategy(
        start.ledger,
        num_samples=len(data),
        train_config={
            **{k: v for k, v in settings.to_run_config().items() if k not in TRACKER_KEYS},
            protocol.FINGERPRINT: data.fingerprint,
            protocol.BASE_FINGERPRINT: start.base_fingerprint,
            protocol.RUN_KEY: start.run_key,
        },
        redistribution=redistribution or make_redistribution(settings.msr, settings.msr_proportion),
        seed=settings.seed,
        cumulative_counts=settings.skip_counts == "cumulative",
        min_nodes=settings.min_nodes,
        max_failed_rounds=settings.max_failed_rounds,
        node_max_failures=settings.node_max_failures,
        max_update_ratio=settings.max_update_ratio,
        shards_per_message=settings.shards_per_message,
        dispatcher=NodeQueues(
            settings.messages_per_node,
            max_poll_interval=None if simulated else DEPLOYMENT_MAX_POLL,
            seed=settings.seed,
        ),
        recorder=RunRecorder(
            start.writer,
            run_key=start.run_key,
            fingerprint=data.fingerprint,
            base_fingerprint=start.base_fingerprint,
            num_rounds=settings.num_rounds,
            tracker=tracker,
        ),
        should_stop=parent_gone(),
        aggregator=aggregator,
    )


def _first_line(settings: Settings, data: ImageSet, start: Start, device: torch.device, aggregation: str) -> str:
    resuming = f"; resuming after round {start.first_round - 1}" if start.first_round > 1 else ""
    return (
        f"{settings.dataset}: {len(data)} training images ({data.fingerprint}), {len(data.holdout)} held out; "
        f"K={settings.num_shards} shards of ~{len(data) // settings.num_shards}; {model_line(settings, start.model)}; "
        f"aggregation {aggregation}; device {device} ({_precision_line(settings, device, start.model)}); "
        f"output {start.writer.path}{resuming}"
    )


def _precision_line(settings: Settings, device: torch.device, model: torch.nn.Module) -> str:
    """What ``precision``, ``channels-last`` and ``compile`` give the model here (nodes resolve
    ``auto`` for their own device the same way)."""
    s = settings
    chosen = choose(s.precision, s.channels_last, s.compile, device, model, private=s.dp_sgd)
    extras = [name for name, on in (("channels-last", chosen.channels_last), ("compiled", chosen.compile)) if on]
    return ", ".join([f"{chosen.name}{' (auto)' if s.precision == 'auto' else ''}", *extras])


def make_server_app(overrides: Mapping[str, Any] | None = None, **run_kwargs: Any) -> ServerApp:
    """A ServerApp whose settings are run_config plus ``overrides``; ``run_kwargs`` go to ``run``
    (``aggregator=``, ``redistribution=``, ``evaluator_factory=``: tests, notebooks, custom rules)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = settings_from_run_config(context.run_config, overrides)
        if settings.resume:  # the run's own settings, with the changes a resume may make
            given = {**dict(context.run_config), **dict(overrides or {})}
            saved = checkpoint_settings(settings.resume)
            merged = resumed_settings(saved, given, Settings().to_run_config())
            settings = settings_from_run_config({**merged, "resume": settings.resume})
        run(grid, settings, **run_kwargs)

    return app


app = make_server_app()
