"""The run folder: rounds.csv, assignments.csv, moved.csv, settings, grids, pipeline, report."""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ddpm.family import PIXEL_DDPM, DiffusionFamily
from evaluation.columns import evaluation_columns, mq_column
from evaluation.plots import plot_curves, save_sample_grid
from strategies import protocol
from strategies.replies import record_bytes

from .checkpoint import CheckpointError, load_checkpoint
from .config import toml_value
from .settings import Settings

COUNT_COLUMNS = ("moved", "replies", "dropped", "timed_out")  # rounds.csv, after the reply metrics' means


def round_columns(config: dict[str, Any] | None = None) -> list[str]:
    """rounds.csv's columns before the evaluation's: the reply metrics' means (the protocol's, for a
    run with settings ``config``), counts, time."""
    per_round = [m.column for m in protocol.reply_metrics(config) if m.per_round]
    return ["round", *per_round, *COUNT_COLUMNS, "seconds"]


def shard_columns(config: dict[str, Any] | None = None) -> list[str]:
    """shards.csv's columns after round and shard: the node, its local step, the reply's metrics."""
    return ["node", "local_step", *(m.column for m in protocol.reply_metrics(config))]


def tables(config: dict[str, Any] | None = None) -> dict[str, str]:
    """The per-round tables appended as rounds finish, and their headers."""
    return {
        "assignments.csv": "round,shard,sample_id",
        "moved.csv": "round,sample_id,from_shard,to_shard",
        "shards.csv": "round,shard," + ",".join(shard_columns(config)),
        "dropped.csv": "round,shard,node,reason",
    }


