"""Recording the run: each finished round (rows, checkpoint, summary line) and its end (pipeline, report)."""

from __future__ import annotations

import threading
import time
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from ddpm.adapters import adapter_state, merged_unet
from ddpm.unet import num_parameters
from evaluation.columns import evaluation_columns
from evaluation.evaluator import Evaluation
from evaluation.plots import plot_skip_histogram
from strategies import protocol
from strategies.iet import IETStrategy, RoundLog, StrategyState

from .checkpoint import Checkpoint, save_checkpoint
from .model import model_family
from .run_folder import COUNT_COLUMNS, RunWriter
from .settings import Settings
from .trackers import RunTracker

EVAL_SECONDS = "eval-seconds"  # reported by the evaluation function, printed, not kept in rounds.csv

# Held while a round (rows, checkpoint, tracker) or the run's end is written; a command that stops
# takes it for good (``hold_records``), so that nothing is recorded after its stop: a round that
# fails only because the stop ends Ray's actors under it never reaches rounds.csv or the checkpoint.
_RECORDS = threading.Lock()


def hold_records(timeout: float = 10.0) -> bool:
    """From now on, this process records no round and no run end (their threads wait for good);
    a record under way is finished first (up to ``timeout`` seconds; each one is atomic anyway)."""
    return _RECORDS.acquire(timeout=timeout)


def fmt(value: Any) -> str:
    """Counts as integers, rates and distances with 4 significant digits, missing as n/a."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


class RunRecorder:
    """Fed by the strategy after every round: appends the round's rows, then writes the checkpoint
    (after the rows, so a checkpoint never refers to rows that are not on disk), then hands the
    round to the ``tracker`` (after the checkpoint, so a tracker never holds a round a resume redoes)."""

    def __init__(
        self,
        writer: RunWriter,
        *,
        run_key: str,
        fingerprint: str,
        num_rounds: int,
        base_fingerprint: str = "",
        tracker: RunTracker | None = None,
    ) -> None:
        self.writer = writer
        self.tracker = tracker
        self.run_key = run_key
        self.fingerprint = fingerprint
        self.base_fingerprint = base_fingerprint
        self.num_rounds = num_rounds
        self.last_time = time.monotonic()

    def round_done(
        self, rlog: RoundLog, arrays: ArrayRecord, evaluation: MetricRecord | None, state: StrategyState
    ) -> None:
        with _RECORDS:
            self._record(rlog, arrays, evaluation, state)

    def _record(
        self, rlog: RoundLog, arrays: ArrayRecord, evaluation: MetricRecord | None, state: StrategyState
    ) -> None:
        r, m, w = rlog.server_round, rlog.metrics, self.writer
        w.add_assignment(r, rlog.assignment, rlog.moved)
        w.add_shard_metrics(r, rlog.shard_metrics)
        unanswered = [(s, rlog.placed.get(s, -1), why) for s, why in sorted(rlog.timed_out.items())]
        w.add_dropped(r, rlog.dropped + unanswered)
        row: dict[str, Any] = {"round": r, **self._reply_columns(m)}
        row |= {key: int(m.get(key, 0)) for key in COUNT_COLUMNS}
        evaluation = dict(evaluation or {})
        eval_seconds = evaluation.pop(EVAL_SECONDS, 0.0)
        row.update({k: None if v != v else v for k, v in evaluation.items()})
        row["seconds"] = round(time.monotonic() - self.last_time, 2)  # the round: train, aggregate, evaluate
        self.last_time = time.monotonic()
        w.add_round(row)
        if evaluation:  # the curves follow a long run at each evaluation (the report draws the final ones)
            w.save_curves()
        save_checkpoint(
            w.path,
            Checkpoint(
                server_round=r,
                weights={k: a.numpy() for k, a in arrays.items()},
                ledger_meta=state.ledger_meta,
                ledger_arrays=state.ledger_arrays,
                aggregator=state.aggregator,
                rows=w.rows,
                settings=w.settings.to_run_config(),
                run_key=self.run_key,
                fingerprint=self.fingerprint,
                base_fingerprint=self.base_fingerprint,
            ),
        )
        if self.tracker is not None:
            self.tracker.round_done(row)
        self._log_round(rlog, row, evaluation, eval_seconds)

    def _reply_columns(self, metrics: MetricRecord) -> dict[str, Any]:
        """The round's columns of the reply metrics; a ``max``-reduced one (epsilon) is the largest so
        far, so a shard that did not reply this round keeps its value."""
        columns: dict[str, Any] = {}
        for spec in (s for s in protocol.reply_metrics(self.writer.config) if s.per_round):
            values = [metrics.get(spec.key)]
            if spec.reduce == "max":
                values += [p.get(spec.column) for p in self.writer.rows]
            known = [v for v in values if v is not None]
            columns[spec.column] = (max(known) if known else None) if spec.reduce == "max" else values[0]
        return columns

    def _log_round(self, rlog: RoundLog, row: dict[str, Any], evaluation: dict, eval_seconds: float) -> None:
        """The round's one log line (and the nodes set aside)."""
        r = rlog.server_round
        if rlog.failed:
            head = f"round {r}/{self.num_rounds}: FAILED, no valid reply; the global model is kept"
        else:
            head = (
                f"round {r}/{self.num_rounds}: loss {row['train_loss']:.4f} skip {row['skip_rate']:.3f} "
                f"aug {row['aug_rate']:.3f} moved {row['moved']}"
            )
        problems = ""
        if row["dropped"] or row["timed_out"]:
            problems = f", {row['dropped']} dropped, {row['timed_out']} timed out"
        log(
            WARNING if rlog.failed else INFO,
            "%s (%.1fs%s%s)%s",
            head,
            row["seconds"],
            problems,
            f", evaluation {eval_seconds:.1f}s" if eval_seconds else "",
            "".join(f" {k} {fmt(row[k])}" for k in evaluation_columns(row)),
        )
        for node, why in rlog.set_aside.items():
            log(WARNING, "node %d set aside: %s", node, why)


