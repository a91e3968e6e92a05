"""The run configuration's sections, one frozen dataclass per concern, each field named after its flag's
destination (``--batch-size`` is ``DataConfig.batch_size``), so a layer reads its own section only.

The flag table (``flag_table``) declares every flag and its default; the sections add none of their own:
``RunConfig.from_dict`` fills a missing field from the table. A flag that takes several values is a tuple
here (a list on the command line and in args.yaml); a ``KEY=VALUE`` flag is a dict. timm's refused flags
are no field (but ``--dataset``, which takes several values): the command line refuses any value but
timm's default, so they always hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "RuntimeConfig",
]


@dataclass(frozen=True)
class ModelConfig:
    """The network: timm's model, its input (what ``resolve_data_config`` reads), weights, regularisation
    inside the model and BatchNorm settings."""

    model: str
    pretrained: bool
    pretrained_path: str | None
    initial_checkpoint: str
    num_classes: int | None
    gp: str | None
    img_size: int | None
    in_chans: int | None
    input_size: tuple[int, ...] | None
    crop_pct: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str
    grad_checkpointing: bool
    fast_norm: bool
    model_kwargs: dict
    head_init_scale: float | None
    head_init_bias: float | None
    drop: float
    drop_connect: float | None
    drop_path: float | None
    drop_block: float | None
    bn_momentum: float | None
    bn_eps: float | None


@dataclass(frozen=True)
class DataConfig:
    """The dataset, its loaders (backend, batch sizes, workers, memory layout) and the augmentation of
    the training images, Mixup/CutMix included. ``data`` is timm's deprecated positional folder;
    resolved, ``data_dir`` holds it. ``dataset`` is timm's (refused unless a folder dataset or ``wds/``
    for a shard folder)."""

    data: str | None
    data_dir: str | None
    dataset: str
    train_split: str
    val_split: str
    class_map: str
    data_backend: str
    exclude_list: str | None
    batch_size: int
    validation_batch_size: int | None
    channels_last: bool
    workers: int
    pin_mem: bool
    no_pin_mem: bool
    no_prefetcher: bool
    use_multi_epochs_loader: bool
    no_aug: bool
    train_crop_mode: str | None
    scale: tuple[float, ...]
    ratio: tuple[float, ...]
    hflip: float
    vflip: float
    color_jitter: float
    color_jitter_prob: float | None
    grayscale_prob: float | None
    gaussian_blur_prob: float | None
    aa: str | None
    aug_repeats: float
    reprob: float
    remode: str
    recount: int
    mixup: float
    cutmix: float
    cutmix_minmax: tuple[float, ...] | None
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    mixup_off_epoch: int
    train_interpolation: str


@dataclass(frozen=True)
class MethodConfig:
    """The training method and its loss: the method and its hyper-parameters (resolved: the method's
    name and every hyper-parameter), the first release's spellings, label smoothing, timm's BCE loss and
    knowledge distillation from a teacher."""

    method: str | None
    method_kwargs: dict
    list_methods: bool
    cskd_mode: str | None
    cskd_temperature: float | None
    cskd_lambda: float | None
    plain_sampler: bool
    smoothing: float
    bce_loss: bool
    bce_sum: bool
    bce_target_thresh: float | None
    bce_pos_weight: float | None
    kd_model_name: str | None
    distill_loss_weight: float | None
    task_loss_weight: float | None
    kd_temperature: float
    kd_model_arch: str | None


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, the learning rate and its schedule (``lr`` resolved: the rate the run uses),
    gradient accumulation and clipping, and the model EMA."""

    opt: str
    opt_eps: float | None
    opt_betas: tuple[float, ...] | None
    momentum: float
    weight_decay: float
    clip_grad: float | None
    clip_mode: str
    layer_decay: float | None
    layer_decay_min_scale: float
    layer_decay_no_opt_scale: float | None
    opt_kwargs: dict
    weight_decay_bias_bn: bool
    grad_accum_steps: int
    sched: str
    sched_on_updates: bool
    lr: float | None
    lr_base: float
    lr_base_size: int
    lr_base_scale: str
    lr_noise: tuple[float, ...] | None
    lr_noise_pct: float
    lr_noise_std: float
    lr_cycle_mul: float
    lr_cycle_decay: float
    lr_cycle_limit: int
    lr_k_decay: float
    warmup_lr: float
    min_lr: float
    epochs: int
    decay_milestones: tuple[int, ...]
    decay_epochs: float
    warmup_epochs: int
    warmup_prefix: bool
    cooldown_epochs: int
    patience_epochs: int
    decay_rate: float
    model_ema: bool
    model_ema_decay: float
    model_ema_warmup: bool


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run computes: the device, AMP, the process group (DDP, BatchNorm across ranks),
    the seed and torch.compile."""

    device: str | None
    amp: bool
    amp_dtype: str
    no_ddp_bb: bool
    synchronize_step: bool
    local_rank: int
    device_modules: tuple[str, ...] | None
    seed: int
    sync_bn: bool
    dist_bn: str
    torchcompile: str | None
    torchcompile_mode: str | None


@dataclass(frozen=True)
class OutputConfig:
    """What the run writes and where: the experiment folder (``experiment`` resolved: its name), resume,
    checkpoints, validation and the eval metric, progress lines and the W&B/TensorBoard logs. ``config``
    names the YAML the run started from."""

    config: str | None
    output: str
    experiment: str
    resume: str
    no_resume_opt: bool
    overwrite: bool
    checkpoint_interval: int
    recovery_interval: int
    checkpoint_hist: int
    eval_metric: str
    ece_bins: int
    log_interval: int
    val_interval: int
    log_wandb: bool
    wandb_project: str | None
    wandb_tags: tuple[str, ...]
    wandb_resume_id: str
    log_tensorboard: bool
