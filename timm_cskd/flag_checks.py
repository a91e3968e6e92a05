"""The trainer's flags checked value by value, right after parsing and before any folder, scan or model.

Everything that the value alone shows to be wrong (a negative learning rate, a name timm does not know,
a file that is not there) stops here with one line naming the flag, the value and what is allowed,
instead of a traceback minutes later from timm or torch. The names are asked of timm itself (its
optimizer registry, its scheduler and transform factories), so what timm accepts is accepted.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from timm_cskd.config import DataConfig, ModelConfig, OptimConfig, RunConfig, timm_namespace
from timm_cskd.errors import ConfigError

__all__ = ["check_device", "check_flag_values"]

INF = math.inf
# dest: (low, high, low_open, high_open); a None value (the flag not given) is always allowed. The
# distillation flags are checked together with the teacher (methods.kd_config).
RANGES = {
    "lr": (0, INF, True, True),
    "lr_base": (0, INF, True, True),
    "lr_base_size": (1, INF, False, True),
    "warmup_lr": (0, INF, False, True),
    "min_lr": (0, INF, False, True),
    "momentum": (0, 1, False, False),
    "weight_decay": (0, INF, False, True),
    "opt_eps": (0, INF, True, True),
    "clip_grad": (0, INF, True, True),
    "layer_decay": (0, INF, True, True),
    "epochs": (1, INF, False, True),
    "warmup_epochs": (0, INF, False, True),
    "cooldown_epochs": (0, INF, False, True),
    "patience_epochs": (0, INF, False, True),
    "decay_epochs": (0, INF, True, True),
    "decay_rate": (0, INF, True, True),
    "lr_cycle_mul": (0, INF, True, True),
    "lr_cycle_limit": (1, INF, False, True),
    "batch_size": (1, INF, False, True),
    "validation_batch_size": (1, INF, False, True),
    "grad_accum_steps": (1, INF, False, True),
    "workers": (0, INF, False, True),
    "log_interval": (1, INF, False, True),
    "val_interval": (1, INF, False, True),
    "checkpoint_interval": (0, INF, False, True),
    "recovery_interval": (0, INF, False, True),
    "checkpoint_hist": (0, INF, False, True),
    "ece_bins": (1, INF, False, True),
    "num_classes": (1, INF, False, True),
    "in_chans": (1, INF, False, True),
    "img_size": (1, INF, False, True),
    "crop_pct": (0, INF, True, True),
    "hflip": (0, 1, False, False),
    "vflip": (0, 1, False, False),
    "color_jitter": (0, INF, False, True),
    "color_jitter_prob": (0, 1, False, False),
    "grayscale_prob": (0, 1, False, False),
    "gaussian_blur_prob": (0, 1, False, False),
    "reprob": (0, 1, False, False),
    "recount": (1, INF, False, True),
    "mixup": (0, INF, False, True),
    "cutmix": (0, INF, False, True),
    "mixup_prob": (0, 1, False, False),
    "mixup_switch_prob": (0, 1, False, False),
    "mixup_off_epoch": (0, INF, False, True),
    "smoothing": (0, 1, False, True),
    "drop": (0, 1, False, True),
    "drop_connect": (0, 1, False, True),
    "drop_path": (0, 1, False, True),
    "drop_block": (0, 1, False, True),
    "bn_momentum": (0, 1, False, False),
    "bn_eps": (0, INF, True, True),
    "model_ema_decay": (0, 1, False, False),
    "seed": (0, 2**32 - 1, False, False),
}
# Flags naming a file that must exist when given.
FILE_FLAGS = ("pretrained_path", "initial_checkpoint", "exclude_list", "class_map", "config")
LR_BASE_SCALES = ("", "linear", "sqrt")
TRAIN_CROP_MODES = (None, "", "rrc", "rkrc", "rkrr")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _range_text(low, high, low_open, high_open) -> str:
    lower = f"{'>' if low_open else '>='} {low:g}"
    if high == INF:
        return lower
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _check_ranges(config: RunConfig) -> None:
    values = config.to_dict()
    for dest, (low, high, low_open, high_open) in RANGES.items():
        value = values[dest]
        if value is None or isinstance(value, bool):
            continue
        inside = (
            math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        if not inside:
            raise ConfigError(f"{_flag(dest)} {value}: must be {_range_text(low, high, low_open, high_open)}")
    model, data, optim = config.model, config.data, config.optim
    if data.aug_repeats and data.aug_repeats < 1:
        raise ConfigError(f"--aug-repeats must be 0 (off) or >= 1, got {data.aug_repeats}")
    if model.input_size is not None and min(model.input_size) < 1:
        raise ConfigError(
            f"--input-size {' '.join(map(str, model.input_size))}: every dimension must be >= 1"
        )
    if optim.decay_milestones and min(optim.decay_milestones) < 0:
        raise ConfigError(f"--decay-milestones {values['decay_milestones']}: epochs must be >= 0")
    for dest, upper in (("scale", 1), ("ratio", INF)):
        values = getattr(data, dest)
        if len(values) != 2 or not 0 < values[0] <= values[1] <= upper:
            bound = f" <= {upper}" if upper != INF else ""
            raise ConfigError(
                f"{_flag(dest)} {' '.join(map(str, values))}: expected two values 0 < min <= max{bound}"
            )
    minmax = data.cutmix_minmax
    if minmax is not None and (len(minmax) != 2 or not 0 <= minmax[0] <= minmax[1] <= 1):
        raise ConfigError(f"--cutmix-minmax {list(minmax)}: expected two values 0 <= min <= max <= 1")


def _check_normalisation(args: ModelConfig) -> None:
    """timm's resolve_data_config takes one value for every channel or one per channel."""
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    for dest in ("mean", "std"):
        values = getattr(args, dest)
        if values is not None and len(values) not in (1, in_chans):
            raise ConfigError(
                f"{_flag(dest)} {' '.join(map(str, values))}: expected 1 or {in_chans} values (one per input channel)"
            )
    if args.std is not None and min(args.std) <= 0:
        raise ConfigError(f"--std {' '.join(map(str, args.std))}: every value must be > 0")


