"""The trainer's flag table: timm train.py's flags with timm's names, defaults and groups, plus this
trainer's own, each declared once; a timm flag it cannot honour is declared refused beside its reason."""

from __future__ import annotations

import argparse

from timm_cskd.config.flags_input import add_input_flags
from timm_cskd.config.flags_optimization import add_optimization_flags
from timm_cskd.config.flags_run import add_run_flags
from timm_cskd.config.refusal import refusals
from timm_cskd.invocation import program_name

__all__ = ["FOLDER_DATASETS", "REFUSED", "build_parser", "dataset_refusal", "refused_settings"]

# timm's names for the folder dataset this trainer reads.
FOLDER_DATASETS = ("", "folder", "imagefolder")


def build_parser() -> argparse.ArgumentParser:
    """timm train.py's flags with timm's names, defaults and groups, plus this trainer's own."""
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.train"),
        description="Train timm models on ImageNet-style folders with Class-wise Self-Knowledge Distillation. "
        "Accepts timm train.py's flags and args.yaml; flags it cannot honour stop the run when set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help="YAML file of defaults (a timm args.yaml works) or a packaged config's name "
        "(resnet50_cskd, demo, ...); flags override it",
    )
    add_input_flags(parser)
    add_optimization_flags(parser)
    add_run_flags(parser)
    return parser


# The refused flags' destinations: (timm's default, why); read from the table, so each is written once.
REFUSED = refusals(build_parser())


def dataset_refusal(dataset) -> str | None:
    """Why --dataset cannot be honoured (a timm dataset other than folders and wds/ shards), or None."""
    if dataset in FOLDER_DATASETS or str(dataset).startswith("wds/"):
        return None
    return f"--dataset {dataset!r}: {REFUSED['dataset'][1]}"


def refused_settings(args: argparse.Namespace) -> list[str]:
    """The timm flags set to values this trainer cannot honour, each with its reason."""
    found = []
    for dest, (default, reason) in REFUSED.items():
        value = getattr(args, dest)
        if dest == "dataset":
            refusal = dataset_refusal(value)
            found += [refusal] if refusal else []
            continue
        if isinstance(value, tuple):
            value = list(value)
        if value != default:
            found.append(f"--{dest.replace('_', '-')} {value!r}: {reason}")
    return found
