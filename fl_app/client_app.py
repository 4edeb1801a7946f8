"""ClientApp: trains the shards named in each message and replies with weights, metrics, skip counts.

A message names one shard or, packed (``shards-per-message``), several shards of this node: they
train one after another in this process on the data set decoded once, each exactly as if it had
come alone (its own state file, seed stream and model), and one reply carries every shard's
result; a shard that fails is answered with its reason, the others still train.
"""

from __future__ import annotations

import functools
import time
import traceback
from logging import INFO, WARNING

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from clients.input_noise import fixed_input_noise
from clients.state import ShardStateStore
from clients.trainer import ShardState, shard_seed, train_shard
from ddpm.adapters import load_trainable, trainable_state
from ddpm.ambient import ambient_masks
from ddpm.captions import captions_for
from ddpm.data import ImageSet, load_dataset
from ddpm.device import usable_device
from ddpm.family import DiffusionFamily
from strategies.protocol import (
    NUM_EXAMPLES,
    TRAIN_SECONDS,
    Instruction,
    is_packed,
    pack_replies,
    read_instruction,
    reply_content,
    reply_metrics,
    split_instruction,
)

from .config import NodeConfig, read_node_config, settings_from_message, train_config
from .model import base_fingerprint, initial_model, model_family
from .settings import Settings


def train(msg: Message, context: Context, **train_kwargs) -> Message:
    """Train the shards that ``msg`` names on this node's copy of the data set; the reply
    (``strategies.protocol.pack_reply``, or ``pack_replies`` for a packed message) carries the
    trained weights, metrics and skip counts. ``train_kwargs`` (``skip_rule=``, ``augment=``) go
    to ``train_shard``. What concerns the whole node (its settings, device, data set) fails the
    whole message; in a packed message, a shard's own failure is answered for that shard only."""
    parts = split_instruction(msg.content)
    first = read_instruction(parts[0])
    node = read_node_config(context.node_config)
    settings = settings_from_message(first.config, context.node_config)
    device = usable_device(settings.device)  # before any work: a device this node lacks names the key
    data = load_dataset(**settings.dataset_kwargs(), cache_dir=node.data_cache)
    if data.fingerprint != first.fingerprint:
        raise ValueError(
            f"data set mismatch on node {context.node_id}: the server's {settings.dataset} copy has "
            f"fingerprint {first.fingerprint}, this node's has {data.fingerprint} "
            f"(data-root {settings.data_root or '(default)'}); refusing to train on other images"
        )
    family = model_family(settings, data)  # once per message (Stable Diffusion: the checkpoint's frozen parts)
    if not is_packed(msg.content):
        content = _train_one(first, settings, node, device, data, family, context.node_id, **train_kwargs)
        return Message(content=content, reply_to=msg)
    results: list[tuple[int, RecordDict | str]] = []
    for part in parts:
        ins = read_instruction(part)
        try:  # the same settings for every shard: only the shard's own fields differ
            one = _train_one(ins, settings, node, device, data, family, context.node_id, **train_kwargs)
            results.append((ins.shard, one))
        except Exception as err:  # noqa: BLE001 - this shard fails alone, with its reason; the others train
            log(WARNING, "shard %d, round %d failed:\n%s", ins.shard, ins.server_round, traceback.format_exc())
            results.append((ins.shard, f"{type(err).__name__}: {' '.join(str(err).split())}"))
    log(INFO, "round %d: trained shards %s in one message", first.server_round, [s for s, _ in results])
    return pack_replies(msg, results)


def _train_one(
    ins: Instruction,
    settings: Settings,
    node: NodeConfig,
    device: torch.device,
    data: ImageSet,
    family: DiffusionFamily,
    node_id: int,
    **train_kwargs,
) -> RecordDict:
    """Train one shard (its own model from the message's weights, its own state file and seed) and
    return its reply records (``strategies.protocol.reply_content``)."""
    if ins.ids.size == 0 or ins.ids.min() < 0 or ins.ids.max() >= len(data):
        raise ValueError(f"shard {ins.shard}: ids outside 0..{len(data) - 1}")
    model = _shard_model(ins, settings, data, node_id)
    store, state = _shard_state(ins, settings, node, model)
    started = time.perf_counter()
    rows = torch.from_numpy(ins.ids)
    result = train_shard(
        model,
        data.images[rows],
        train_config(settings),
        state,
        device=device,
        seed=shard_seed(settings.seed, ins.server_round, ins.shard),
        labels=_shard_condition(ins, data, rows, settings, family),
        desc=f"shard {ins.shard}, round {ins.server_round}: local training",
        proximal_mu=ins.proximal_mu,
        family=family,
        input_noise=_input_noise(ins, data, settings),
        **train_kwargs,
    )
    store.save(ins.run_key, ins.shard, ins.server_round, state)
    metrics = {m.key: getattr(result, m.source) for m in reply_metrics(ins.config) if m.source}
    metrics |= {NUM_EXAMPLES: int(ins.ids.size), TRAIN_SECONDS: time.perf_counter() - started}
    arrays = trainable_state(model)  # only what trains travels back
    return reply_content(
        ins.config, arrays, metrics, result.skip_counts, local_step=state.step, fingerprint=data.fingerprint
    )


