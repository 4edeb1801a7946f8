"""ServerApp: validated settings -> shards -> IET strategy rounds -> evaluation -> run folder."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ddpm.data import load_dataset
from ddpm.device import resolve_device
from ddpm.settings import Settings
from ddpm.shards import make_shards
from ddpm.unet import build_unet, num_parameters
from evaluation.evaluator import Evaluator, MemorizationEvaluator
from evaluation.outputs import RunWriter, new_run_dir
from evaluation.plots import plot_skip_histogram
from strategies.iet import IETStrategy, RoundLog
from strategies.msr import Redistribution, make_redistribution

from .config import settings_from_run_config

log = logging.getLogger("iet_agc")


EVAL_PREFIXES = ("mq_", "copy_", "fid", "digit_fd")


def _fmt(value: Any) -> str:
    """Counts as integers, rates and distances with 4 significant digits, missing as n/a."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


def _say(text: str) -> None:
    """Progress for the user: Flower streams the ServerApp's stdout with `flwr run --stream`."""
    print(f"[iet-agc] {text}", flush=True)


def run(
    grid: Grid,
    settings: Settings,
    *,
    redistribution: Redistribution | None = None,
    evaluator_factory: Callable[..., Evaluator] = MemorizationEvaluator,
) -> RunWriter:
    """Run IET-AGC+ end to end on ``grid``; returns the writer of the run folder."""
    started = time.monotonic()
    data = load_dataset(**settings.dataset_kwargs())
    if len(data) < settings.mq_neighbours:
        raise ValueError(f"mq-neighbours: must be <= the {len(data)} training images, got {settings.mq_neighbours}")
    shards = make_shards(
        len(data), settings.num_shards, None if data.labels is None else data.labels.numpy(), settings.seed
    )
    device = resolve_device(settings.device)
    writer = RunWriter(new_run_dir(settings), settings)
    torch.manual_seed(settings.seed)
    model = build_unet(settings.model, settings.image_size, data.channels)
    _say(
        f"{settings.dataset}: {len(data)} training images ({data.fingerprint}), {len(data.holdout)} held out; "
        f"K={settings.num_shards} shards of ~{len(data) // settings.num_shards}; model {settings.model} "
        f"({num_parameters(model) / 1e6:.2f}M params); device {device}; output {writer.path}"
    )
    evaluator = evaluator_factory(settings, data, writer.path, device)
    eval_rounds = {settings.num_rounds} | (
        set(range(settings.eval_every, settings.num_rounds + 1, settings.eval_every)) if settings.eval_every else set()
    )
    last_time = [time.monotonic()]

    def on_round(server_round: int, rlog: RoundLog) -> None:
        writer.add_assignment(server_round, rlog.assignment, rlog.moved)
        writer.add_shard_metrics(server_round, rlog.shard_metrics)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        m = strategy.log[server_round].metrics
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": m.get("train-loss"),
            "skip_rate": m.get("skip-rate"),
            "aug_rate": m.get("aug-rate"),
            "moved": int(m.get("moved", 0)),
        }
        eval_seconds = 0.0
        if server_round in eval_rounds:
            model.load_state_dict(arrays.to_torch_state_dict())
            eval_start = time.monotonic()
            row.update(evaluator(server_round, model))
            eval_seconds = time.monotonic() - eval_start
        row["seconds"] = round(time.monotonic() - last_time[0], 2)  # the round: train, aggregate, evaluate
        last_time[0] = time.monotonic()
        writer.add_round(row)
        _say(
            f"round {server_round}/{settings.num_rounds}: loss {row['train_loss']:.4f} skip {row['skip_rate']:.3f} "
            f"aug {row['aug_rate']:.3f} moved {row['moved']} ({row['seconds']:.1f}s"
            + (f", evaluation {eval_seconds:.1f}s)" if eval_seconds else ")")
            + "".join(f" {k} {_fmt(v)}" for k, v in row.items() if k.startswith(EVAL_PREFIXES))
        )
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float))})

    strategy = IETStrategy(
        shards,
        num_samples=len(data),
        train_config={**settings.to_run_config(), "fingerprint": data.fingerprint},
        redistribution=redistribution or make_redistribution(settings.msr, settings.msr_proportion),
        seed=settings.seed,
        cumulative_counts=settings.skip_counts == "cumulative",
        min_nodes=settings.min_nodes,
        on_round=on_round,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=settings.num_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluate,
    )
    model.load_state_dict(result.arrays.to_torch_state_dict())
    pipeline = writer.save_model(model)
    writer.save_skip_counts(strategy.total_counts)
    if settings.agc:
        plot_skip_histogram(strategy.total_counts, writer.path / "skip_counts.png")
    notes = [f"final weights: `{pipeline.name}/` (load with `DDPMPipeline.from_pretrained`)"]
    if getattr(evaluator, "last_images", None) is not None:
        writer.save_samples(evaluator.last_images)
    fid_reason = getattr(evaluator, "fid_reason", "")
    if fid_reason:
        notes.append(f"FID unavailable: {fid_reason}")
    writer.write_report(notes)
    final = writer.rows[-1] if writer.rows else {}
    _say(
        f"done in {time.monotonic() - started:.0f}s: "
        + ", ".join(f"{k} {_fmt(final.get(k))}" for k in writer.columns if k.startswith(("mq_", "copy_", "digit_fd")))
        + (f", FID unavailable ({fid_reason})" if fid_reason else f", FID {_fmt(final.get('fid'))}")
        + f"; results in {writer.path}"
    )
    return writer


def make_server_app(overrides: Mapping[str, Any] | None = None, **run_kwargs) -> ServerApp:
    """A ServerApp whose settings are run_config plus ``overrides`` (tests, notebooks, custom rules)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = settings_from_run_config(context.run_config, overrides)
        run(grid, settings, **run_kwargs)

    return app


app = make_server_app()
