"""A sweep's summary: ``summary.md`` (mean ± sd over seeds), ``tradeoff.png`` (copy_5 against the
quality figure) and ``metrics.png`` (each metric against the swept value), from ``results.csv``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fl_app.settings import Settings

from .sweep_file import REFERENCE, Sweep, run_row

SUMMARY, TRADEOFF, METRICS_PLOT = "summary.md", "tradeoff.png", "metrics.png"
RUN_COLUMNS = ("skip_rate", "aug_rate", "moved", "round_MB", "minutes")  # per-run figures beside the evaluation
PLOTTED = ("copy_1", "copy_5", "mq_0.5")  # plus the quality figure


def summarize(results: pd.DataFrame, metrics: Iterable[str], order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per cell: ``n`` (seeds), and ``<metric>_mean`` / ``<metric>_sd`` (sample sd, ddof 1; NaN for
    one seed) for each metric present; cells in ``order`` (default: first appearance)."""
    present = [m for m in metrics if m in results]
    groups = results.groupby("cell", sort=False)
    summary = pd.DataFrame({"n": groups.size()})
    for m in present:
        values = groups[m]
        summary[f"{m}_mean"] = values.mean()
        summary[f"{m}_sd"] = values.std(ddof=1)
    if order is not None:
        summary = summary.reindex([c for c in order if c in summary.index])
    return summary


