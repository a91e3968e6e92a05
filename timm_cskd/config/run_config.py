"""The run configuration: the parsed flags as one frozen ``RunConfig`` of typed sections (``sections``).

The command line parses into an ``argparse.Namespace``; ``RunConfig.from_namespace`` is the one
conversion from it, and refuses there the timm flags this trainer cannot honour. From then on every layer
receives its section, and a value known only later (the class count, the learning rate, the experiment
name) makes a new configuration (``replace``), never a changed one. ``to_dict`` / ``from_dict`` are the
flat plain form keyed by flag destination, in the flag table's order: what args.yaml and a checkpoint's
``args`` hold (timm's tools read that key).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from timm_cskd.config.flag_table import build_parser, refused_settings
from timm_cskd.config.sections import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RuntimeConfig,
)
from timm_cskd.errors import ConfigError

__all__ = ["REFUSED_FIELDS", "SECTIONS", "RunConfig", "flag_defaults"]

# The section classes by RunConfig field name.
SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "runtime": RuntimeConfig,
    "output": OutputConfig,
}
# The refused flags that are still fields: --dataset takes folder names and wds/ besides timm's default.
REFUSED_FIELDS = ("dataset",)


@functools.cache
def flag_defaults() -> dict:
    """Every flag destination with its default, in the flag table's order (args.yaml's key order)."""
    parser = build_parser()
    return {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}


@functools.cache
def _section_of() -> dict[str, str]:
    """Each field's section name."""
    return {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _frozen(value):
    """A list (several values on the command line or in YAML) as a tuple; a dict copied; a path as its
    string (args.yaml and checkpoints hold plain values)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _plain(value):
    """The YAML/checkpoint form: tuples as lists, lists and dicts copied (never a cached default)."""
    if isinstance(value, (tuple, list)):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


@dataclass(frozen=True)
class RunConfig:
    """A training run's whole configuration, one section per concern."""

    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    optim: OptimConfig
    runtime: RuntimeConfig
    output: OutputConfig

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> RunConfig:
        """The parsed command line as a configuration; a refused timm flag set is an error here."""
        refused = refused_settings(args)
        if refused:
            raise ConfigError("timm train.py settings this trainer cannot honour: " + "; ".join(refused))
        return cls._build(vars(args))

    @classmethod
    def from_dict(cls, values: Mapping) -> RunConfig:
        """The flat form back (a checkpoint's ``args``): a key no flag has is ignored (an older
        release's), a missing one takes its flag's default."""
        return cls._build({**flag_defaults(), **values})

    @classmethod
    def _build(cls, values: Mapping) -> RunConfig:
        fields = {name: {} for name in SECTIONS}
        for dest, section in _section_of().items():
            fields[section][dest] = _frozen(values[dest])
        return cls(**{name: SECTIONS[name](**fields[name]) for name in SECTIONS})

    def replace(self, **values) -> RunConfig:
        """A new configuration with these fields (by flag destination) changed."""
        changed: dict[str, dict] = {}
        where = _section_of()
        for dest, value in values.items():
            if dest not in where:
                raise KeyError(f"no configuration field {dest!r}")
            changed.setdefault(where[dest], {})[dest] = _frozen(value)
        return dataclasses.replace(
            self, **{name: dataclasses.replace(getattr(self, name), **f) for name, f in changed.items()}
        )

    def to_dict(self) -> dict:
        """Every flag destination with its value, in the flag table's order; a refused flag holds timm's
        default, as the command line leaves it."""
        where = _section_of()
        out = {}
        for dest, default in flag_defaults().items():
            if dest in where:
                out[dest] = _plain(getattr(getattr(self, where[dest]), dest))
            else:  # a refused flag
                out[dest] = _plain(default)
        return out
