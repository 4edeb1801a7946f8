"""``iet-agc``: the project's command. ``run`` (the Flower app in local simulation, ``flwr run``
done right), ``mq`` and ``evaluate`` (memorization and quality of images or a saved model) and
``sweep`` (a grid of runs over seeds). Bad input exits 2 with one line (``inputs.fail``).
"""

from __future__ import annotations

import argparse
import sys

from . import evaluate, run, sweep
from .inputs import InputError, fail


def build_parser() -> argparse.ArgumentParser:
    """The ``iet-agc`` parser with every subcommand; each sets ``func`` (args -> exit code)."""
    parser = argparse.ArgumentParser(prog="iet-agc", description="IET-AGC+ on Flower: run, evaluate and sweep.")
    sub = parser.add_subparsers(dest="command", required=True)
    run.register(sub)
    evaluate.register(sub)
    sweep.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``iet-agc ARGS``: the exit code (0 done, 1 the run failed, 2 bad input)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.flwr_args = unknown  # `iet-agc run` passes options of flwr run's own through, in any position
    try:
        return args.func(args)
    except InputError as err:  # a file read mid-way (a run folder's table, ...): one line, exit 2
        return fail(args.command, err)


if __name__ == "__main__":
    sys.exit(main())
