"""Local training of one shard for E epochs: the model family's loss with AGC, TAA and skip counting.

Per-shard state (Adam moments, LR warm-up position, memory bank) outlives a round; the Flower
glue stores it between messages. Every step is vectorised: the only host synchronisation is
TAA's compaction of the samples to augment (a data-dependent subset).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.optimization import get_constant_schedule_with_warmup

from ddpm.data import to_model_range
from ddpm.family import PIXEL_DDPM, DiffusionFamily
from ddpm.precision import FP32, Precision, choose
from ddpm.progress import progress
from ddpm.schedule import NUM_TRAIN_TIMESTEPS

from .agc import NeverSkip, RatioSkip, SkipRule, kept_mean, loss_ratio, update_memory_bank
from .config import TrainConfig
from .taa import AugmentPolicy, RandAugmentPolicy, in_augment_range, strength


@dataclass
class ShardState:
    """What a shard keeps across rounds (the authors keep optimizer and bank per client)."""

    optimizer: dict[int, dict[str, torch.Tensor]] | None = None  # Adam moments per parameter
    step: int = 0
    bank: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_TRAIN_TIMESTEPS))
    accountant: dict | None = None  # DP-SGD: Opacus' accountant state (history of sigma, rate, steps)


@dataclass
class ShardResult:
    """What one round of local training reports."""

    mean_loss: float
    skip_counts: torch.Tensor  # int64 (n,), aligned with the shard's ids
    skip_rate: float
    aug_rate: float
    steps: int
    samples_seen: int
    epsilon: float | None = None  # DP-SGD: the epsilon this shard has spent over all its rounds


@dataclass
class StepLoss:
    """One batch's eq. 8 loss and what happened to each sample."""

    loss: torch.Tensor  # scalar to back-propagate
    losses: torch.Tensor  # (B,) plain per-sample losses, detached (they update the bank)
    skip: torch.Tensor  # (B,) bool, eq. 4
    aug: torch.Tensor  # (B,) bool, eq. 8 middle case


def plain_loss(
    model: torch.nn.Module,
    scheduler,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    family: DiffusionFamily = PIXEL_DDPM,
) -> torch.Tensor:
    """The family's default objective (the baseline AGC and TAA are measured against)."""
    return family.per_sample_loss(model, scheduler, family.encode(x0), t, noise, class_labels).mean()


