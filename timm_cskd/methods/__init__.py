"""Training methods: CS-KD and the paper's comparison methods, one module each, behind one registry.

    timm-cskd train --method cskd --method-kwargs temperature=4 lambda=1
    timm-cskd train --list-methods

Each method is a ``timm_cskd.methods.base.Method`` (a timm ``TrainingTask``) that declares what it needs
from the trainer, in a module of this package that decorates it with ``@register``; every module here is
imported when the package is, so a new method needs no change outside its own module. Hyper-parameters
arrive as ``--method-kwargs key=value`` and are checked against the method's declared ones.
"""

from __future__ import annotations

import importlib
import pkgutil

from timm_cskd.config import MethodConfig
from timm_cskd.config.legacy import LEGACY_KWARGS, LEGACY_MODES
from timm_cskd.errors import ConfigError
from timm_cskd.methods.base import Hyper, KDConfig, Method

__all__ = [
    "METHODS",
    "Hyper",
    "KDConfig",
    "Method",
    "describe_methods",
    "get_method",
    "kd_config",
    "method_hparams",
    "register",
    "resolve_method",
]

METHODS: dict[str, type[Method]] = {}
# --list-methods and the README follow the paper's tables; methods not named here come after.
LISTING_ORDER = (
    "ce",
    "ls",
    "maxent",
    "adacos",
    "virtual-softmax",
    "ddgsd",
    "byot",
    "cskd",
    "cskd-paired",
    "cskd-e",
)


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(
            f"unknown --method '{name}'; choose one of {', '.join(METHODS)} (see --list-methods)"
        )
    return METHODS[name]


def _coerce(cls: type[Method], key: str, value):
    default = cls.hparams[key].default
    kind = type(default)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if (
        (kind is bool and isinstance(value, bool))
        or (kind is float and number)
        or (kind is int and number and float(value).is_integer())
        or kind is str
    ):
        return kind(value)
    raise ConfigError(
        f"--method-kwargs {key}={value!r} for method '{cls.name}': expected a {kind.__name__} like {default!r}"
    )


def method_hparams(cls: type[Method], kwargs: dict | None) -> dict:
    """The method's hyper-parameters: its defaults overridden by ``kwargs``; an unknown key is an error
    listing the valid ones."""
    hp = {key: h.default for key, h in cls.hparams.items()}
    for key, value in (kwargs or {}).items():
        if key not in cls.hparams:
            valid = ", ".join(cls.hparams) or "none"
            raise ConfigError(f"method '{cls.name}' has no hyper-parameter '{key}' (valid: {valid})")
        hp[key] = _coerce(cls, key, value)
        allowed = cls.hparams[key]
        if isinstance(hp[key], int | float) and not isinstance(hp[key], bool) and not allowed.admits(hp[key]):
            raise ConfigError(
                f"--method-kwargs {key}={hp[key]!r} for method '{cls.name}': must be {allowed.allowed()}"
            )
    return hp


def resolve_method(args: MethodConfig) -> tuple[type[Method], dict]:
    """The method class and its full hyper-parameters from ``--method``/``--method-kwargs`` and the
    older ``--cskd-mode``/``--cskd-temperature``/``--cskd-lambda`` spellings (which must agree)."""
    name = args.method
    if args.cskd_mode is not None:
        legacy = LEGACY_MODES[args.cskd_mode]
        if name is not None and name != legacy:
            raise ConfigError(
                f"--cskd-mode {args.cskd_mode} means --method {legacy}, but --method {name} is set"
            )
        name = legacy
    cls = get_method(name or "cskd")
    kwargs = dict(args.method_kwargs or {})
    for flag, key in LEGACY_KWARGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        option = "--" + flag.replace("_", "-")
        if key not in cls.hparams:
            raise ConfigError(f"{option} applies to the CS-KD methods, not --method {cls.name}")
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"{option} {value} disagrees with --method-kwargs {key}={kwargs[key]}")
        if not cls.hparams[key].admits(value):
            raise ConfigError(f"{option} {value}: must be {cls.hparams[key].allowed()}")
        kwargs[key] = value
    if args.plain_sampler and cls.batches != "plain":
        raise ConfigError(f"--plain-sampler gives no class pairs, which --method {cls.name} trains on")
    return cls, method_hparams(cls, kwargs)


def kd_config(args: MethodConfig) -> KDConfig | None:
    """KD's settings with timm train.py's flags: only --distill-loss-weight makes the task weight 1 (timm's
    independent mode), only --task-loss-weight makes the distill weight its complement; neither gives
    Hinton's 0.9 / 0.1."""
    distill, task = args.distill_loss_weight, args.task_loss_weight
    if not args.kd_model_name:
        if distill is not None or task is not None:
            raise ConfigError("--distill-loss-weight / --task-loss-weight need a teacher: --kd-model-name")
        return None
    if distill is None and task is None:
        distill, task = 0.9, 0.1
    elif task is None:
        task = 1.0
    elif distill is None:
        distill = 1.0 - task
    if args.kd_temperature <= 0 or distill < 0 or task < 0:
        raise ConfigError("--kd-temperature must be > 0 and the loss weights >= 0")
    return KDConfig(args.kd_temperature, distill, task)


def describe_methods() -> str:
    """What ``--list-methods`` prints: each method, its formula, batches, Mixup, BCE and hyper-parameters."""
    lines = []
    names = [n for n in LISTING_ORDER if n in METHODS] + [n for n in METHODS if n not in LISTING_ORDER]
    for name in names:
        cls = METHODS[name]
        lines.append(f"{name}: {cls.formula}")
        lines.append(f"    {cls.reference}")
        views = len(cls.views({k: h.default for k, h in cls.hparams.items()}))
        mixup = "yes" if cls.mixup else f"no ({cls.mixup_note})"
        bce = "yes" if cls.bce_loss else f"no ({cls.bce_note})"
        lines.append(f"    batches: {cls.batches}, views per image: {views}, Mixup/CutMix: {mixup}")
        lines.append(f"    --bce-loss: {bce}")
        for key, h in cls.hparams.items():
            allowed = f" ({h.allowed()})" if h.allowed() else ""
            lines.append(f"    {key}={h.default!r}{allowed}  {h.help}")
    return "\n".join(lines)


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()
