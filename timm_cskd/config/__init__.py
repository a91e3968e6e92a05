"""Command line and YAML configuration, following timm's train.py conventions.

``-c/--config FILE.yaml`` supplies defaults, flags on the command line override them, and the resolved
configuration is written to ``args.yaml`` in the experiment folder. ``-c NAME`` names a packaged recipe
(``paths``). The flags are declared once, refusals beside them (``flag_table`` and its ``flags_*``
sections); a YAML key that is not a flag is an error naming the closest valid key (``yaml_defaults``).
The parsed namespace becomes a frozen ``RunConfig`` of typed sections (``run_config``, ``sections``), the
only form the layers above receive; ``timm_args`` turns its optimisation section back into the namespace
timm's optimizer and scheduler factories read.
"""

from timm_cskd.config.flag_table import REFUSED, build_parser, dataset_refusal, refused_settings
from timm_cskd.config.flags_input import DEFAULT_VAL_SPLIT
from timm_cskd.config.parse import dump_args, parse_args
from timm_cskd.config.paths import CONFIG_DIR, DEMO_CONFIG, config_names, resolve_config
from timm_cskd.config.run_config import RunConfig
from timm_cskd.config.sections import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RuntimeConfig,
)
from timm_cskd.config.timm_args import timm_namespace
from timm_cskd.config.yaml_defaults import load_yaml_defaults
from timm_cskd.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "DEFAULT_VAL_SPLIT",
    "DEMO_CONFIG",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "REFUSED",
    "RunConfig",
    "RuntimeConfig",
    "build_parser",
    "dataset_refusal",
    "config_names",
    "dump_args",
    "load_yaml_defaults",
    "parse_args",
    "refused_settings",
    "resolve_config",
    "timm_namespace",
]