def agc_taa_loss(
    model: torch.nn.Module,
    scheduler,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    bank: torch.Tensor,
    skip_rule: SkipRule,
    augment: AugmentPolicy | None,
    config: TrainConfig,
    class_labels: torch.Tensor | None = None,
    family: DiffusionFamily = PIXEL_DDPM,
    input_noise: torch.Tensor | None = None,
) -> StepLoss:
    """Eq. 8 over a batch: skipped samples add 0, samples in TAA's range add the loss of their
    augmented copy (same t and noise), the rest their plain loss; mean over the kept samples.

    Without TAA this is one forward pass with the skipped samples masked out. With TAA the plain
    losses are first computed without gradients (they decide skip and augmentation and feed the
    bank), then one forward/backward runs on the kept samples, augmented ones replaced by their
    copies: a step costs about one no-grad forward more than a plain step, whatever the fraction.
    ``class_labels`` go with their samples into every forward (an augmented copy keeps its label).
    ``x0`` are pixels in [-1, 1] and ``noise`` is in the space ``family`` denoises; TAA augments the
    pixels and the family encodes the copies. ``input_noise`` (the adding-noise baseline, already
    scaled) is added to what trains, the batch and each copy alike, after TAA's augmentation.
    """
    z0 = family.encode(x0 if input_noise is None else x0 + input_noise)
    if augment is None:
        losses = family.per_sample_loss(model, scheduler, z0, t, noise, class_labels)
        skip = skip_rule(loss_ratio(losses.detach(), bank[t]))
        keep = ~skip
        return StepLoss((losses * keep).sum() / keep.sum().clamp_min(1), losses.detach(), skip, torch.zeros_like(keep))
    with torch.no_grad():
        losses = family.per_sample_loss(model, scheduler, z0, t, noise, class_labels)
    ratio = loss_ratio(losses, bank[t])
    skip = skip_rule(ratio)
    keep = ~skip
    threshold = config.skip_threshold
    aug = in_augment_range(ratio, keep, threshold, config.aug_range)
    kept = keep.nonzero().squeeze(1)  # TAA's host sync: the subset to train on
    n_kept = kept.numel()
    if n_kept == 0:  # all skipped: a zero loss, zero gradients
        zero = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        return StepLoss(zero, losses, skip, aug)
    # Pad the subset to a multiple of B/8 (weight 0) so the backends see few distinct shapes:
    # CPU convolution kernels are rebuilt for every new batch size, which would cost more than
    # the samples saved.
    quantum = max(1, x0.shape[0] // 8)
    size = min(x0.shape[0], -(-n_kept // quantum) * quantum)
    rows = torch.cat([kept, kept[:1].expand(size - n_kept)])
    weight = (torch.arange(size, device=x0.device) < n_kept).to(losses.dtype)
    x_train = z0[rows]
    is_aug = aug[rows] & (weight > 0)
    idx = is_aug.nonzero().squeeze(1)
    if idx.numel():
        rho = strength(ratio[rows[idx]], threshold, config.aug_sharpness)
        with torch.autocast(x0.device.type, enabled=False):  # TAA's resampling in fp32 under any precision
            copies = augment((x0[rows[idx]] + 1) / 2, rho) * 2 - 1
        copies = copies if input_noise is None else copies + input_noise[rows[idx]]
        x_train = x_train.index_copy(0, idx, family.encode(copies))
    y_train = None if class_labels is None else class_labels[rows]
    losses_train = family.per_sample_loss(model, scheduler, x_train, t[rows], noise[rows], y_train)
    loss = (losses_train * weight).sum() / n_kept
    return StepLoss(loss, losses, skip, aug)


def default_skip_rule(config: TrainConfig) -> SkipRule:
    return RatioSkip(config.skip_threshold) if config.agc else NeverSkip()


def default_augment(config: TrainConfig) -> AugmentPolicy | None:
    return (
        RandAugmentPolicy(config.randaugment_magnitude, config.randaugment_ops, config.taa_interpolation)
        if config.taa
        else None
    )


def train_shard(
    model: torch.nn.Module,
    images: torch.Tensor,
    config: TrainConfig,
    state: ShardState,
    *,
    device: torch.device,
    seed: int,
    skip_rule: SkipRule | None = None,
    augment: AugmentPolicy | None | bool = True,
    labels: torch.Tensor | None = None,
    desc: str = "local training",
    proximal_mu: float = 0.0,
    family: DiffusionFamily = PIXEL_DDPM,
    input_noise: torch.Tensor | None = None,
) -> ShardResult:
    """Train ``model`` in place on one shard's images for ``config.local_epochs`` epochs (or
    ``local_steps`` steps) with AGC and TAA (eq. 8); returns the round's loss, skip counts (for MSR) and rates.

    Parameters
    ----------
    model : torch.nn.Module
        The shard's copy of the global model (only tensors with ``requires_grad`` train).
    images : torch.Tensor
        The shard's images, uint8 (N, C, H, W).
    config : TrainConfig
        The local training's settings (``fl_app.config.train_config(settings)`` in the app).
    state : ShardState
        What the shard keeps across rounds (Adam moments, warm-up position, memory bank); updated
        in place.
    device : torch.device
        Where to train.
    seed : int
        Seeds the batch order, timesteps, noise, flips and augmentations (``shard_seed``).
    skip_rule : SkipRule | None (default: None)
        AGC's rule; None: the config's (eq. 4 with ``skip_threshold``, or never with AGC off).
    augment : AugmentPolicy | None | bool (default: True)
        TAA's augmentation; True: the config's (RandAugment, None with TAA off); None: no TAA.
    labels : torch.Tensor | None (default: None)
        The images' conditions, aligned with ``images``, exactly when the model is conditional
        (``family.check_condition``): int64 class labels, or Ambient's masks (``ddpm.ambient.ambient_masks``).
    desc : str (default: "local training")
        Names the work in its progress line (long rounds only).
    proximal_mu : float (default: 0.0)
        > 0 adds FedProx's proximal term to every step's loss (FedProx sends it as ``proximal-mu``).
    family : DiffusionFamily (default: PIXEL_DDPM)
        The model family: its encoding, conditioning and per-sample loss.
    input_noise : torch.Tensor | None (default: None)
        Each image's fixed standard normal noise (aligned with ``images``; ``fixed_input_noise``),
        exactly when ``config.input_noise_fixed``: scaled to ``input_noise_variance`` and added at
        every step. Without it the noise is drawn afresh at every step.
    """
    privacy = getattr(config, "privacy", None)  # a Settings object (tests, notebooks) has none
    if privacy is not None:
        _check_private(config, skip_rule, augment, proximal_mu)
    skip_rule = skip_rule or default_skip_rule(config)
    if augment is True:
        augment = default_augment(config)
    torch.manual_seed(seed)  # timesteps, noise, dropout, flips and RandAugment draws
    gen = torch.Generator().manual_seed(seed)  # batch order
    precision = _ready(model, config, device, privacy is not None)
    params = [p for p in model.parameters() if p.requires_grad]  # an adapter's tensors only, when frozen
    data = to_model_range(images).to(device)
    targets = family.check_condition(model, labels, images.shape[0])
    n = data.shape[0]
    batch = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch)  # drop_last, but never zero steps
    targets = None if targets is None else targets.to(device)
    fixed = _fixed_noise(config, input_noise, data.shape)
    rules = skip_rule, augment, family
    loop = _Loop(model, params, config, state, rules, data, targets, steps_per_epoch, proximal_mu, fixed, precision)
    private = _private(loop, config, state, n, batch) if privacy is not None else None
    steps = round_steps(config, steps_per_epoch)
    with progress(steps, desc, "step") as bar:  # a line every so often
        if private is not None:
            for _ in range(config.local_epochs):
                for pos in private.batches():
                    bar.update(int(loop.step(pos.to(device))))  # a physical part of a Poisson batch counts 0
        else:
            for pos in _batches(n, batch, steps_per_epoch, steps, gen):
                bar.update(int(loop.step(pos.to(device))))
    seen = int(loop.seen) if private is not None else steps * batch
    state.bank = loop.bank.cpu()
    state.optimizer = loop.optimizer.state_dict()["state"]
    epsilon = _close_private(private, state) if private is not None else None
    precision.release(model)  # contiguous weights and the eager forward: what is saved and sent
    return ShardResult(
        mean_loss=float(loop.loss_sum / max(1, int(loop.loss_count))),
        skip_counts=loop.counts.cpu(),
        skip_rate=float(loop.counts.sum()) / max(1, seen),
        aug_rate=float(loop.n_aug) / max(1, seen),
        steps=steps,
        samples_seen=seen,
        epsilon=epsilon,
    )


def _close_private(private, state: ShardState) -> float:
    """Keep the accountant's state for the next round, take the round's epsilon and take Opacus'
    hooks off the shard's model; returns the epsilon spent so far."""
    state.accountant = private.accountant_state()
    epsilon = private.epsilon()
    private.model._close()  # noqa: SLF001 - Opacus' cleanup: its hooks off the shard's model
    return epsilon


def _ready(model: torch.nn.Module, config: TrainConfig, device: torch.device, private: bool) -> Precision:
    """The model on ``device`` in training mode, made ready (layout, compiled forward) for the
    precision that the config's ``precision``, ``channels_last`` and ``compile`` give it there."""
    model.to(device).train()
    args = config.precision, config.channels_last, config.compile
    precision = choose(*args, device, model, private=private)
    precision.prepare(model)
    return precision


def round_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """A round's optimizer steps: ``local_steps``, or ``local_epochs`` epochs of ``steps_per_epoch``."""
    return config.local_steps or config.local_epochs * steps_per_epoch


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The linear warm-up's length in steps: ``warmup_steps``, or ``warmup_epochs`` epochs."""
    return config.warmup_steps if config.warmup_steps >= 0 else config.warmup_epochs * steps_per_epoch


def _epoch(n: int, batch: int, steps: int, gen: torch.Generator):
    """One epoch's batches of positions: a seeded permutation cut into ``steps`` batches (drop_last)."""
    perm = torch.randperm(n, generator=gen)
    return (perm[b * batch : (b + 1) * batch] for b in range(steps))


def _batches(n: int, batch: int, steps_per_epoch: int, total: int, gen: torch.Generator):
    """``total`` batches of positions: whole epochs (a fresh permutation each), the last one cut short."""
    done = 0
    while done < total:
        part = min(steps_per_epoch, total - done)
        yield from _epoch(n, batch, part, gen)
        done += part


def make_optimizer(params: list[torch.Tensor], config: TrainConfig, **options) -> torch.optim.Optimizer:
    """The config's optimizer (Adam or AdamW) over ``params`` at ``lr`` with ``weight_decay``;
    ``options`` are the kernel's (``fused``)."""
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.lr, weight_decay=config.weight_decay, **options)


def _private(loop: _Loop, config: TrainConfig, state: ShardState, n: int, batch: int):
    """Makes the loop's model, optimizer and batches private (Opacus), with the shard's accountant
    (a ``dp_sgd.PrivateTraining``; Opacus is imported only by runs that use it)."""
    from .dp_sgd import PrivateTraining, noise_multiplier_for, poisson_plan

    privacy = config.privacy
    rate, per_round = poisson_plan(n, batch, config.local_epochs)
    sigma = noise_multiplier_for(privacy, rate, per_round * privacy.rounds)
    private = PrivateTraining(loop.model, loop.optimizer, n, batch, privacy, sigma, state.accountant)
    loop.model, loop.optimizer, loop.private = private.model, private.optimizer, private
    return private


class _Loop:
    """One shard's round in progress: what every step reads (model, optimizer, rules, data) and the
    books it keeps on the device (memory bank, skip counts, sums: no host sync per step)."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.Tensor],
        config: TrainConfig,
        state: ShardState,
        rules: tuple[SkipRule, AugmentPolicy | None, DiffusionFamily],
        data: torch.Tensor,
        targets: torch.Tensor | None,
        steps_per_epoch: int,
        proximal_mu: float,
        fixed_noise: torch.Tensor | None = None,
        precision: Precision = FP32,
    ) -> None:
        device = data.device
        self.precision, self.autocast = precision, precision.autocast(device)
        self.scaler = precision.grad_scaler(device)  # fp16 only; a pass-through otherwise
        self.model, self.params, self.config, self.state = model, params, config, state
        self.skip_rule, self.augment, self.family = rules
        self.data, self.targets = data, targets
        self.scheduler = self.family.train_scheduler()
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        fused = {} if getattr(config, "privacy", None) else precision.adam_options(device)  # DP: Opacus' own path
        self.optimizer = make_optimizer(params, config, **fused)
        if state.optimizer is not None:
            saved = self.optimizer.state_dict()
            saved["state"] = state.optimizer
            self.optimizer.load_state_dict(saved)
        self.lr_schedule = warmup_schedule(self.optimizer, warmup_steps(config, steps_per_epoch), state.step)
        self.mu = proximal_mu
        self.anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None  # FedProx: the round's weights
        self.bank = state.bank.to(device)
        self.counts = torch.zeros(data.shape[0], dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count = torch.zeros((), dtype=torch.long, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.private = None  # DP-SGD's PrivateTraining: Opacus clips per sample, steps per logical batch
        self.n_aug = torch.zeros((), dtype=torch.long, device=device)
        self.fixed_noise = None if fixed_noise is None else fixed_noise.to(device)  # adding noise, per image

    def step(self, pos: torch.Tensor) -> bool:
        """One optimizer step on the samples at ``pos``: AGC + TAA loss, bank and books updated;
        whether it ended a logical batch (under DP-SGD a physical part of one does not)."""
        if pos.numel() == 0:  # an empty Poisson batch: a zero-weight, data-independent image
            return self._blank_step()
        config, x0 = self.config, self.data[pos]
        added = None  # the adding-noise baseline: noise on what trains (the evaluation's images stay clean)
        if config.input_noise_variance > 0:
            z = self.fixed_noise[pos] if self.fixed_noise is not None else torch.randn_like(x0)
            added = config.input_noise_variance**0.5 * z
        y = None if self.targets is None else self.targets[pos]
        if config.hflip:
            flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            y = y if y is None else self.family.flip_condition(y, flip)  # Ambient's masks flip with their images
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = self.family.noise_like(x0)
        rules = self.bank, self.skip_rule, self.augment
        with self.autocast:  # the network's forward in the run's precision; losses come back fp32
            out = agc_taa_loss(self.model, self.scheduler, x0, t, noise, *rules, config, y, self.family, added)
        loss = out.loss if self.anchor is None else out.loss + proximal_term(self.params, self.anchor, self.mu)
        stepped = self._update(loss)
        self.bank = update_memory_bank(self.bank, t, out.losses, config.bank_eta)
        self.counts.index_add_(0, pos, out.skip.long())
        self.n_aug += out.aug.sum()
        self.seen += pos.numel()
        if self.private is not None:  # batches differ in size: the mean over samples
            self.loss_sum += out.losses.sum()
            self.loss_count += pos.numel()
        else:
            self.loss_sum += kept_mean(out.losses, ~out.skip)
            self.loss_count += 1
        return stepped

    def _update(self, loss: torch.Tensor) -> bool:
        """Back-propagate ``loss`` and step (Opacus' DPOptimizer clips, noises, and skips the
        step inside a split logical batch); the LR schedule and step count follow real steps."""
        if self.private is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # fp16: the true gradients, clipped as in fp32
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed
            self.scaler.update()
            stepped = True
        else:  # Opacus clips per sample (C replaces grad-clip)
            loss.backward()
            self.optimizer.step()
            stepped = self.private.stepped()
            self.optimizer.zero_grad(set_to_none=True)  # keeps a split batch's sum until its last part
        if stepped:
            self.lr_schedule.step()
            self.state.step += 1
        return stepped

    def _blank_step(self) -> bool:
        """DP-SGD's step for an empty batch: zero gradient plus Opacus' noise (the analysis counts it)."""
        x0 = torch.zeros_like(self.data[:1])
        t = torch.zeros(1, dtype=torch.long, device=x0.device)
        y = None if self.targets is None else torch.zeros_like(self.targets[:1])
        losses = self.family.per_sample_loss(self.model, self.scheduler, self.family.encode(x0), t, x0, y)
        return self._update(losses.sum() * 0.0)


def _check_private(config: TrainConfig, skip_rule: SkipRule | None, augment, proximal_mu: float) -> None:
    """What DP-SGD's accountant does not cover: rules that read per-sample losses, FedProx's term."""
    if config.agc or config.taa or skip_rule is not None or augment not in (True, None):
        raise ValueError(
            "dp-sgd: AGC and TAA (or a custom skip rule or augmentation) read per-sample losses "
            "outside the accountant; train with agc = false and taa = false"
        )
    if proximal_mu > 0:
        raise ValueError("dp-sgd: FedProx's proximal term is a gradient outside Opacus' per-sample clipping")
    if config.local_steps:
        raise ValueError("dp-sgd: Poisson sampling plans whole epochs (local-epochs); set local-steps = 0")


def _fixed_noise(config: TrainConfig, noise: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """The per-image noise, given exactly when the config asks for fixed noise, one per image."""
    wanted = config.input_noise_fixed and config.input_noise_variance > 0
    if wanted != (noise is not None):
        need = "needs input_noise (fixed_input_noise of the shard's ids)" if wanted else "takes no input_noise"
        raise ValueError(f"input-noise-fixed: training with input_noise_fixed = {config.input_noise_fixed} {need}")
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"input-noise-fixed: expected noise of shape {tuple(shape)}, got {tuple(noise.shape)}")
    return noise


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, done: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' linear warm-up, continued after the shard's ``done`` steps so far: the lr of step s
    (0-based, counted over all rounds) is lr * min(s, warmup) / warmup, as in the authors' code."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what LambdaLR scales when it starts mid-schedule
    return get_constant_schedule_with_warmup(optimizer, warmup_steps, last_epoch=done - 1)


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term mu/2 * ||w - w_t||^2 over the trainable tensors (Li et al., 2020, eq. 2)."""
    return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))


def shard_seed(seed: int, server_round: int, shard: int) -> int:
    """A distinct, repeatable seed per (run seed, round, shard)."""
    return (seed * 1_000_003 + server_round * 10_007 + shard) % (2**31 - 1)
