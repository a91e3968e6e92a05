"""Command line and YAML configuration, following timm's train.py conventions.

``-c/--config FILE.yaml`` supplies defaults, flags on the command line override them, and the resolved
configuration is written to ``args.yaml`` in the experiment folder. ``-c NAME`` names a packaged recipe
(``paths``). The flags are declared once, refusals beside them (``flag_table`` and its ``flags_*``
sections); a YAML key that is not a flag is an error naming the closest valid key (``yaml_defaults``).
"""

from timm_cskd.config.flag_table import REFUSED, build_parser, refused_settings
from timm_cskd.config.flags_input import DEFAULT_VAL_SPLIT
from timm_cskd.config.parse import dump_args, parse_args
from timm_cskd.config.paths import CONFIG_DIR, DEMO_CONFIG, config_names, resolve_config
from timm_cskd.config.yaml_defaults import load_yaml_defaults
from timm_cskd.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "DEFAULT_VAL_SPLIT",
    "DEMO_CONFIG",
    "REFUSED",
    "build_parser",
    "config_names",
    "dump_args",
    "load_yaml_defaults",
    "parse_args",
    "refused_settings",
    "resolve_config",
]
