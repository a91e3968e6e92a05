"""Command line and YAML configuration, following timm's train.py conventions.

``-c/--config FILE.yaml`` supplies defaults, flags on the command line override them, and the resolved
configuration is written to ``args.yaml`` in the experiment folder. A YAML key that is not a flag is an
error naming the closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path

import yaml
from timm.utils import ParseKwargs

__all__ = ["ConfigError", "build_parser", "parse_args", "load_yaml_defaults"]


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_imagenet.py",
        description="Train timm models on ImageNet-style folders with Class-wise Self-Knowledge Distillation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-c", "--config", default=None, help="YAML file of defaults; flags override it")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=None,
        help="root with train/ and val/ (or validation/) ImageFolder trees or list files; none: the bundled demo dataset",
    )
    data.add_argument("--train-split", default="train", help="folder or list file under --data-dir")
    data.add_argument(
        "--val-split",
        default=None,
        help="folder or list file under --data-dir (default: val, then validation)",
    )
    data.add_argument("--data-backend", choices=("torch", "dali"), default="torch")
    data.add_argument(
        "-j", "--workers", type=int, default=4, help="data loading processes (threads for DALI) per rank"
    )
    data.add_argument(
        "--exclude-list",
        default=None,
        help="file of undecodable images to skip (python -m timm_cskd.data.verify writes it)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet50", help="any timm model name")
    model.add_argument(
        "--pretrained",
        action="store_true",
        help="start from timm's pretrained weights (must be cached locally)",
    )
    model.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    model.add_argument("--img-size", type=int, default=224)
    model.add_argument("--in-chans", type=int, default=3)
    model.add_argument(
        "--crop-pct",
        type=float,
        default=None,
        help="validation centre-crop fraction (default: the model's pretrained_cfg)",
    )
    model.add_argument(
        "--interpolation",
        default=None,
        help="validation resize interpolation (default: the model's pretrained_cfg)",
    )
    model.add_argument("--mean", type=float, nargs=3, default=None)
    model.add_argument("--std", type=float, nargs=3, default=None)

    aug = parser.add_argument_group("augmentation")
    aug.add_argument(
        "--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range"
    )
    aug.add_argument(
        "--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="random-resized-crop aspect range"
    )
    aug.add_argument("--hflip", type=float, default=0.5)
    aug.add_argument("--color-jitter", type=float, default=0.0)
    aug.add_argument("--train-interpolation", default="bilinear")
    aug.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    aug.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    aug.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    aug.add_argument("--mixup-prob", type=float, default=1.0)
    aug.add_argument("--mixup-switch-prob", type=float, default=0.5)

    method = parser.add_argument_group("method")
    method.add_argument(
        "--method",
        default=None,
        help="training method (default: cskd, the paper's algorithm); --list-methods describes them all",
    )
    method.add_argument(
        "--method-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        metavar="KEY=VALUE",
        help="the method's hyper-parameters, e.g. temperature=4 lambda=1 (unknown keys are an error)",
    )
    method.add_argument(
        "--list-methods", action="store_true", help="print every method with its hyper-parameters"
    )
    method.add_argument(
        "--cskd-mode",
        choices=("anchor", "paired", "off"),
        default=None,
        help="older spelling of --method: anchor = cskd, paired = cskd-paired, off = ce",
    )
    method.add_argument("--cskd-temperature", type=float, default=None, help="= --method-kwargs temperature=")
    method.add_argument("--cskd-lambda", type=float, default=None, help="= --method-kwargs lambda=")
    method.add_argument(
        "--plain-sampler",
        action="store_true",
        help="accepted with methods that train on plain batches (their default); an error with class-pair methods",
    )

    kd = parser.add_argument_group("knowledge distillation (an add-on to any method)")
    kd.add_argument(
        "--kd-model-name",
        default=None,
        help="teacher: a timm model name (pretrained weights), hf-hub:/local-dir: id, training checkpoint, "
        "exported folder or state_dict (with --kd-model-arch)",
    )
    kd.add_argument(
        "--kd-model-arch", default=None, help="the teacher's timm architecture for a plain state_dict"
    )
    kd.add_argument("--kd-temperature", type=float, default=4.0)
    kd.add_argument(
        "--distill-loss-weight",
        type=float,
        default=None,
        help="weight of T^2 KL(teacher || student) (default 0.9, or 1 - --task-loss-weight)",
    )
    kd.add_argument(
        "--task-loss-weight",
        type=float,
        default=None,
        help="weight of the CE term under KD (default 0.1; 1.0 when only --distill-loss-weight is given, as timm)",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=90)
    opt.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=32,
        help="per process; anchors in anchor mode (as many partners load too), images in paired mode",
    )
    opt.add_argument(
        "--lr",
        type=float,
        default=None,
        help="absolute learning rate; default: --lr-base scaled by the global batch",
    )
    opt.add_argument(
        "--lr-base", type=float, default=0.1, help="learning rate per 256 images of global batch"
    )
    opt.add_argument(
        "--opt",
        default="momentum",
        help="timm optimizer name (momentum: SGD with momentum, as the paper; sgd: Nesterov)",
    )
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument(
        "--weight-decay-bias-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also decay biases and norm weights (the paper's code does; timm skips them)",
    )
    opt.add_argument("--sched", default="multistep", help="timm scheduler name")
    opt.add_argument(
        "--decay-milestones",
        type=int,
        nargs="+",
        default=[30, 60],
        help="epochs of multistep decay (timm's form)",
    )
    opt.add_argument("--decay-rate", type=float, default=0.1)
    opt.add_argument("--warmup-epochs", type=int, default=0)
    opt.add_argument("--warmup-lr", type=float, default=1e-5)
    opt.add_argument("--min-lr", type=float, default=0.0)
    opt.add_argument("--clip-grad", type=float, default=None)

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    runtime.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=False, help="torch.autocast mixed precision"
    )
    runtime.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    runtime.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    runtime.add_argument(
        "--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend"
    )
    runtime.add_argument("--sync-bn", action="store_true")
    runtime.add_argument(
        "--dist-bn",
        choices=("reduce", "broadcast", ""),
        default="reduce",
        help="how BatchNorm running stats are made equal across ranks at epoch ends ('' keeps each rank's)",
    )
    runtime.add_argument("--model-ema", action="store_true")
    runtime.add_argument("--model-ema-decay", type=float, default=0.9998)
    runtime.add_argument("--seed", type=int, default=42)
    runtime.add_argument("--validation-batch-size", type=int, default=None)
    runtime.add_argument("--ece-bins", type=int, default=20)

    out = parser.add_argument_group("output")
    out.add_argument("--output", default="output", help="root folder of experiments")
    out.add_argument("--experiment", default=None, help="sub-folder name (default: model-mode-timestamp)")
    out.add_argument(
        "--resume",
        default=None,
        help="checkpoint path, or 'auto' for the newest valid one in the experiment folder",
    )
    out.add_argument(
        "--checkpoint-interval",
        type=int,
        default=0,
        help="also save every N optimizer steps (0: epoch ends only)",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an experiment folder that holds a run (deletes its checkpoints and summary)",
    )
    out.add_argument("--log-interval", type=int, default=50, help="steps between progress lines")
    out.add_argument(
        "--val-interval", type=int, default=1, help="validate every N epochs and after the last one"
    )
    return parser


def _valid_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def load_yaml_defaults(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config; keys may use dashes or underscores. Unknown keys name the closest valid one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    valid = _valid_keys(parser)
    values = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in valid:
            close = difflib.get_close_matches(dest, list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        action = valid[dest]
        if isinstance(action, ParseKwargs) and isinstance(value, list):
            namespace = argparse.Namespace()
            action(None, namespace, [str(v) for v in value])
            value = getattr(namespace, dest)
        if action.type is not None and value is not None and not isinstance(value, list | tuple):
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ConfigError(
                f"{path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}"
                + (" (quote it: bare yes/no/on/off are YAML booleans)" if isinstance(value, bool) else "")
            )
        values[dest] = value
    return values


def parse_args(
    argv: list[str] | None = None, default_config: str | os.PathLike | None = None
) -> argparse.Namespace:
    """Parse flags over the YAML defaults; with no --config and no --data-dir, ``default_config`` applies."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config = pre.config
    if config is None and pre.data_dir is None and default_config is not None:
        config = default_config
    if config is not None:
        parser.set_defaults(**load_yaml_defaults(config, parser))
    args = parser.parse_args(argv)
    args.config = str(config) if config is not None else None
    return args


def dump_args(args: argparse.Namespace, path: str | os.PathLike) -> None:
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
