"""Experiment tracking: the ServerApp's run logged to TensorBoard, MLflow or Weights & Biases.

A tracked run holds the settings as hyperparameters (``tracker-tags`` as tags), every rounds.csv
column per round at step = server round, the evaluator's sample and pairs grids and ``curves.png``
at each evaluation, the final metrics (``final/...``) and the run folder's path (MLflow: its
pipeline, report and tables as artifacts). Offline unless ``tracker-uri`` names a server. The
library is imported only when a run uses it.

``check_tracker`` runs with the settings checks, before anything trains: a tracker that is not
installed, or a server that does not answer, is refused naming the key. Once the run trains, a
tracker that raises is warned about and left alone (the run goes on; rounds.csv holds every
round). ``tracker.json`` in the run folder names the tracked run and the last round handed to it,
so a resume continues the same tracked run from the next round and no step is logged twice.
"""

from __future__ import annotations

import importlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from ddpm.files import atomic_write, error_text

from .settings import TRACKER_NAME, Settings

STATE = "tracker.json"  # in the run folder: {tracker: {"run_id", "round", "where"}}
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TRACKER_KEYS = tuple(k for k in Settings.keys() if k.startswith("tracker"))
NOT_HYPERPARAMETERS = (*TRACKER_KEYS, "out-dir", "resume")  # where it writes, not what it trains
IMAGES = ("samples", "pairs")  # the evaluator's <name>_round<NNN>.png, logged under <name>
ARTIFACTS = ("report.md", "rounds.csv", "settings.toml")  # MLflow, at the end, beside pipeline/
PROBE_SECONDS = 5.0


def check_tracker(settings: Settings) -> None:
    """Refuse, before anything trains, a tracker whose library is missing or whose server does not
    answer: ``ValueError('tracker: ...')`` or ``ValueError('tracker-uri: ...')``."""
    if settings.tracker == "none":
        return
    try:
        importlib.import_module(MODULES[settings.tracker])
    except ImportError as err:
        raise ValueError(
            f"tracker: {settings.tracker} is not installed ({error_text(err)}); "
            f'pip install -e ".[{settings.tracker}]" (".[tracking]" installs all three), or set tracker = "none"'
        ) from None
    if settings.tracker_uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(settings.tracker_uri, timeout=PROBE_SECONDS).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable (the tracker's own client checks what it says)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"tracker-uri: the {settings.tracker} server {settings.tracker_uri} cannot be reached "
                f"({error_text(err)}); start it, or leave tracker-uri empty to log offline to tracker-dir"
            ) from None


def tracker_dir(settings: Settings, run_dir: Path) -> Path:
    """``tracker-dir``, or ``default_tracker_dir`` beside the run folder."""
    if settings.tracker_dir:
        return Path(settings.tracker_dir).expanduser()
    return default_tracker_dir(settings.tracker, Path(run_dir).parent)


def default_tracker_dir(tracker: str, parent: Path) -> Path:
    """``parent/tensorboard``, ``parent/mlflow``, or for W&B ``parent`` itself (W&B makes its own
    ``wandb/`` folder in the one it is given)."""
    return Path(parent) if tracker == "wandb" else Path(parent) / tracker


def tracker_name(text: str) -> str:
    """``text`` as a valid tracker name (``tracker-run-name``, ``tracker-group``): other characters -> ``_``."""
    name = re.sub(r"[^A-Za-z0-9_.+=,@ -]", "_", text)[:128]
    return name if re.fullmatch(TRACKER_NAME, name) else f"run{name}"[:128]


def run_name(settings: Settings, run_dir: Path) -> str:
    """``tracker-run-name``, or the run folder's name."""
    return settings.tracker_run_name or tracker_name(Path(run_dir).name)


