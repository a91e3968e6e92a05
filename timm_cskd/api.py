"""The Python API: configure, train, evaluate and export from a notebook or a script, without sys.argv.

    from timm_cskd import api

    config = api.train_config("demo", epochs=1, model="test_resnet", output="runs")
    trained = api.train(config)                    # .metrics, .folder, .checkpoint
    metrics = api.evaluate(trained.checkpoint, data_dir=trained.data_dir)
    folder = api.export(trained.checkpoint, "exported")

A training configuration is a packaged config's name or a YAML path with keyword overrides keyed by
flag destination (``batch_size=32`` is ``--batch-size 32``); the overrides pass the checks a YAML value
passes (the key is a flag, the value has its flag's type and choices) and lie above the YAML, as the
command line does. Every refusal is an exception (``ConfigError``, ``CheckpointError``,
``DataIndexError``), raised before any folder is created; the command-line tools are these same
functions behind ``main(argv)``, which print the refusal and exit 2.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from timm_cskd import checkpoint as ckpt
from timm_cskd import evaluate as evaluate_tool
from timm_cskd import export as export_tool
from timm_cskd import train as train_tool
from timm_cskd.config import RunConfig, build_parser, load_yaml_defaults, parse_args, resolve_config
from timm_cskd.config.legacy import yield_method_to_command_line
from timm_cskd.config.yaml_defaults import check_values
from timm_cskd.data.demo import demo_data_dir
from timm_cskd.experiment import resolve_run

__all__ = ["Trained", "evaluate", "export", "train", "train_config", "train_config_from_argv"]


def train_config(config: str | os.PathLike | None = None, /, **overrides) -> RunConfig:
    """The training configuration of ``config`` (a packaged config's name or a YAML file; None: the flag
    defaults) with ``overrides`` (flag destinations) above it, checked as the command line checks it."""
    parser = build_parser()
    path = resolve_config(config) if config is not None else None
    defaults = load_yaml_defaults(path, parser) if path is not None else {}
    given = check_values(overrides, parser, "train_config")
    # The keywords are this configuration's command line: they take the method over from the YAML.
    yield_method_to_command_line(defaults, argparse.Namespace(**{**vars(parser.parse_args([])), **given}))
    parser.set_defaults(**{**defaults, **given})
    args = parser.parse_args([])
    args.config = str(path) if path is not None else None
    config = RunConfig.from_namespace(args)
    resolve_run(config)  # a value the trainer refuses is refused here, not when train() starts
    return config


def train_config_from_argv(argv: list[str]) -> RunConfig:
    """The training configuration of a command line (``["-c", "demo", "--epochs", "1"]``), as the
    trainer parses it; argparse's refusals (an unknown flag, a bad choice) exit as they do there."""
    config = RunConfig.from_namespace(parse_args(list(argv)))
    resolve_run(config)
    return config


@dataclass(frozen=True)
class Trained:
    """A finished training run: its final validation ``metrics`` (empty on the ranks other than 0), its
    experiment ``folder``, the ``checkpoint`` to evaluate or export (the best one, else the last) and the
    ``data_dir`` it trained on (the demo dataset's folder when the configuration names none)."""

    metrics: dict[str, float]
    folder: Path
    checkpoint: Path
    data_dir: Path


def train(config: RunConfig) -> Trained:
    """Train ``config`` (``train_config``); the run's metrics, folder and checkpoint."""
    metrics, folder = train_tool.fit(config)
    best = folder / ckpt.BEST
    data = config.data
    data_dir = Path(data.data_dir or data.data) if (data.data_dir or data.data) else demo_data_dir()
    return Trained(metrics, folder, best if best.is_file() else folder / ckpt.LAST, data_dir)


def evaluate(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, **options) -> dict:
    """Evaluate ``checkpoint`` on ``data_dir``'s ``split`` (default val); ``options`` are
    ``EvaluateConfig``'s fields (the evaluate command's flags). The metrics, as metrics.json holds them,
    with the ``output`` folder written."""
    config = evaluate_tool.EvaluateConfig(str(checkpoint), str(data_dir), **options)
    return evaluate_tool.run(config)


def export(checkpoint: str | os.PathLike, output: str | os.PathLike, **options) -> Path:
    """Export ``checkpoint`` as the folder ``output`` that ``timm.create_model('local-dir:...')`` loads;
    ``options`` are ``ExportConfig``'s fields (the export command's flags). The folder."""
    return export_tool.run(export_tool.ExportConfig(str(checkpoint), str(output), **options))