def new_run_dir(settings: Settings) -> Path:
    """A fresh folder under ``out-dir`` named by time, data set and seed."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(settings.out_dir).expanduser() / f"{stamp}-{settings.dataset}-seed{settings.seed}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


class RunWriter:
    """Writes one run's files as rounds finish, so a stopped run still leaves its table.

    A resumed run passes the checkpoint's ``rows`` and ``completed_round``: the tables are cut
    back to that round (a crash may have left rows of the round in flight) and go on from there.

    Parameters
    ----------
    path : Path
        The run folder (existing; ``new_run_dir`` makes one).
    settings : Settings
        The run's settings: written to ``settings.toml``; its thresholds name the MQ columns.
    rows : list[dict] | None (default: None)
        A resumed run's ``rounds.csv`` rows from its checkpoint (None: a new run).
    completed_round : int (default: 0)
        The last round the checkpoint holds: per-round tables are cut back to it.
    table_bytes : dict[str, int] | None (default: None)
        A resumed run's tables' sizes when its checkpoint was written (``Checkpoint.tables``, checked
        against their checksums): those tables are cut back to exactly these bytes; the others (a
        format-1 checkpoint) by their round column.
    """

    def __init__(
        self,
        path: Path,
        settings: Settings,
        *,
        rows: list[dict] | None = None,
        completed_round: int = 0,
        table_bytes: dict[str, int] | None = None,
    ):
        self.path = Path(path)
        self.settings = settings
        self.rows: list[dict] = []
        eval_cols = [mq_column(t) for t in settings.thresholds] + ["fid"]
        self.config = settings.to_run_config()
        self.columns = round_columns(self.config) + eval_cols
        text = "".join(f"{k} = {toml_value(v)}\n" for k, v in self.config.items())
        (self.path / "settings.toml").write_text(text)
        for name, header in tables(self.config).items():
            table = self.path / name
            if rows is None or not table.is_file():
                table.write_text(header + "\n")
            elif name in (table_bytes or {}):
                os.truncate(table, table_bytes[name])
            else:
                frame = pd.read_csv(table, keep_default_na=False, dtype=str)
                frame[frame["round"].astype(int) <= completed_round].to_csv(table, index=False)
        for row in rows or []:
            self.add_round(row)

    def add_round(self, row: dict) -> None:
        """Append a round's row; columns an evaluator adds (e.g. copy_1) join the table."""
        self.rows.append(row)
        self.columns += [k for k in row if k not in self.columns]
        frame = pd.DataFrame(self.rows)
        for col in self.columns:
            if col not in frame:
                frame[col] = np.nan
        frame[self.columns].to_csv(self.path / "rounds.csv", index=False)

    def add_assignment(self, server_round: int, shards: list[np.ndarray], moved: list[np.ndarray]) -> None:
        k = len(shards)
        frame = pd.DataFrame(
            {
                "round": server_round,
                "shard": np.repeat(np.arange(k), [len(s) for s in shards]),
                "sample_id": np.concatenate(shards),
            }
        )
        frame.to_csv(self.path / "assignments.csv", mode="a", header=False, index=False)
        if moved and any(len(m) for m in moved):
            mv = pd.DataFrame(
                {
                    "round": server_round,
                    "sample_id": np.concatenate(moved),
                    "from_shard": np.repeat(np.arange(k), [len(m) for m in moved]),
                    "to_shard": np.repeat((np.arange(k) + 1) % k, [len(m) for m in moved]),
                }
            )
            mv.to_csv(self.path / "moved.csv", mode="a", header=False, index=False)

    def add_shard_metrics(self, server_round: int, shard_metrics: dict[int, dict[str, float]]) -> None:
        """One row per shard that replied: what it trained on and how (shards.csv)."""
        columns = shard_columns(self.config)
        rows = [[server_round, s] + [m.get(c) for c in columns] for s, m in sorted(shard_metrics.items())]
        pd.DataFrame(rows).to_csv(self.path / "shards.csv", mode="a", header=False, index=False)

    def add_dropped(self, server_round: int, dropped: list[tuple[int, int, str]]) -> None:
        """One row per reply that was dropped or shard that got no reply, with the reason (dropped.csv)."""
        rows = [[server_round, shard, node, reason] for shard, node, reason in dropped]
        pd.DataFrame(rows).to_csv(self.path / "dropped.csv", mode="a", header=False, index=False)

    def save_skip_counts(self, counts: np.ndarray) -> Path:
        """Total skips per training id over the run (skip_counts.csv: sample_id, skips)."""
        target = self.path / "skip_counts.csv"
        pd.DataFrame({"sample_id": np.arange(len(counts)), "skips": counts}).to_csv(target, index=False)
        return target

    def save_model(self, model: torch.nn.Module, family: DiffusionFamily = PIXEL_DDPM) -> Path:
        """The final weights as the family's diffusers pipeline folder (pixel DDPM: a
        ``DDPMPipeline``, loaded with ``DDPMPipeline.from_pretrained``)."""
        target = self.path / "pipeline"
        family.pipeline(model.cpu()).save_pretrained(target)
        return target

    def save_adapter(self, tensors: dict[str, torch.Tensor], settings: Settings) -> Path:
        """The adapter's tensors alone (``adapter/adapter.safetensors``) and its settings, beside the
        merged pipeline: apply them to the ``init-from`` base with ``ddpm.adapters.attach_adapter``."""
        from safetensors.torch import save_file

        target = self.path / "adapter"
        target.mkdir(exist_ok=True)
        keys = ("init-from", "adapter", "lora-rank", "lora-alpha", "lora-targets", "lora-freeze-a", "seed")
        config = {k: str(v) for k, v in settings.to_run_config().items() if k in keys}
        save_file({k: v.contiguous() for k, v in tensors.items()}, target / "adapter.safetensors", metadata=config)
        return target

    def save_samples(self, images: torch.Tensor, name: str = "samples.png") -> Path:
        return save_sample_grid(images, self.path / name)

    def _model_words(self) -> str:
        s = self.settings
        if not s.init_from:
            return f"model `{s.model}`"
        rank = f" rank {s.lora_rank}" + (", A frozen" if s.lora_freeze_a else "") if s.adapter == "lora" else ""
        return f"fine-tuned from `{s.init_from}` (adapter `{s.adapter}`{rank})"

    def save_curves(self) -> Path | None:
        """``curves.png``: the run so far against the round, drawn from rounds.csv (None before round 1)."""
        table = self.path / "rounds.csv"
        if not self.rows or not table.is_file():
            return None
        return plot_curves(pd.read_csv(table), self.path / "curves.png")

    def _local_words(self) -> str:
        """A round's local training in words: E epochs, or ``local-steps`` steps."""
        steps = self.settings.local_steps
        return f"{steps} local steps" if steps else f"E = {self.settings.local_epochs} local epochs"

    def write_report(self, notes: list[str]) -> Path:
        """``report.md``: the per-round table, the curves, the notes and the pictures."""
        frame = pd.DataFrame(self.rows)
        curves = self.save_curves()
        lines = [
            f"# Run {self.path.name}",
            "",
            f"Data set `{self.settings.dataset}`, {self._model_words()}, "
            f"K = {self.settings.num_shards} shards, {self.settings.num_rounds} rounds of "
            f"{self._local_words()}.",
            "",
        ]
        if not frame.empty:
            lines += [
                "## Per round",
                "",
                frame.to_markdown(index=False, floatfmt=".4g"),
                "",
            ]
        if curves is not None:
            lines += [
                "Loss, skip and augmentation rates, MQ, copy_1/copy_5 and image quality against the round:",
                "",
                f"![curves]({curves.name})",
                "",
            ]
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + ["", "![samples](samples.png)", ""]
        if (self.path / "skip_counts.png").is_file():
            lines += ["Skips per training sample over the run:", "", "![skip counts](skip_counts.png)", ""]
        evals, pairs = sorted(self.path.glob("eval_*.md")), sorted(self.path.glob("pairs_*.png"))
        if evals:  # the evaluator's per-evaluation reports and the last closest-pair grid
            lines += ["## Evaluations", ""] + [f"- [{p.stem}]({p.name})" for p in evals] + [""]
            if pairs:
                lines += ["Closest generated/training pairs, last evaluation:", "", f"![pairs]({pairs[-1].name})", ""]
        target = self.path / "report.md"
        target.write_text("\n".join(lines))
        return target


