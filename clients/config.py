"""What a shard's local training reads: the few settings of the trainer, AGC and TAA, as plain
values (the app's ``fl_app.config.train_config(settings)`` makes one; a notebook can write one by hand)."""

from __future__ import annotations

from dataclasses import dataclass

ACCOUNTANTS = ("prv", "rdp", "gdp")  # Opacus' accountant names (``opacus.accountants.create_accountant``)
OPTIMIZERS = ("adam", "adamw")  # torch.optim.Adam (the authors' pixel runs), AdamW (their Stable Diffusion run)


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD's settings for one shard.

    Parameters
    ----------
    noise_multiplier : float
        sigma: the noise's std over the clip norm (> 0); 0 with ``target_epsilon`` set: found by
        Opacus' ``get_noise_multiplier`` for the shard's planned steps.
    target_epsilon : float (default: 0.0)
        The epsilon to spend by the run's last round; 0: ``noise_multiplier`` is given.
    delta : float (default: 1e-5)
        The delta of the (epsilon, delta) guarantee.
    max_grad_norm : float (default: 1.0)
        C: each per-sample gradient is clipped to this L2 norm.
    accountant : str (default: "prv")
        Opacus' accountant (one of ``ACCOUNTANTS``).
    max_physical_batch : int (default: 0)
        > 0: Opacus' ``BatchMemoryManager`` splits a logical batch into physical ones of at most this
        many images (one noisy step per logical batch); 0: no split.
    rounds : int (default: 1)
        The run's rounds: the planned steps (with ``target_epsilon``) are rounds x local epochs x
        steps per epoch.
    """

    noise_multiplier: float
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    max_physical_batch: int = 0
    rounds: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """The local training of one shard for a round (the paper's defaults for the CPU preset).

    Parameters
    ----------
    local_epochs : int (default: 10)
        Passes over the shard per round (E).
    batch_size : int (default: 32)
        Samples per step (a shard smaller than this trains in one batch of all of it).
    lr : float (default: 1e-3)
        Adam's learning rate after the warm-up.
    warmup_epochs : int (default: 5)
        Linear warm-up, in epochs of this shard, counted over all rounds.
    local_steps : int (default: 0)
        > 0: optimizer steps per round instead of ``local_epochs`` epochs (the authors' Stable
        Diffusion run: 2,000), over fresh permutations of the shard, the last one cut short.
    warmup_steps : int (default: -1)
        >= 0: the warm-up in optimizer steps (their Stable Diffusion run: 5,000) instead of
        ``warmup_epochs``; -1: ``warmup_epochs`` epochs.
    optimizer : str (default: "adam")
        ``adam`` (torch.optim.Adam) or ``adamw`` (torch.optim.AdamW: decoupled weight decay).
    weight_decay : float (default: 0.0)
        The optimizer's ``weight_decay`` (AdamW's decoupled decay; Adam's L2 term); their Stable
        Diffusion run: AdamW with 1e-2.
    hflip : bool (default: False)
        Random horizontal flips of the training images.
    grad_clip : float (default: 1.0)
        Largest gradient norm per step.
    bank_eta : float (default: 0.8)
        The memory bank's momentum (eq. 3).
    agc : bool (default: True)
        Skip samples whose loss ratio falls below ``skip_threshold`` (eq. 4).
    skip_threshold : float (default: 0.5)
        lambda: the skip line of eq. 4, a ratio of a sample's loss to its timestep's running mean.
    taa : bool (default: True)
        Train samples just above the skip line on an augmented copy (eq. 5-8).
    aug_range : float (default: 1.7)
        R: samples with ratio in [lambda, R * lambda) are augmented (inf: all kept samples).
    aug_sharpness : float (default: 5.0)
        A: how fast the augmentation strength grows toward the skip line (eq. 6-7).
    randaugment_magnitude : int (default: 3)
        M: RandAugment's magnitude at full strength (rho = 1).
    randaugment_ops : int (default: 2)
        RandAugment's operations per image.
    taa_interpolation : str (default: "bilinear")
        How TAA's shear, translate and rotate resample (``clients.taa``): ``nearest`` is
        torchvision's RandAugment (nearest pixel, whole-pixel translations, shear about the top
        left corner); ``bilinear`` moves by fractions of a pixel (shear about the centre).
    input_noise_variance : float (default: 0.0)
        The adding-noise baseline (the paper's Table I: 0.1): Gaussian noise of this variance added
        to each training image in [-1, 1] (after flips and TAA's augmentation) before the forward
        diffusion; 0: off.
    input_noise_fixed : bool (default: False)
        Draw that noise once per image (``fixed_input_noise``, given to ``train_shard``) instead
        of afresh at every step.
    precision : str (default: "auto")
        The network's forward under autocast: ``fp32``, ``bf16``, ``fp16`` (CUDA, with a gradient
        scaler) or ``auto`` (``ddpm.precision.resolve_precision``); weights, moments, bank and losses stay fp32.
    channels_last : str (default: "auto")
        NHWC weights: ``true``, ``false`` or ``auto`` (``ddpm.precision.resolve_channels_last``).
    compile : bool (default: False)
        ``torch.compile`` the network's forward for the round.
    privacy : PrivacyConfig | None (default: None)
        DP-SGD through Opacus (Poisson batches, per-sample clipping, noise, accountant); None: off.
        Needs ``agc`` and ``taa`` off (they read per-sample losses outside the accountant).
    """

    local_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: int = 5
    local_steps: int = 0
    warmup_steps: int = -1
    optimizer: str = "adam"
    weight_decay: float = 0.0
    hflip: bool = False
    grad_clip: float = 1.0
    bank_eta: float = 0.8
    agc: bool = True
    skip_threshold: float = 0.5
    taa: bool = True
    aug_range: float = 1.7
    aug_sharpness: float = 5.0
    randaugment_magnitude: int = 3
    randaugment_ops: int = 2
    taa_interpolation: str = "bilinear"
    input_noise_variance: float = 0.0
    input_noise_fixed: bool = False
    precision: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    privacy: PrivacyConfig | None = None
