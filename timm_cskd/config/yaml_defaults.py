"""YAML defaults under the flags (timm's ``-c/--config``): keys may use dashes or underscores, each value is
checked as its flag would check it, and a key that is not a flag is an error naming the closest valid key,
so a typo never silently falls back to a default."""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping

import yaml
from timm.utils import ParseKwargs

from timm_cskd.config.paths import resolve_config
from timm_cskd.errors import ConfigError

__all__ = ["KEY_SYNONYMS", "check_values", "load_yaml_defaults"]


def _valid_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def load_yaml_defaults(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config (a path or a packaged config's name); keys may use dashes or underscores.
    Unknown keys name the closest valid one."""
    path = resolve_config(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML: {getattr(e, 'problem', None) or e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    return check_values(raw, parser, path)


def check_values(raw: Mapping, parser: argparse.ArgumentParser, source) -> dict:
    """Settings keyed by flag (dashes or underscores), each checked as its flag would check it and typed
    as it types it; an unknown key names the closest valid one. ``source`` (a file, a function) starts
    each message."""
    valid = _valid_keys(parser)
    values = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in valid:
            close = KEY_SYNONYMS.get(dest) or next(
                iter(difflib.get_close_matches(dest, list(valid), n=1, cutoff=0.5)), None
            )
            hint = f"; did you mean '{close}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        action = valid[dest]
        if isinstance(action, ParseKwargs) and isinstance(value, list):
            namespace = argparse.Namespace()
            action(None, namespace, [str(v) for v in value])
            value = getattr(namespace, dest)
        value = _typed(source, key, action, value)
        if (
            action.choices is not None
            and value not in action.choices
            and not (value is None and action.default is None)
        ):
            raise ConfigError(
                f"{source}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}"
                + (" (quote it: bare yes/no/on/off are YAML booleans)" if isinstance(value, bool) else "")
            )
        values[dest] = value
    return values


# Other trainers' names for timm's keys, which string similarity alone does not find.
KEY_SYNONYMS = {
    "learning_rate": "lr",
    "base_lr": "lr_base",
    "optimizer": "opt",
    "optim": "opt",
    "scheduler": "sched",
    "lr_scheduler": "sched",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "arch": "model",
    "data_path": "data_dir",
    "dataset_dir": "data_dir",
    "num_workers": "workers",
    "label_smoothing": "smoothing",
    "wd": "weight_decay",
}


def _typed(path, key, action: argparse.Action, value):
    """A YAML value as its flag takes it: the flag's type for each element, a list only where the flag
    takes several values (one value becomes a list of one, as on the command line), as many as it takes,
    a boolean for an on/off flag, a path as its string."""
    if value is None or isinstance(action, ParseKwargs):
        return value
    takes_many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0)
    if isinstance(value, list | tuple) and not takes_many:
        raise ConfigError(f"{path}: {key}: expected one value, got the list {list(value)}")
    if takes_many and not isinstance(value, list | tuple):
        value = [value]
    if takes_many and isinstance(action.nargs, int) and len(value) != action.nargs:
        raise ConfigError(f"{path}: {key}: expected {action.nargs} values, got {list(value)}")
    if isinstance(
        action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction
    ):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key}: expected true or false, got {value!r}")
        return value
    if action.nargs == "?" and isinstance(value, bool) and action.const is not None:
        return action.const if value else None  # `--torchcompile` alone means its const (inductor)
    if action.type is None:
        if takes_many:
            return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    kind = getattr(action.type, "__name__", str(action.type))
    try:
        if isinstance(value, list | tuple):
            return [action.type(v) for v in value]
        if isinstance(value, bool) and action.type in (int, float):
            raise ValueError("a boolean")
        if action.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return action.type(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{path}: {key}: expected {'numbers' if takes_many else 'a number'} ({kind}), got {value!r}"
        ) from None
