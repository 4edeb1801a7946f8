"""ServerApp: validated settings -> shards (or a checkpoint) -> IET strategy rounds -> run folder."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ddpm.adapters import adapter_state, load_trainable, merged_unet, trainable_state
from ddpm.base import model_fingerprint
from ddpm.data import load_dataset
from ddpm.device import resolve_device
from ddpm.model import initial_model
from ddpm.settings import Settings
from ddpm.shards import make_shards
from ddpm.unet import num_parameters
from evaluation.evaluator import Evaluator, MemorizationEvaluator
from evaluation.outputs import RunWriter, new_run_dir
from evaluation.plots import plot_skip_histogram
from strategies.checkpoint import Checkpoint, checkpoint_settings, load_checkpoint
from strategies.dispatch import NodeQueues
from strategies.iet import IETStrategy, RunStopped
from strategies.ledger import ShardLedger
from strategies.msr import Redistribution, make_redistribution

from .config import settings_from_run_config
from .recorder import EVAL_SECONDS, RunRecorder, fmt
from .resume import resumed_settings, run_folder_lock


def eval_rounds(settings: Settings) -> set[int]:
    """Rounds after which the global model is evaluated: every ``eval-every`` and the last."""
    every = settings.eval_every
    return {settings.num_rounds} | (set(range(every, settings.num_rounds + 1, every)) if every else set())


def evaluation_fn(
    evaluator: Evaluator, model: torch.nn.Module, rounds: set[int]
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Flower's ``evaluate_fn``: the evaluator's metrics for the rounds in ``rounds``, else None."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round not in rounds:
            return None
        load_trainable(model, arrays.to_torch_state_dict())
        started = time.monotonic()
        metrics = evaluator(server_round, model)
        values = {k: float("nan") if v is None else float(v) for k, v in metrics.items()}
        return MetricRecord({**values, EVAL_SECONDS: time.monotonic() - started})

    return evaluate


def _resume_point(settings: Settings, fingerprint: str, base_fingerprint: str) -> Checkpoint:
    ckpt = load_checkpoint(settings.resume)
    if ckpt.fingerprint != fingerprint:
        raise ValueError(f"resume: the run trained on data set {ckpt.fingerprint}; this server's copy is {fingerprint}")
    if ckpt.base_fingerprint != base_fingerprint:
        raise ValueError(
            f"init-from: the run fine-tuned the base {ckpt.base_fingerprint or '(none: from scratch)'}; "
            f"this server's is {base_fingerprint or '(none)'}"
        )
    if settings.num_rounds < ckpt.server_round:
        raise ValueError(f"num-rounds: the run already completed {ckpt.server_round} rounds, got {settings.num_rounds}")
    return ckpt


def run(
    grid: Grid,
    settings: Settings,
    *,
    redistribution: Redistribution | None = None,
    evaluator_factory: Callable[..., Evaluator] = MemorizationEvaluator,
) -> RunWriter:
    """Run IET-AGC+ end to end on ``grid`` (or continue the run named by ``resume``); returns the
    writer of the run folder. Only one process writes a run folder at a time (``.lock``)."""
    started = time.monotonic()
    data = load_dataset(**settings.dataset_kwargs())
    if len(data) < settings.mq_neighbours:
        raise ValueError(f"mq-neighbours: must be <= the {len(data)} training images, got {settings.mq_neighbours}")
    run_dir = Path(settings.resume) if settings.resume else new_run_dir(settings)
    with run_folder_lock(run_dir):
        torch.manual_seed(settings.seed)
        model = initial_model(settings, data.channels)
        base_fingerprint = model_fingerprint(model) if settings.init_from else ""
        ckpt = _resume_point(settings, data.fingerprint, base_fingerprint) if settings.resume else None
        device = resolve_device(settings.device)
        if ckpt is None:
            run_key = uuid.uuid4().hex
            writer = RunWriter(run_dir, settings)
            labels = None if data.labels is None else data.labels.numpy()
            shards = make_shards(len(data), settings.num_shards, labels, settings.seed)
            ledger = ShardLedger(shards, len(data), settings.seed)
        else:
            run_key = ckpt.run_key
            writer = RunWriter(run_dir, settings, rows=ckpt.rows, completed_round=ckpt.server_round)
            ledger = ShardLedger.from_state_dict(ckpt.ledger_meta, ckpt.ledger_arrays)
            load_trainable(model, {k: torch.from_numpy(v) for k, v in ckpt.weights.items()})
        log(
            INFO,
            f"{settings.dataset}: {len(data)} training images ({data.fingerprint}), {len(data.holdout)} held out; "
            f"K={settings.num_shards} shards of ~{len(data) // settings.num_shards}; {_model_line(settings, model)}; "
            f"device {device}; output {writer.path}" + (f"; resuming after round {ckpt.server_round}" if ckpt else ""),
        )
        evaluator = evaluator_factory(settings, data, writer.path, device)
        strategy = IETStrategy(
            ledger,
            num_samples=len(data),
            train_config={
                **settings.to_run_config(),
                "fingerprint": data.fingerprint,
                "base-fingerprint": base_fingerprint,
                "run-key": run_key,
            },
            redistribution=redistribution or make_redistribution(settings.msr, settings.msr_proportion),
            seed=settings.seed,
            cumulative_counts=settings.skip_counts == "cumulative",
            min_nodes=settings.min_nodes,
            max_failed_rounds=settings.max_failed_rounds,
            node_max_failures=settings.node_max_failures,
            dispatcher=NodeQueues(settings.messages_per_node),
            recorder=RunRecorder(
                writer,
                run_key=run_key,
                fingerprint=data.fingerprint,
                base_fingerprint=base_fingerprint,
                num_rounds=settings.num_rounds,
            ),
            should_stop=_parent_gone(),
        )
        try:
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(trainable_state(model)),  # after the base, only what trains travels
                num_rounds=settings.num_rounds,
                timeout=settings.round_timeout,
                evaluate_fn=evaluation_fn(evaluator, model, eval_rounds(settings)),
                first_round=1 if ckpt is None else ckpt.server_round + 1,
            )
        except RunStopped as err:
            writer.save_curves()
            log(ERROR, "stopped: %s. The checkpoint is kept; to continue: iet-agc run --resume %s", err, writer.path)
            raise
        load_trainable(model, result.arrays.to_torch_state_dict())
        _finish(writer, settings, model, strategy, evaluator, started)
    return writer


def _model_line(settings: Settings, model: torch.nn.Module) -> str:
    """The model part of the run's first line: size, or base and adapter with what trains."""
    total = sum(p.numel() for p in model.parameters())
    cond = f", conditional on {settings.num_classes} classes" if settings.class_conditional else ""
    if not settings.init_from:
        return f"model {settings.model} ({total / 1e6:.2f}M params{cond})"
    adapter = settings.adapter + (f" rank {settings.lora_rank}" if settings.adapter == "lora" else "")
    return (
        f"base {settings.init_from} ({total / 1e6:.2f}M params{cond}), adapter {adapter}: "
        f"{num_parameters(model) / 1e6:.4g}M train and travel"
    )


