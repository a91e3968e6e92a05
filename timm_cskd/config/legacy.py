"""The first release's method flags (``--cskd-mode``, ``--cskd-temperature``, ``--cskd-lambda``) and how
they meet ``--method``/``--method-kwargs`` when a YAML config and the command line spell them differently.

They are flags, so they live with the flag table; the method registry reads the same tables to resolve them.
"""

from __future__ import annotations

import argparse

__all__ = ["LEGACY_KWARGS", "LEGACY_MODES", "yield_method_to_command_line"]

# The first release's --cskd-mode values, as methods.
LEGACY_MODES = {"anchor": "cskd", "paired": "cskd-paired", "off": "ce"}
LEGACY_KWARGS = {"cskd_temperature": "temperature", "cskd_lambda": "lambda"}


def yield_method_to_command_line(defaults: dict, cli: argparse.Namespace) -> None:
    """The command line overrides the YAML's method, whichever of the two spellings each uses
    (``--method``/``--method-kwargs`` or the older ``--cskd-*``); the YAML's hyper-parameters go with
    its method when the command line names another."""
    cli_method = cli.method or LEGACY_MODES.get(cli.cskd_mode)
    if cli_method is not None:
        yaml_method = defaults.pop("method", None) or LEGACY_MODES.get(defaults.pop("cskd_mode", None))
        if yaml_method != cli_method:
            defaults.pop("method_kwargs", None)
            for flag in LEGACY_KWARGS:
                defaults.pop(flag, None)
    yaml_kwargs = dict(defaults.get("method_kwargs") or {})
    for flag, key in LEGACY_KWARGS.items():
        if getattr(cli, flag) is not None:
            yaml_kwargs.pop(key, None)
        if key in (cli.method_kwargs or {}):
            defaults.pop(flag, None)
    if "method_kwargs" in defaults:
        defaults["method_kwargs"] = yaml_kwargs