def check_device(name: str | None, flag: str = "--device") -> None:
    """A device torch can parse and that this machine has (``cuda`` without a GPU fails here)."""
    if not name:
        return
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{flag} {name}: not a torch device ({e})") from e
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        raise ConfigError(f"{flag} {name}: this machine has no {device.type} device (use --device cpu)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(f"{flag} {name}: this machine has {count()} {device.type} device(s)")


def _check_files(config: RunConfig) -> None:
    values = config.to_dict()
    for dest in FILE_FLAGS:
        value = values[dest]
        if value and not Path(value).is_file():
            what = "a folder, not a file" if Path(value).is_dir() else "not found"
            raise ConfigError(f"{_flag(dest)} {value}: {what}")
    resume = config.output.resume
    if resume and resume != "auto" and not Path(resume).is_file():
        raise ConfigError(f"--resume {resume}: checkpoint not found (or pass --resume auto)")


def _check_optimizer_and_schedule(args: OptimConfig, *, seed: int, eval_metric: str) -> None:
    """timm builds both on a one-weight stand-in: an unknown name or a bad --opt-kwargs fails here."""
    stand_in = torch.nn.Linear(1, 1)
    cfg = timm_namespace(args, seed=seed, eval_metric=eval_metric)
    kwargs = {**optimizer_kwargs(cfg=cfg), "lr": args.lr or args.lr_base}
    kwargs.pop("layer_decay", None)  # needs the real model's layers
    kwargs.pop("layer_decay_min_scale", None)
    kwargs.pop("layer_decay_no_opt_scale", None)
    try:
        optimizer = create_optimizer_v2(stand_in, **kwargs, **args.opt_kwargs)
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ConfigError(f"--opt {args.opt} (with --opt-kwargs {args.opt_kwargs or '{}'}): {e}") from e
    try:
        create_scheduler_v2(
            optimizer,
            **scheduler_kwargs(cfg, decreasing_metric=eval_metric == "loss"),
            updates_per_epoch=1,
        )
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ConfigError(f"--sched {args.sched}: {e}") from e
    if args.lr_base_scale not in LR_BASE_SCALES:
        raise ConfigError(f"--lr-base-scale {args.lr_base_scale}: choose linear or sqrt (or leave it empty)")


def _check_augmentation(args: DataConfig, model: ModelConfig, views: list[dict]) -> None:
    """timm builds the training transforms from the flags (on a stand-in data configuration): an unknown
    --aa policy, crop mode or interpolation fails here, not at the first batch."""
    from timm.data import create_transform
    from timm.data.transforms import str_to_interp_mode

    from timm_cskd.data.loader import build_transforms

    if args.train_crop_mode not in TRAIN_CROP_MODES:
        raise ConfigError(f"--train-crop-mode {args.train_crop_mode}: choose rrc, rkrc or rkrr")
    for dest, value in (
        ("interpolation", model.interpolation),
        ("train_interpolation", args.train_interpolation),
    ):
        if value and value != "random":
            try:
                str_to_interp_mode(value)
            except KeyError:
                raise ConfigError(
                    f"{_flag(dest)} {value}: choose nearest, bilinear, bicubic, box, hamming, lanczos"
                    + (" or random" if dest == "train_interpolation" else "")
                ) from None
    if args.aa:
        try:
            create_transform(32, is_training=True, auto_augment=args.aa)
        except Exception as e:  # timm's policy parsers raise AssertionError, KeyError, ValueError...
            raise ConfigError(
                f"--aa {args.aa}: not a timm augmentation policy ({type(e).__name__}: {e})"
            ) from e
    size = model.input_size[1:] if model.input_size else (model.img_size or 224,) * 2
    in_chans = model.in_chans or (model.input_size[0] if model.input_size else 3)
    stand_in = {
        "input_size": (in_chans, *size),
        "interpolation": model.interpolation or "bilinear",
        "mean": tuple(model.mean or IMAGENET_DEFAULT_MEAN[:1] * in_chans),
        "std": tuple(model.std or IMAGENET_DEFAULT_STD[:1] * in_chans),
        "crop_pct": model.crop_pct or 0.875,
    }
    try:
        build_transforms(args, stand_in, views)
    except Exception as e:  # whatever timm's transform factory refuses
        raise ConfigError(
            f"the augmentation flags (or the method's views {views}) do not build: {type(e).__name__}: {e}"
        ) from e


def check_flag_values(config: RunConfig, views: list[dict]) -> None:
    """Every check of a single flag's value; ``views`` are the method's augmented views."""
    _check_ranges(config)
    _check_normalisation(config.model)
    check_device(config.runtime.device)
    _check_files(config)
    _check_optimizer_and_schedule(
        config.optim, seed=config.runtime.seed, eval_metric=config.output.eval_metric
    )
    _check_augmentation(config.data, config.model, views)