def _parent_gone() -> Callable[[], str | None]:
    """A stop check: the SuperLink that runs this ServerApp is gone.

    Flower's SuperExec starts the ServerApp and exits a few seconds after its SuperLink (it
    watches the pid given as ``--parent-pid``). A simulated run would meanwhile go on unseen,
    writing its run folder; so check that pid (read from the parent's command line, Linux) and
    the parent itself before each round.
    """
    parent = os.getppid()
    watched = _flower_parent_pid(parent)

    def check() -> str | None:
        if os.getppid() != parent or (watched is not None and not _alive(watched)):
            return f"the SuperLink that started this ServerApp (pid {watched or parent}) is gone"
        return None

    return check


def _flower_parent_pid(pid: int) -> int | None:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return int(args[args.index(b"--parent-pid") + 1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed SuperLink its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    """The process state letter from /proc (Linux); empty where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _finish(writer: RunWriter, settings: Settings, model, strategy: IETStrategy, evaluator, started: float) -> None:
    """The final pipeline, skip counts, samples and report; the summary line."""
    counts = strategy.total_counts
    pipeline = writer.save_model(merged_unet(model))  # a plain DDPMPipeline, adapters folded in
    if settings.adapter != "none" and settings.save_adapter:
        writer.save_adapter(adapter_state(model), settings)
    writer.save_skip_counts(counts)
    if settings.agc:
        plot_skip_histogram(counts, writer.path / "skip_counts.png")
    notes = [f"final weights: `{pipeline.name}/` (load with `DDPMPipeline.from_pretrained`)"]
    if settings.class_conditional:
        notes.append(
            f"class-conditional ({settings.num_classes} classes): `DDPMPipeline.__call__` passes no labels; "
            "sample with `ddpm.schedule.ddim_sample(pipe.unet, n, class_labels=labels)` "
            "or the UNet's `class_labels` argument"
        )
    if getattr(evaluator, "last_images", None) is not None:
        writer.save_samples(evaluator.last_images)
    fid_reason = getattr(evaluator, "fid_reason", "")
    if fid_reason:
        notes.append(f"FID unavailable: {fid_reason}")
    set_aside = [f"node {n} ({why})" for n, why in strategy.ledger.set_aside.items()]
    failed = [str(r) for r, rlog in sorted(strategy.log.items()) if rlog.failed]
    if set_aside:
        notes.append("nodes set aside (node-max-failures), their shards trained elsewhere: " + "; ".join(set_aside))
    if failed:
        notes.append(f"failed rounds (no valid reply, the global model kept): {', '.join(failed)}")
    writer.write_report(notes)
    final = writer.rows[-1] if writer.rows else {}
    log(
        INFO,
        f"done in {time.monotonic() - started:.0f}s: "
        + ", ".join(f"{k} {fmt(final.get(k))}" for k in writer.columns if k.startswith(("mq_", "copy_", "digit_fd")))
        + (f", FID unavailable ({fid_reason})" if fid_reason else f", FID {fmt(final.get('fid'))}")
        + (f"; set aside: {'; '.join(set_aside)}" if set_aside else "")
        + (f"; failed rounds: {', '.join(failed)}" if failed else "")
        + f"; results in {writer.path}",
    )


def make_server_app(overrides: Mapping[str, Any] | None = None, **run_kwargs) -> ServerApp:
    """A ServerApp whose settings are run_config plus ``overrides`` (tests, notebooks, custom rules)."""
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