def hyperparameters(settings: Settings) -> dict[str, Any]:
    """What the run trains with: every setting but where it writes and how it is tracked."""
    return {k: v for k, v in settings.to_run_config().items() if k not in NOT_HYPERPARAMETERS}


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among ``values`` (a rounds.csv row: n/a columns are left out), as floats."""
    found = {}
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if number == number and abs(number) != float("inf") and not isinstance(value, str):
            found[key] = number
    return found


# ---- the three trackers: one small class each, over the library's own API ---------------------
class TensorBoard:
    """Event files in ``<tracker-dir>/[<tracker-group>/]<run name>`` (torch's ``SummaryWriter``); a
    resume writes to the same folder and purges any step after the last one handed over."""

    def __init__(self, settings: Settings, where: Path, run_id: str | None, logged: int, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(run_id) if run_id else where / settings.tracker_group / name
        self.run_id, self.resumed = str(log_dir), run_id is not None
        self.writer = SummaryWriter(str(log_dir), purge_step=logged + 1 if self.resumed else None)

    def start(self, hparams: dict[str, Any], tags: dict[str, str], run_dir: Path) -> None:
        """The hyperparameters (the HParams dashboard: one row per run) and the run folder."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        if not self.resumed:
            _, session_start, _ = hparams_summary({**hparams, **tags}, {})
            self.writer.file_writer.add_summary(session_start)
            self.writer.add_text("run_folder", str(run_dir), 0)
        self.writer.flush()

    def log(self, step: int, metrics: dict[str, float], images: dict[str, Path]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        for key, path in images.items():
            self.writer.add_image(key, _pixels(path), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, final: dict[str, float], run_dir: Path, step: int) -> None:
        for key, value in final.items():
            self.writer.add_scalar(f"final/{key}", value, step)
        self.writer.add_text("run_folder", str(run_dir), step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


class MLflow:
    """A run of the experiment ``tracker-group`` (or ``tracker-project``): offline in the SQLite store
    ``<tracker-dir>/mlflow.db`` with artifacts in ``<tracker-dir>/artifacts`` (MLflow 3 refuses its
    old file store), or on the tracking server ``tracker-uri``. A resume reopens the same run."""

    def __init__(self, settings: Settings, where: Path, run_id: str | None, logged: int, name: str) -> None:
        from mlflow import MlflowClient

        uri, artifacts = settings.tracker_uri, None
        if not uri:
            where.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{where.resolve() / 'mlflow.db'}", (where.resolve() / "artifacts").as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        self.existing: dict[str, str] = {}
        if run_id and _mlflow_run(client, run_id) is not None:
            self.run_id, self.resumed = run_id, True
            self.existing = dict(client.get_run(run_id).data.params)
            client.update_run(run_id, status="RUNNING")
            return
        experiment_name = settings.tracker_group or settings.tracker_project
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name, artifacts)
        self.run_id, self.resumed = client.create_run(experiment_id, run_name=name).info.run_id, False

    def start(self, hparams: dict[str, Any], tags: dict[str, str], run_dir: Path) -> None:
        """Parameters (a resume adds the new ones; a changed one becomes the tag ``resumed.<key>``)."""
        from mlflow.entities import Param, RunTag

        new = [Param(k, str(v)) for k, v in hparams.items() if k not in self.existing]
        changed = [RunTag(f"resumed.{k}", str(v)) for k, v in hparams.items() if self.existing.get(k, str(v)) != str(v)]
        tags = [RunTag(k, v) for k, v in {**tags, "run_folder": str(run_dir)}.items()] + changed
        for i in range(0, max(len(new), 1), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100], tags=tags if i == 0 else [])

    def log(self, step: int, metrics: dict[str, float], images: dict[str, Path]) -> None:
        from mlflow.entities import Metric
        from PIL import Image

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])
        for key, path in images.items():
            with Image.open(path) as picture:
                self.client.log_image(self.run_id, picture.convert("RGB"), key=key, step=step)

    def finish(self, final: dict[str, float], run_dir: Path, step: int) -> None:
        """The final metrics, and the pipeline, report and tables as artifacts."""
        self.log(step, {f"final/{k}": v for k, v in final.items()}, {})
        if (run_dir / "pipeline").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "pipeline"), "pipeline")
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandB:
    """A W&B run of ``tracker-project`` in the group ``tracker-group``, offline in
    ``<tracker-dir>/wandb/offline-run-*`` (``wandb sync`` uploads them) or online on ``tracker-uri``;
    a resume starts the same run id again (``resume="allow"``) from the next step."""

    def __init__(self, settings: Settings, where: Path, run_id: str | None, logged: int, name: str) -> None:
        import wandb

        self.wandb, self.settings, self.name = wandb, settings, name
        self.run_id, self.resumed = run_id, run_id is not None  # a new run's id: wandb.init's
        self.where = where
        self.run: Any = None

    def start(self, hparams: dict[str, Any], tags: dict[str, str], run_dir: Path) -> None:
        """``wandb.init``: hyperparameters and tags as the config, ``key=value`` tags, the run folder."""
        s, wandb = self.settings, self.wandb
        self.where.mkdir(parents=True, exist_ok=True)
        options = {"console": "off", **({"base_url": s.tracker_uri} if s.tracker_uri else {})}
        self.run = wandb.init(
            mode="online" if s.tracker_uri else "offline",
            dir=str(self.where),
            project=s.tracker_project,
            group=s.tracker_group or None,
            name=self.name,
            id=self.run_id,
            resume="allow",
            tags=[f"{k}={v}"[:64] for k, v in tags.items()],
            settings=wandb.Settings(**options),
        )
        self.run_id = self.run.id
        self.run.config.update({**hparams, **tags}, allow_val_change=True)
        self.run.summary["run_folder"] = str(run_dir)

    def log(self, step: int, metrics: dict[str, float], images: dict[str, Path]) -> None:
        pictures = {key: self.wandb.Image(str(path)) for key, path in images.items()}
        self.run.log({**metrics, **pictures}, step=step)

    def finish(self, final: dict[str, float], run_dir: Path, step: int) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def close(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)