# ---- reading a run folder back (the sweep, evaluate) ---------------------------------------
def run_folders(folder: Path) -> tuple[Path | None, Path | None]:
    """(the finished run, the stopped run with a checkpoint) among the run folders under ``folder``."""
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    finished = [p for p in runs if (p / "report.md").is_file() and (p / "rounds.csv").is_file()]
    stopped = [p for p in runs if (p / "checkpoint").is_dir() and p not in finished]
    return (finished[-1] if finished else None), (stopped[-1] if stopped else None)


def run_result(run_dir: Path) -> dict[str, Any]:
    """The row of a finished run: the last round's evaluation and the run's mean skip/aug rates."""
    rounds = pd.read_csv(run_dir / "rounds.csv")
    last = rounds.iloc[-1]
    row = {k: last[k] for k in evaluation_columns(rounds.columns)}
    row["skip_rate"] = rounds["skip_rate"].mean()
    row["aug_rate"] = rounds["aug_rate"].mean()
    row["moved"] = rounds["moved"].mean()
    row["minutes"] = rounds["seconds"].sum() / 60
    if "dp_epsilon" in rounds:  # DP-SGD: the epsilon spent by the end
        row["dp_epsilon"] = last["dp_epsilon"]
    row.update(traffic(run_dir))
    return row


def traffic(run_dir: Path) -> dict[str, int]:
    """``reply_bytes``: the weights record one message carries (the final checkpoint's weights are
    exactly what travels: all of them, or an adapter's); ``round_bytes``: a round's K records out
    and K back (the skip counts and metrics add a few KB). Empty without a checkpoint."""
    try:
        ckpt = load_checkpoint(run_dir)
    except CheckpointError:
        return {}
    reply = record_bytes(ckpt.weights)
    return {"reply_bytes": reply, "round_bytes": 2 * int(ckpt.settings["num-shards"]) * reply}


def settings_of(run_dir: Path) -> dict[str, Any]:
    """The run config a run folder was made with (its settings.toml), without where it wrote."""
    saved = tomllib.loads((run_dir / "settings.toml").read_text())
    return {k: v for k, v in saved.items() if k not in ("out-dir", "resume")}
