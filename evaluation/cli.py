"""Evaluation subcommands of the ``iet-agc`` tool (``mq``, ``evaluate``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to ``iet-agc``."""