def _shard_state(
    ins: Instruction, settings: Settings, node: NodeConfig, model: torch.nn.Module
) -> tuple[ShardStateStore, ShardState]:
    """The shard's saved state on this node (optimizer, warm-up, memory bank), checked against the
    model; a file that cannot train it is set aside (logged) and the shard restarts its state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    store = ShardStateStore(node.state_dir or None)
    store.check_writable()
    state, loaded = store.load(ins.run_key, ins.shard, ins.server_round, trainable)
    for path, why in store.set_aside:
        log(WARNING, "shard %d, round %d: set aside %s: %s", ins.shard, ins.server_round, path, why)
    if loaded is None and ins.server_round > 1 and settings.dp_sgd:
        raise ValueError(
            f"dp-sgd: shard {ins.shard}, round {ins.server_round}: no saved state of run {ins.run_key} under "
            f"{store.root} on this node, so the privacy accountant would restart and under-count epsilon; "
            "refusing to train (DP shards keep their node and state-dir)"
        )
    if loaded is None and ins.server_round > 1:
        log(
            WARNING,
            "shard %d, round %d: no saved state of run %s under %s on this node: its optimizer, warm-up "
            "and memory bank restart",
            ins.shard,
            ins.server_round,
            ins.run_key,
            store.root,
        )
    return store, state


def _shard_model(ins: Instruction, settings: Settings, data: ImageSet, node_id: int) -> torch.nn.Module:
    """The model to train: the server's weights, or (fine-tuning) this node's copy of the base,
    proven to be the server's, with the server's adapter weights."""
    weights = ins.arrays.to_torch_state_dict()
    model = initial_model(settings, data.channels, None if settings.init_from else weights)
    if settings.init_from:  # the frozen base (and LoRA A draw; SD: VAE, text encoder) must be the server's
        mine = base_fingerprint(settings, model)
        if mine != ins.base_fingerprint:
            raise ValueError(
                f"base model mismatch on node {node_id}: the server's initial model "
                f"(init-from {settings.init_from!r}, adapter {settings.adapter}) has fingerprint "
                f"{ins.base_fingerprint}, this node's has {mine}; refusing to train on another base"
            )
        load_trainable(model, weights)
    return model


def make_client_app(**train_kwargs) -> ClientApp:
    """A ClientApp whose ``train`` passes ``train_kwargs`` (``skip_rule=``, ``augment=``) on,
    to swap the shard-side rules."""
    app = ClientApp()
    app.train()(functools.partial(train, **train_kwargs) if train_kwargs else train)
    return app


def _input_noise(ins: Instruction, data: ImageSet, settings: Settings) -> torch.Tensor | None:
    """The adding-noise baseline's fixed noise of the shard's images (from the run's seed and
    each image's id), when ``input-noise-fixed``; None otherwise."""
    if not (settings.input_noise_fixed and settings.input_noise_variance > 0):
        return None
    return fixed_input_noise(ins.ids, data.images.shape[1:], settings.seed)


def _shard_condition(
    ins: Instruction, data: ImageSet, rows: torch.Tensor, settings: Settings, family: DiffusionFamily
) -> torch.Tensor | None:
    """What conditions the shard's images: the token ids of their first captions (the
    text-conditional family; tokenized once per shard, not per step), Ambient's masks of their ids
    (from the run's seed, the same in every round and shard), or their class labels; None when
    unconditional."""
    if settings.text_conditional:
        if data.captions is None:
            raise ValueError(
                f"captions: this node's copy of data-root {settings.data_root!r} has no captions "
                "(no metadata.jsonl, and captions is empty), which the text-conditional family trains on"
            )
        return family.tokenize(captions_for(data, ins.ids))
    if settings.ambient:
        size = tuple(data.images.shape[2:])
        return ambient_masks(ins.ids, size, settings.ambient_p, settings.ambient_delta, settings.seed)
    return _shard_labels(data, rows, settings)


def _shard_labels(data: ImageSet, rows: torch.Tensor, settings: Settings) -> torch.Tensor | None:
    """The shard's labels from this node's own copy of the data set (only ids travel), when conditional."""
    if not settings.class_conditional:
        return None
    if data.labels is None:
        raise ValueError(f"class-conditional: this node's copy of {settings.dataset} has no labels")
    return data.labels[rows]


app = make_client_app()
