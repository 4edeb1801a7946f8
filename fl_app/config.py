"""Reading Flower's run_config (and message configs) into the typed, validated ``Settings``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from clients.config import TrainConfig
from evaluation.config import EvalConfig
from strategies.aggregation import AggregationConfig

from .settings import Rule, Settings, privacy_config
from .trackers import check_tracker


def settings_from_run_config(run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Settings:
    """The full check where a run starts (``iet-agc run`` before submitting, and the ServerApp).

    Defaults < run_config (pyproject + --run-config) < overrides; every range, then the checks
    against this machine (paths exist, the data set is large enough, out-dir is writable, the
    tracker is installed and its server answers). Raises ``ValueError('<key>: ...')`` for the first
    setting outside its range.
    """
    settings = Settings.from_run_config({**dict(run_config), **dict(overrides or {})})
    settings.check_environment()
    check_tracker(settings)
    return settings


NODE_KEYS = ("data-root", "captions", "device", "init-from")  # run-config keys a node's --node-config may replace
FLOWER_NODE_KEYS = ("partition-id", "num-partitions")  # what Flower's simulation puts in every node-config
SERVER_ONLY_PATHS = ("holdout-root", "fid-weights", "fid-cache-dir", "sscd-weights", "clip-model", "resume")
NODE_PATH_RULE = Rule(str, path=True)


@dataclass(frozen=True)
class NodeConfig:
    """A SuperNode's ``--node-config``, checked key by key like the run-config (errors start with the key).

    ``state_dir`` (``state-dir``): where shard states live (``clients.state``; "" = its default);
    ``data_cache`` (``data-cache``): the decoded data sets ("" = the default, "off" = none);
    ``overrides``: the ``NODE_KEYS`` it sets, checked by their run-config rules in ``settings_from_message``.
    """

    state_dir: str = ""
    data_cache: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    ALLOWED: ClassVar[dict[str, str]] = {
        "state-dir": "an absolute path (or ~/...), or empty (~/.cache/iet-agc/state)",
        "data-cache": '"off", an absolute path (or ~/...), or empty (~/.cache/iet-agc/decoded)',
    }


def read_node_config(node_config: Mapping[str, Any] | None) -> NodeConfig:
    """The node's own keys, each checked (``ValueError('<key>: ...')``); an unknown key is refused
    rather than ignored, so a typo never sends shard states or decoded images somewhere else."""
    raw = dict(node_config or {})
    known = (*NodeConfig.ALLOWED, *NODE_KEYS, *FLOWER_NODE_KEYS)
    for key in raw:
        if key not in known:
            raise ValueError(f"{key}: not a node-config key of this app (known: {', '.join(known)})")
    paths = {}
    for key, allowed in NodeConfig.ALLOWED.items():
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise ValueError(f"{key}: must be {allowed}, got {value!r}")
        NODE_PATH_RULE.check(key, value)
        where = Path(os.path.expanduser(value))  # an unknown ~user stays relative: refused below
        if value and not (key == "data-cache" and value == "off") and not where.is_absolute():
            raise ValueError(
                f"{key}: must be {allowed}, got {value!r} (a relative path would land in the working folder "
                "Flower picks for each message)"
            )
        paths[key] = value
    return NodeConfig(paths["state-dir"], paths["data-cache"], {k: v for k, v in raw.items() if k in NODE_KEYS})


def settings_from_message(config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> Settings:
    """The settings the server sent with a shard; a node's own ``--node-config`` may set
    where its copy of the data (images, captions JSON) and of the ``init-from`` base live and which
    device it trains on
    (``NODE_KEYS``; the fingerprints sent by the server prove the copies equal).

    Only the pure checks run here (types, ranges, rules between settings): a node may not have
    the server's folders (out-dir, hold-out images, FID weights), so nothing checks them here.
    """
    keys = set(Settings.keys())
    values = {k: v for k, v in config.items() if k in keys}
    values.update({k: "" for k in SERVER_ONLY_PATHS})  # a node never evaluates: it needs none of them
    values.update(read_node_config(node_config).overrides)
    return Settings.from_run_config(values)


def toml_value(value: Any) -> str:
    """A setting's value as TOML (settings.toml, and flwr's key=value parser reads it back)."""
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _narrow(config: type, settings: Settings, **given: Any) -> Any:
    """A leaf's config (a dataclass whose fields are settings of the same names, beside those
    ``given``) from the settings."""
    return config(**{f.name: getattr(settings, f.name) for f in fields(config) if f.name not in given}, **given)


def train_config(settings: Settings) -> TrainConfig:
    """The few settings a shard's local training reads, as ``clients``' own config."""
    return _narrow(TrainConfig, settings, privacy=privacy_config(settings))


def aggregation_config(settings: Settings) -> AggregationConfig:
    """The aggregation settings, as the strategies' own config."""
    return _narrow(AggregationConfig, settings)


def eval_config(settings: Settings) -> EvalConfig:
    """The few settings an evaluation reads, as ``evaluation``'s own config."""
    return _narrow(EvalConfig, settings)