def finish_run(
    writer: RunWriter,
    settings: Settings,
    model: torch.nn.Module,
    strategy: IETStrategy,
    evaluation: Evaluation | None,
    fid_reason: str,
    started: float,
) -> None:
    """The final pipeline, skip counts, samples (the last ``evaluation``'s images) and report; the
    summary line (``fid_reason``: why FID is unavailable, "" when it is not)."""
    with _RECORDS:
        counts = strategy.total_counts
        pipeline = writer.save_model(merged_unet(model), model_family(settings))  # adapters folded in
        if settings.adapter != "none" and settings.save_adapter:
            writer.save_adapter(adapter_state(model), settings)
        writer.save_skip_counts(counts)
        if settings.agc:
            plot_skip_histogram(counts, writer.path / "skip_counts.png")
        notes = [f"final weights: `{pipeline.name}/` ({_loading(settings)})"]
        if settings.class_conditional:
            notes.append(
                f"class-conditional ({settings.num_classes} classes): `DDPMPipeline.__call__` passes no labels; "
                "sample with `ddpm.schedule.ddim_sample(pipe.unet, n, class_labels=labels)` "
                "or the UNet's `class_labels` argument"
            )
        if evaluation is not None:
            writer.save_samples(evaluation.images)
        if fid_reason:
            notes.append(f"FID unavailable: {fid_reason}")
        final = writer.rows[-1] if writer.rows else {}
        privacy = privacy_words(settings, final.get("dp_epsilon"))
        if privacy:
            notes.append(privacy)
        set_aside = [f"node {n} ({why})" for n, why in strategy.ledger.set_aside.items()]
        failed = [str(r) for r, rlog in sorted(strategy.log.items()) if rlog.failed]
        if set_aside:
            notes.append("nodes set aside (node-max-failures), their shards trained elsewhere: " + "; ".join(set_aside))
        if failed:
            notes.append(f"failed rounds (no valid reply, the global model kept): {', '.join(failed)}")
        writer.write_report(notes)
        log(
            INFO,
            f"done in {time.monotonic() - started:.0f}s: "
            + ", ".join(
                f"{k} {fmt(final.get(k))}" for k in evaluation_columns(writer.columns) if not k.startswith("fid")
            )
            + (f", FID unavailable ({fid_reason})" if fid_reason else f", FID {fmt(final.get('fid'))}")
            + (f", epsilon {final['dp_epsilon']:.2f} (delta {settings.dp_delta:g})" if privacy else "")
            + (f"; set aside: {'; '.join(set_aside)}" if set_aside else "")
            + (f"; failed rounds: {', '.join(failed)}" if failed else "")
            + f"; results in {writer.path}",
        )


def privacy_words(settings: Settings, epsilon: float | None) -> str:
    """The report's line on DP-SGD's guarantee ('' without ``dp-sgd``)."""
    if not settings.dp_sgd or epsilon is None:
        return ""
    return (
        f"DP-SGD (Opacus, {settings.dp_accountant} accountant, C = {settings.dp_max_grad_norm:g}): "
        f"epsilon {epsilon:.2f} at delta {settings.dp_delta:g}, the largest shard's over all rounds (the shards "
        "are disjoint: parallel composition); it covers the released weights, not the loss metrics the replies carry"
    )


def _loading(settings: Settings) -> str:
    """How the saved pipeline folder loads."""
    if settings.text_conditional:
        return (
            "a Stable Diffusion pipeline (the fine-tuned UNet with the base's frozen VAE, text encoder, tokenizer "
            "and scheduler): load with `StableDiffusionPipeline.from_pretrained`"
        )
    if settings.ambient:
        return (
            "an Ambient Diffusion pipeline: load with `DiffusionPipeline.from_pretrained(folder, "
            "custom_pipeline=folder, trust_remote_code=True)` (its `pipeline.py`) or "
            "`ddpm.ambient_pipeline.AmbientPipeline.from_pretrained(folder)`"
        )
    return "load with `DDPMPipeline.from_pretrained`"


def model_line(settings: Settings, model: torch.nn.Module) -> str:
    """The model part of the run's first line: size, or base and adapter with what trains."""
    total = sum(p.numel() for p in model.parameters())
    cond = f", conditional on {settings.num_classes} classes" if settings.class_conditional else ""
    cond = ", text-conditional: VAE and text encoder frozen" if settings.text_conditional else cond
    if not settings.init_from:
        return f"model {settings.model} ({total / 1e6:.2f}M params{cond})"
    adapter = settings.adapter + (f" rank {settings.lora_rank}" if settings.adapter == "lora" else "")
    return (
        f"base {settings.init_from} ({total / 1e6:.2f}M params{cond}), adapter {adapter}: "
        f"{num_parameters(model) / 1e6:.4g}M train and travel"
    )