def markdown_table(summary: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> str:
    """``mean ± sd`` per metric and cell (just the mean for one seed; ``n/a`` where missing)."""

    def sig(x: float, n: int) -> str:  # n significant digits, never in exponent form below 1e6
        return f"{float(f'{x:.{n}g}'):g}"

    def cell(mean: float, sd: float) -> str:
        if mean != mean:
            return "n/a"
        return sig(mean, digits) if sd != sd else f"{sig(mean, digits)} ± {sig(sd, 2)}"

    present = [m for m in metrics if f"{m}_mean" in summary]
    table = pd.DataFrame(
        {m: [cell(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_sd"], strict=True)] for m in present},
        index=summary.index,
    )
    table.insert(0, "seeds", summary["n"].astype(int))
    return table.reset_index(names="cell").to_markdown(index=False)


def metric_columns(results: pd.DataFrame, quality: str) -> list[str]:
    """The summarised columns: memorization, quality with its interval width and floor, run figures."""
    if f"{quality}_hi" in results and f"{quality}_lo" in results:
        results[f"{quality}_width"] = results[f"{quality}_hi"] - results[f"{quality}_lo"]
    if "round_bytes" in results:
        results["round_MB"] = results["round_bytes"] / 1e6
    mq = [c for c in results if c.startswith("mq_")]
    ordered = ["copy_1", "copy_5", *mq, quality, f"{quality}_width", f"{quality}_floor", "dp_epsilon", *RUN_COLUMNS]
    return [c for c in ordered if c in results]


def write_outputs(sweep: Sweep, results: pd.DataFrame) -> None:
    """``summary.md``, ``tradeoff.png`` and ``metrics.png`` from the results so far."""
    if results.empty:
        return
    results = results.copy()
    metrics = metric_columns(results, sweep.quality)
    summary = summarize(results, metrics, _order(sweep))
    q = sweep.quality
    lines = [
        f"# Sweep {sweep.path.name}",
        "",
        f"Mean ± sd over seeds ({', '.join(map(str, sweep.seeds))}); one run per cell and seed, final evaluation. "
        f"`{q}_width`: the 95 % split-sample interval of {q} over the generated images (mean over seeds); "
        f"`{q}_floor`: {q} of as many held-out real images. `round_MB`: weights sent and received in a round "
        f"(K records each way). `minutes`: the run's rounds.",
        "",
        *_base_lines(sweep, q),
        markdown_table(summary, metrics),
        "",
        f"![trade-off]({TRADEOFF})",
        "",
        f"![metrics]({METRICS_PLOT})",
        "",
    ]
    (sweep.out / SUMMARY).write_text("\n".join(lines))
    plot_tradeoff(summary, q, sweep.out / TRADEOFF)
    plot_metrics(sweep, results, [*PLOTTED, q], sweep.out / METRICS_PLOT)


def _order(sweep: Sweep) -> list[str]:
    """The summary's rows: the base's reference row (with [pretrain]), then the cells in file order."""
    return ([REFERENCE] if sweep.pretrain is not None else []) + [c.name for c in sweep.cells]


def _base_lines(sweep: Sweep, quality: str) -> list[str]:
    """The base run's line in the summary: where it is and how good it is on its own (spare) digits."""
    if sweep.pretrain is None or not sweep.init_from:
        return []
    run = Path(sweep.init_from).parent
    r = run_row(run)
    got = ", ".join(f"{k} {r[k]:.3g}" for k in ("copy_5", quality) if k in r and r[k] == r[k])
    return [
        f"Every cell fine-tunes the base run `{run}` ([pretrain]: trained once on the spare digits, "
        f"neither training nor held-out ones; its own final evaluation: {got or 'n/a'}, {r['minutes']:.1f} min). "
        f"The row `{REFERENCE}` is that base evaluated as the cells are, against their training images, "
        f"without fine-tuning: what the cells' copying and quality are read against.",
        "",
    ]


_MARKERS = "osD^vP*Xh<>p"


def plot_tradeoff(summary: pd.DataFrame, quality: str, path: Path) -> Path:
    """copy_5 against the quality figure, one point per cell, error bars = sd over seeds."""
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(summary, quality)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff_figure(summary: pd.DataFrame, quality: str) -> Any:
    """The trade-off plot's figure: each cell a marker named in the legend (names printed beside
    points would overlap where cells land close together, e.g. LoRA and DiffFit near the origin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, row) in enumerate(summary.iterrows()):
        ax.errorbar(
            row.get(f"{quality}_mean", math.nan),
            row.get("copy_5_mean", math.nan),
            xerr=row.get(f"{quality}_sd"),
            yerr=row.get("copy_5_sd"),
            fmt=_MARKERS[i % len(_MARKERS)],
            capsize=3,
            label=str(name),
        )
    if f"{quality}_floor_mean" in summary:
        ax.axvline(summary[f"{quality}_floor_mean"].mean(), color="grey", ls=":", label=f"{quality} floor (real)")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"{quality} (lower = better quality)")
    ax.set_ylabel("copy_5 (lower = less copying)")
    ax.set_title("Memorization vs quality (mean ± sd over seeds)")
    fig.tight_layout()
    return fig


def plot_metrics(sweep: Sweep, results: pd.DataFrame, metrics: Sequence[str], path: Path) -> Path:
    """Each metric against each swept key (cells at the base value of the other keys), or against
    the named rows when nothing is swept; mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in results]
    axes_keys = sweep.swept or ["cell"]
    fig, axes = plt.subplots(
        len(axes_keys), len(metrics), figsize=(3.2 * len(metrics), 2.8 * len(axes_keys)), squeeze=False
    )
    for i, key in enumerate(axes_keys):
        frame = results if key == "cell" else _along(sweep, results, key)
        frame = frame.assign(row=frame["row"].fillna("") if "row" in frame else "")
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            if key == "cell":
                stats = frame.groupby("cell", sort=False)[metric].agg(["mean", "std"])
                stats = stats.reindex([c for c in _order(sweep) if c in stats.index])
                xs = range(len(stats))
                ax.errorbar(list(xs), stats["mean"], yerr=stats["std"], fmt="o", capsize=3)
                ax.set_xticks(list(xs), [str(n) for n in stats.index], rotation=35, ha="right", fontsize=7)
            else:
                for row, part in frame.groupby("row", sort=False):  # one line per named row
                    stats = part.groupby(key)[metric].agg(["mean", "std"])
                    xs = stats.index.astype(float) if _numeric(stats.index) else range(len(stats))
                    ax.errorbar(list(xs), stats["mean"], yerr=stats["std"], fmt="o-", capsize=3, label=row or None)
                if frame["row"].nunique() > 1 and i == j == 0:
                    ax.legend(fontsize=7)
                ax.set_xlabel(key)
            ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _along(sweep: Sweep, results: pd.DataFrame, key: str) -> pd.DataFrame:
    """Results of the cells that change ``key`` and leave every other swept key at the base value."""
    defaults = Settings.from_run_config({**sweep.base, **sweep.shared}).to_run_config()
    names = []
    for cell in sweep.cells:
        others = {k: v for k, v in cell.params.items() if k != key}
        if all(v == defaults.get(k) for k, v in others.items()):
            names.append(cell.name)
    frame = results[results["cell"].isin(names)].copy()
    if key not in frame:
        frame[key] = math.nan
    for cell in sweep.cells:  # a cell that does not sweep ``key`` sits at the base value
        frame.loc[(frame["cell"] == cell.name) & frame[key].isna(), key] = defaults.get(key)
    return frame


def _numeric(index: pd.Index) -> bool:
    try:
        index.astype(float)
    except (TypeError, ValueError):
        return False
    return True