BACKENDS: dict[str, Callable[..., Any]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def _mlflow_run(client: Any, run_id: str) -> Any:
    """The MLflow run ``run_id`` in this store, or None (a resume moved to another store)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _pixels(path: Path) -> Any:
    """A PNG as an (H, W, 3) uint8 array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


# ---- one run's tracked run ---------------------------------------------------------------------
class RunTracker:
    """Hands each finished round to the tracker after its checkpoint, once; a tracker that raises
    is warned about and not called again in this process (a resume sends what it missed).

    Parameters
    ----------
    backend : TensorBoard | MLflow | WandB
        The started tracker (``open_tracker`` makes it).
    name : str
        The tracker's name (``tracker``), for the warnings and ``tracker.json``.
    run_dir : Path
        The run folder: the evaluator's images are read from it, ``tracker.json`` written to it.
    where : str
        Where the tracked run lives (folder and URI): a resume elsewhere starts a new tracked run.
    logged : int (default: 0)
        The last round already handed to this tracked run (0: none).
    """

    def __init__(self, backend: Any, name: str, run_dir: Path, where: str, logged: int = 0) -> None:
        self.backend, self.name, self.run_dir, self.where = backend, name, Path(run_dir), where
        self.logged = logged
        self.failed = False

    def round_done(self, row: Mapping[str, Any], curves: bool = True) -> None:
        """Round ``row['round']``'s columns, and its pictures when it was evaluated; skipped when it
        was handed over before. ``curves``: ``curves.png`` is this round's (not a later one's)."""
        step = int(row["round"])
        if step <= self.logged or self.failed:
            return
        images = {k: p for k in IMAGES if (p := self.run_dir / f"{k}_round{step:03d}.png").is_file()}
        if images and curves and (self.run_dir / "curves.png").is_file():
            images["curves"] = self.run_dir / "curves.png"
        metrics = numbers({k: v for k, v in row.items() if k != "round"})
        if self._safely(f"round {step}", lambda: self.backend.log(step, metrics, images)):
            self.logged = step
            self.save_state()

    def finish(self, final: Mapping[str, Any]) -> None:
        """The run's final metrics (``final/<column>``) and, with MLflow, its folder's artifacts."""
        if not self.failed:
            self._safely("the end", lambda: self.backend.finish(numbers(final), self.run_dir, self.logged))

    def close(self, ok: bool) -> None:
        """End the tracked run: finished, or failed (a resume reopens it)."""
        self._safely("closing", lambda: self.backend.close(ok))

    def save_state(self) -> None:
        state = read_state(self.run_dir)
        state[self.name] = {"run_id": self.backend.run_id, "round": self.logged, "where": self.where}
        atomic_write(self.run_dir / STATE, lambda tmp: tmp.write_text(json.dumps(state, indent=1) + "\n"))

    def _safely(self, what: str, call: Callable[[], None]) -> bool:
        try:
            call()
            return True
        except Exception as err:  # a tracker never ends the run
            self.failed = True
            log(
                WARNING,
                "tracker %s failed at %s (%s: %s); the run goes on without it (rounds.csv holds every round; "
                "a resume sends the rounds it missed)",
                self.name,
                what,
                type(err).__name__,
                error_text(err),
            )
            return False


def read_state(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``tracker.json`` of a run folder (empty when missing)."""
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def open_tracker(settings: Settings, run_dir: Path, rows: Sequence[Mapping[str, Any]] = ()) -> RunTracker | None:
    """Start (or, after a resume, reopen) the run's tracked run and hand it the ``rows`` it lacks;
    None with ``tracker = "none"``. Raises ``ValueError('tracker: ...')`` when it cannot start."""
    if settings.tracker == "none":
        return None
    name, folder = settings.tracker, tracker_dir(settings, run_dir)
    where = f"{folder.resolve()} {settings.tracker_uri}".strip()
    saved = read_state(run_dir).get(name, {})
    run_id, logged = (saved["run_id"], int(saved["round"])) if saved.get("where") == where else (None, 0)
    try:
        backend = BACKENDS[name](settings, folder, run_id, logged, run_name(settings, run_dir))
        logged = logged if backend.resumed else 0
        backend.start(hyperparameters(settings), settings.tracker_tag_pairs, Path(run_dir).resolve())
    except Exception as err:
        raise ValueError(f"tracker: {name} could not start a run in {where} ({error_text(err)})") from err
    tracker = RunTracker(backend, name, run_dir, where, logged)
    tracker.save_state()
    for row in rows:  # a resume: the rounds the tracked run lacks (curves.png is a later round's)
        tracker.round_done(row, curves=False)
    return tracker


@contextmanager
def tracking(settings: Settings, run_dir: Path, rows: Sequence[Mapping[str, Any]] = ()) -> Iterator[RunTracker | None]:
    """``open_tracker`` for the length of a run: closed as finished, or as failed on an exception."""
    tracker = open_tracker(settings, run_dir, rows)
    try:
        yield tracker
    except BaseException:
        if tracker is not None:
            tracker.close(ok=False)
        raise
    if tracker is not None:
        tracker.close(ok=True)
