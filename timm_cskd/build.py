"""The objects the trainer builds from its configuration's sections, built as timm's ``train.py`` builds them and with timm's
own functions (``create_model``, ``resolve_data_config``, ``Mixup``, ``BinaryCrossEntropy``,
``create_optimizer_v2`` with ``optimizer_kwargs``, ``create_scheduler_v2`` with ``scheduler_kwargs``), so
a timm user's command line or args.yaml means here what it means there.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data import resolve_data_config as timm_resolve_data_config
from timm.layers import set_fast_norm
from timm.loss import BinaryCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from timm_cskd.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, RuntimeConfig, timm_namespace
from timm_cskd.errors import ConfigError

__all__ = [
    "create_bce",
    "create_mixup",
    "create_model",
    "create_optimizer",
    "create_scheduler",
    "import_device_modules",
    "resolve_data_config",
    "resolve_lr",
]


def import_device_modules(runtime: RuntimeConfig) -> None:
    for name in runtime.device_modules or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"--device-modules {name}: {e}") from e


def create_model(args: ModelConfig, num_classes: int) -> nn.Module:
    """timm's model with train.py's arguments: drop rates, pooling, BatchNorm overrides, --model-kwargs,
    --initial-checkpoint, --pretrained / --pretrained-path (the head adapted to ``num_classes``), head
    initialisation, gradient checkpointing."""
    if args.model not in timm.list_models() and not args.model.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model '{args.model}'{hint}")
    if args.fast_norm:
        set_fast_norm()
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    factory_kwargs = {}
    if args.pretrained_path:
        # timm's convention: the file replaces the pretrained source, num_classes -1 adapts the head.
        factory_kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path, num_classes=-1)
    try:
        model = timm.create_model(
            args.model,
            pretrained=args.pretrained or bool(args.pretrained_path),
            in_chans=in_chans,
            num_classes=num_classes,
            drop_rate=args.drop,
            drop_path_rate=args.drop_path if args.drop_path is not None else args.drop_connect,
            drop_block_rate=args.drop_block,
            global_pool=args.gp,
            bn_momentum=args.bn_momentum,
            bn_eps=args.bn_eps,
            checkpoint_path=args.initial_checkpoint or None,
            **factory_kwargs,
            **args.model_kwargs,
        )
    except Exception as e:  # timm and torch.load raise RuntimeError, OSError, KeyError, UnpicklingError...
        flag, source = next(
            (
                (f, v)
                for f, v in (
                    ("--initial-checkpoint", args.initial_checkpoint),
                    ("--pretrained-path", args.pretrained_path),
                )
                if v
            ),
            ("--pretrained", "timm's pretrained weights") if args.pretrained else (None, None),
        )
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        where = f" from {flag} {source}" if flag else ""
        hint = (
            " (is it a PyTorch checkpoint or state_dict?)"
            if isinstance(e, KeyError | EOFError) or "pickle" in reason.lower()
            else ""
        )
        raise ConfigError(f"cannot create --model {args.model}{where}: {reason}{hint}") from e
    classifier = model.get_classifier()
    with torch.no_grad():
        if args.head_init_scale is not None:
            classifier.weight.mul_(args.head_init_scale)
            classifier.bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None:
            nn.init.constant_(classifier.bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


def resolve_data_config(args: ModelConfig, model: nn.Module) -> dict:
    """Input size, interpolation, mean/std and crop from the flags, the model's defaults filling the rest."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(args).items()}
    return timm_resolve_data_config(values, model=model)


def create_mixup(args: DataConfig, smoothing: float, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix from the augmentation flags, its targets smoothed by ``smoothing``."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=smoothing,
        num_classes=num_classes,
    )


def create_bce(args: MethodConfig, mixup: bool) -> BinaryCrossEntropy | None:
    """timm's --bce-loss: with Mixup the soft targets carry the smoothing; without it the loss applies it."""
    if not args.bce_loss:
        return None
    return BinaryCrossEntropy(
        smoothing=0.0 if mixup else args.smoothing,
        target_threshold=args.bce_target_thresh,
        sum_classes=args.bce_sum,
        pos_weight=args.bce_pos_weight,
    )


def create_task(
    args: MethodConfig, method_cls, model: nn.Module, data_config: dict, mixup_fn, teacher, kd, device
):
    """The method's ``TrainingTask`` around ``model`` from the run's flags, as the trainer and the
    benchmark build it (``method_cls`` from the registry; ``teacher``/``kd`` None without distillation)."""
    return method_cls(
        model,
        args.method_kwargs,
        mixup_fn=mixup_fn,
        smoothing=args.smoothing,
        bce=create_bce(args, mixup=mixup_fn is not None),
        teacher=teacher,
        kd=kd,
        normalization=(data_config["mean"], data_config["std"]),
        device=device,
    )


def resolve_lr(args: OptimConfig, batch_size: int, world_size: int) -> float:
    """--lr, or --lr-base scaled by the global batch (``batch_size`` per rank, gradient accumulation
    included) over --lr-base-size, linearly or by its square root (timm's default for ada*/lamb)."""
    if args.lr:
        return args.lr
    global_batch = batch_size * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or (
        "sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear"
    )
    return args.lr_base * (ratio**0.5 if scale == "sqrt" else ratio)


def create_optimizer(args: OptimConfig, module: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer over ``module``; --weight-decay-bias-bn also decays biases and norm weights."""
    return create_optimizer_v2(
        module,
        **optimizer_kwargs(cfg=timm_namespace(args)),
        filter_bias_and_bn=not args.weight_decay_bias_bn,
        **args.opt_kwargs,
    )


def create_scheduler(args: OptimConfig, optimizer, updates_per_epoch: int, *, seed: int, eval_metric: str):
    """timm's scheduler and the number of epochs it runs (warmup prefix and cooldown included); ``seed``
    seeds its --lr-noise, ``eval_metric`` is the --eval-metric a plateau schedule watches."""
    cfg = timm_namespace(args, seed=seed, eval_metric=eval_metric)
    return create_scheduler_v2(
        optimizer,
        **scheduler_kwargs(cfg, decreasing_metric=eval_metric == "loss"),
        updates_per_epoch=updates_per_epoch,
    )
