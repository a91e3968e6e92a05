"""Flags over YAML defaults, as timm's train.py parses them, and the resolved configuration written back as
``args.yaml`` (loadable again with ``-c``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import yaml

from timm_cskd.config.flag_table import build_parser
from timm_cskd.config.legacy import yield_method_to_command_line
from timm_cskd.config.paths import resolve_config
from timm_cskd.config.yaml_defaults import load_yaml_defaults

__all__ = ["dump_args", "parse_args"]


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
        config = resolve_config(config)
        defaults = load_yaml_defaults(config, parser)
        yield_method_to_command_line(defaults, pre)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.config = str(config) if config is not None else None
    return args


def dump_args(args: argparse.Namespace | Mapping, path: str | os.PathLike) -> None:
    """The resolved configuration (a namespace, or ``RunConfig.to_dict()``), loadable again with -c (as
    timm's args.yaml is)."""
    items = (args if isinstance(args, Mapping) else vars(args)).items()
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in items if k != "config"}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
