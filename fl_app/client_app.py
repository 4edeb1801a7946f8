"""ClientApp: trains the shard named in each message and replies with weights, metrics, skip counts."""

from __future__ import annotations

import time
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from clients.state import ShardStateStore
from clients.trainer import shard_seed, train_shard
from ddpm.adapters import load_trainable, trainable_state
from ddpm.base import model_fingerprint
from ddpm.data import ImageSet, load_dataset
from ddpm.device import resolve_device
from ddpm.model import initial_model
from ddpm.settings import Settings

from .config import settings_from_message


def make_client_app(**train_kwargs) -> ClientApp:
    """A ClientApp; ``train_kwargs`` (``skip_rule=``, ``augment=``) swap the shard-side rules."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        settings = settings_from_message(cfg, context.node_config)
        shard, server_round = int(cfg["shard"]), int(cfg["server-round"])
        data = load_dataset(**settings.dataset_kwargs(), cache_dir=str(context.node_config.get("data-cache", "")))
        if data.fingerprint != cfg["fingerprint"]:
            raise ValueError(
                f"data set mismatch on node {context.node_id}: the server's {settings.dataset} copy has "
                f"fingerprint {cfg['fingerprint']}, this node's has {data.fingerprint} "
                f"(data-root {settings.data_root or '(default)'}); refusing to train on other images"
            )
        ids = np.asarray(cfg["ids"], dtype=np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= len(data):
            raise ValueError(f"shard {shard}: ids outside 0..{len(data) - 1}")
        device = resolve_device(settings.device)
        weights = msg.content["arrays"].to_torch_state_dict()
        model = initial_model(settings, data.channels, None if settings.init_from else weights)
        if settings.init_from:  # the frozen base (and LoRA A draw) must be the server's: prove it
            mine = model_fingerprint(model)
            if mine != cfg["base-fingerprint"]:
                raise ValueError(
                    f"base model mismatch on node {context.node_id}: the server's initial model "
                    f"(init-from {settings.init_from!r}, adapter {settings.adapter}) has fingerprint "
                    f"{cfg['base-fingerprint']}, this node's has {mine}; refusing to train on another base"
                )
            load_trainable(model, weights)
        store = ShardStateStore(context.node_config.get("state-dir") or None)
        run_key = str(cfg["run-key"])
        state, loaded = store.load(run_key, shard, server_round)
        if loaded is None and server_round > 1:
            log(
                WARNING,
                "shard %d, round %d: no saved state of run %s under %s on this node: its optimizer, warm-up "
                "and memory bank restart",
                shard,
                server_round,
                run_key,
                store.root,
            )
        started = time.perf_counter()
        rows = torch.from_numpy(ids)
        result = train_shard(
            model,
            data.images[rows],
            settings,
            state,
            device=device,
            seed=shard_seed(settings.seed, server_round, shard),
            labels=_shard_labels(data, rows, settings),
            desc=f"shard {shard}, round {server_round}: local training",
            proximal_mu=float(cfg.get("proximal-mu", 0.0)),  # FedProx's key in the train config
            **train_kwargs,
        )
        store.save(run_key, shard, server_round, state)
        content = RecordDict(
            {
                "arrays": ArrayRecord(trainable_state(model)),  # only what trains travels back
                "metrics": MetricRecord(
                    {
                        "num-examples": int(ids.size),
                        "train-loss": result.mean_loss,
                        "skip-rate": result.skip_rate,
                        "aug-rate": result.aug_rate,
                        "steps": result.steps,
                        "train-seconds": time.perf_counter() - started,
                    }
                ),
                "skips": ArrayRecord({"ids": torch.from_numpy(ids), "counts": result.skip_counts}),
                "info": ConfigRecord({"shard": shard, "local-step": state.step, "fingerprint": data.fingerprint}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _shard_labels(data: ImageSet, rows: torch.Tensor, settings: Settings) -> torch.Tensor | None:
    """The shard's labels from this node's own copy of the data set (only ids travel), when conditional."""
    if not settings.class_conditional:
        return None
    if data.labels is None:
        raise ValueError(f"class-conditional: this node's copy of {settings.dataset} has no labels")
    return data.labels[rows]


app = make_client_app()
