"""Progress of long work (sampling, feature passes, the kNN pass, local rounds), one way per place.

Inside a run the work logs one line every ``IET_AGC_PROGRESS_SECONDS`` (default 30; 0 turns them
off) through a child of Flower's logger, so it shows in ``flwr run --stream``, ``flwr log`` and
a SuperLink's log; work shorter than that says nothing. The command-line tools switch to tqdm
bars (``bars``), drawn only when stderr is a terminal, so pipes, log files and tests stay quiet.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator

from tqdm import tqdm

LOGGER = logging.getLogger("flwr.iet_agc")  # a child of Flower's logger: its handlers print it; no flwr import
INTERVAL_ENV = "IET_AGC_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"

_bars = False


@contextlib.contextmanager
def bars() -> Iterator[None]:
    """Within: tqdm bars (command-line tools) instead of timed log lines (inside a run)."""
    global _bars
    before, _bars = _bars, True
    try:
        yield
    finally:
        _bars = before


def interval() -> float:
    """Seconds between two progress lines, from ``IET_AGC_PROGRESS_SECONDS`` (0: no lines)."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(text) if text.strip() else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}: must be a number of seconds (0: off), got {text!r}") from None
    if not value >= 0:  # NaN too
        raise ValueError(f"{INTERVAL_ENV}: must be >= 0 seconds (0: off), got {text!r}")
    return value


class _LoggedProgress(tqdm):
    """A tqdm that logs its status line (at most every ``mininterval`` seconds) instead of drawing."""

    monitor_interval = 0  # no monitor thread: it would refresh between our intervals
    _logged_n: float | None = None

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None and self.n != self._logged_n:  # a status line ('' clears a bar), not twice at the end
            self._logged_n = self.n
            LOGGER.info("%s", self.format_meter(**{**self.format_dict, "bar_format": LINE_FORMAT}))
        return True


def progress(total: int, desc: str, unit: str = "it", *, scale: bool = False) -> tqdm:
    """A progress counter for ``total`` units of work: ``with progress(n, "sampling") as bar: bar.update(k)``.

    Updating costs a clock read (no device sync); a line or a redraw happens only when due.
    ``scale`` writes large counts with SI prefixes (1.2G).
    """
    if _bars:
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, disable=None, leave=False, dynamic_ncols=True)
    every = interval()
    return _LoggedProgress(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        disable=every == 0,
        mininterval=every,
        delay=every,  # nothing for work shorter than one interval
        miniters=1,
        file=io.StringIO(),  # tqdm's own writes (a final newline) go nowhere
        leave=True,  # the closing line of long work: done, in how long
    )
