"""Recording a finished round: its rows in the run folder, its checkpoint, its summary line."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from evaluation.outputs import RunWriter
from strategies.checkpoint import Checkpoint, save_checkpoint
from strategies.iet import RoundLog

EVAL_PREFIXES = ("mq_", "copy_", "fid", "digit_fd")
EVAL_SECONDS = "eval-seconds"  # reported by the evaluation function, printed, not kept in rounds.csv


def fmt(value: Any) -> str:
    """Counts as integers, rates and distances with 4 significant digits, missing as n/a."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


class RunRecorder:
    """Fed by the strategy after every round: appends the round's rows, then writes the checkpoint
    (after the rows, so a checkpoint never refers to rows that are not on disk)."""

    def __init__(
        self, writer: RunWriter, *, run_key: str, fingerprint: str, num_rounds: int, base_fingerprint: str = ""
    ) -> None:
        self.writer = writer
        self.run_key = run_key
        self.fingerprint = fingerprint
        self.base_fingerprint = base_fingerprint
        self.num_rounds = num_rounds
        self.last_time = time.monotonic()

    def round_done(
        self, rlog: RoundLog, arrays: ArrayRecord, evaluation: MetricRecord | None, state: tuple[dict, dict]
    ) -> None:
        r, m, w = rlog.server_round, rlog.metrics, self.writer
        meta, ledger_arrays = state
        w.add_assignment(r, rlog.assignment, rlog.moved)
        w.add_shard_metrics(r, rlog.shard_metrics)
        nodes = meta["node-of-shard"]
        w.add_dropped(r, rlog.dropped + [(s, nodes.get(str(s), -1), why) for s, why in sorted(rlog.timed_out.items())])
        row: dict[str, Any] = {
            "round": r,
            "train_loss": m.get("train-loss"),
            "skip_rate": m.get("skip-rate"),
            "aug_rate": m.get("aug-rate"),
            "moved": int(m.get("moved", 0)),
            "replies": int(m.get("replies", 0)),
            "dropped": int(m.get("dropped", 0)),
            "timed_out": int(m.get("timed_out", 0)),
        }
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
                ledger_meta=meta,
                ledger_arrays=ledger_arrays,
                rows=w.rows,
                settings=w.settings.to_run_config(),
                run_key=self.run_key,
                fingerprint=self.fingerprint,
                base_fingerprint=self.base_fingerprint,
            ),
        )
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
            "".join(f" {k} {fmt(v)}" for k, v in row.items() if k.startswith(EVAL_PREFIXES)),
        )
        for node, why in rlog.set_aside.items():
            log(WARNING, "node %d set aside: %s", node, why)
