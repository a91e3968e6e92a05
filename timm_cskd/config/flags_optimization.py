"""timm train.py's optimizer, schedule, augmentation, batch norm and EMA flags, and this trainer's own."""

from __future__ import annotations

import argparse

from timm.utils import ParseKwargs

from timm_cskd.config.refusal import refused

__all__ = ["add_optimization_flags"]


def add_optimization_flags(parser: argparse.ArgumentParser) -> None:
    """The optimizer, learning rate schedule, augmentation, batch norm and model EMA groups."""
    g = parser.add_argument_group("Optimizer parameters")
    g.add_argument(
        "--opt",
        default="sgd",
        help="timm optimizer name (sgd is Nesterov in timm; momentum: plain SGD momentum, as the paper)",
    )
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--layer-decay", type=float, default=None)
    g.add_argument("--layer-decay-min-scale", type=float, default=0)
    g.add_argument("--layer-decay-no-opt-scale", type=float, default=None)
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE")
    g.add_argument(
        "--weight-decay-bias-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="(timm-cskd) also decay biases and norm weights (the paper's code does; timm skips them)",
    )

    g = parser.add_argument_group("Learning rate schedule parameters")
    g.add_argument("--sched", default="cosine", help="timm scheduler name")
    g.add_argument(
        "--sched-on-updates",
        action="store_true",
        default=False,
        help="step the schedule every update instead of every epoch",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="absolute learning rate; default: --lr-base scaled by the global batch",
    )
    g.add_argument(
        "--lr-base", type=float, default=0.1, help="learning rate per --lr-base-size images of global batch"
    )
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument(
        "--lr-base-scale",
        default="",
        help="linear or sqrt (default: sqrt for ada*/lamb optimizers, else linear)",
    )
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--lr-cycle-mul", type=float, default=1.0)
    g.add_argument("--lr-cycle-decay", type=float, default=0.5)
    g.add_argument("--lr-cycle-limit", type=int, default=1)
    g.add_argument("--lr-k-decay", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0)
    g.add_argument("--epochs", type=int, default=300)
    refused(
        g, "--epoch-repeats", type=float, default=0.0, why="an epoch is one pass over the class-pair plan"
    )
    refused(
        g,
        "--start-epoch",
        type=int,
        default=None,
        why="the checkpoint records the exact position; overriding it would desynchronise plan, schedule and RNG",
    )
    g.add_argument(
        "--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="epochs of multistep decay"
    )
    g.add_argument("--decay-epochs", type=float, default=90, help="interval of step decay")
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-prefix", action="store_true", default=False)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--patience-epochs", type=int, default=10)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)

    g = parser.add_argument_group("Augmentation and regularization parameters")
    g.add_argument("--no-aug", action="store_true", default=False)
    g.add_argument("--train-crop-mode", default=None, help="timm's rrc (default), rkrc or rkrr")
    g.add_argument(
        "--scale", type=float, nargs="+", default=[0.08, 1.0], help="random-resized-crop area range"
    )
    g.add_argument(
        "--ratio", type=float, nargs="+", default=[3 / 4, 4 / 3], help="random-resized-crop aspect range"
    )
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--color-jitter-prob", type=float, default=None)
    g.add_argument("--grayscale-prob", type=float, default=None)
    g.add_argument("--gaussian-blur-prob", type=float, default=None)
    g.add_argument("--aa", default=None, help="AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument(
        "--aug-repeats",
        type=float,
        default=0,
        help="repeated augmentation: each (pair) unit N times per epoch",
    )
    refused(
        g, "--aug-splits", type=int, default=0, why="AugMix splits are not combined with class-pair batches"
    )
    refused(g, "--jsd-loss", action="store_true", default=False, why="needs --aug-splits")
    g.add_argument(
        "--bce-loss",
        action="store_true",
        default=False,
        help="timm's BinaryCrossEntropy as the task term (with the CS-KD methods: beside their softmax KL)",
    )
    g.add_argument("--bce-sum", action="store_true", default=False)
    g.add_argument("--bce-target-thresh", type=float, default=None)
    g.add_argument("--bce-pos-weight", type=float, default=None)
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    refused(g, "--resplit", action="store_true", default=False, why="needs --aug-splits")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    g.add_argument(
        "--mixup-off-epoch", type=int, default=0, help="turn Mixup/CutMix off from this epoch (0: never)"
    )
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--drop", type=float, default=0.0)
    g.add_argument("--drop-connect", type=float, default=None, help="deprecated timm alias of --drop-path")
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--drop-block", type=float, default=None)

    g = parser.add_argument_group("Batch norm parameters")
    g.add_argument("--bn-momentum", type=float, default=None)
    g.add_argument("--bn-eps", type=float, default=None)
    g.add_argument("--sync-bn", action="store_true", default=False)
    g.add_argument(
        "--dist-bn",
        choices=("reduce", "broadcast", ""),
        default="reduce",
        help="how BatchNorm running stats are made equal across ranks at epoch ends ('' keeps each rank's)",
    )
    refused(g, "--split-bn", action="store_true", default=False, why="needs --aug-splits")

    g = parser.add_argument_group("Model exponential moving average parameters")
    g.add_argument("--model-ema", action="store_true", default=False)
    refused(
        g,
        "--model-ema-force-cpu",
        action="store_true",
        default=False,
        why="the EMA is validated on the training device every epoch",
    )
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)
