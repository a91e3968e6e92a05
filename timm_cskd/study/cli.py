"""Studies: the paper's tables for your data. A grid of datasets x methods x seeds (plus hyper-parameter
sweeps), each cell an ordinary ``timm-cskd train`` run (``python -m timm_cskd.train``) evaluated by
``timm_cskd.evaluate``.

    python -m timm_cskd.study -c configs/demo.yaml --data-dir data/fmnist100 --methods ce cskd \\
        --seeds 0 1 2 --output output/studies/fmnist -- --epochs 40
    python -m timm_cskd.study --grid configs/study_fashion_mnist.yaml [--dry-run] [--figures]

Everything after ``--`` goes to every trainer run. A ``--methods`` entry is a method name with optional
hyper-parameters, ``cskd:temperature=1,lambda=2``; ``--sweep cskd temperature=1,4 lambda=1,2,3,4`` adds
one row per combination. A ``--grid`` YAML file holds the same (flags override its entries):

    base_config: demo                       # a packaged config's name, or a path relative to the current folder
    output: output/studies/fmnist
    datasets: {fmnist100: data/fmnist100}   # name: data dir (or a list of dirs, named by their folder)
    seeds: [0, 1, 2]
    methods: [ce, {name: cskd, label: CS-KD, kwargs: {temperature: 4, lambda: 1}}]
    sweep: {method: cskd, temperature: [1, 4], lambda: [1, 2, 3, 4]}   # or a list of such mappings
    trainer_args: [--epochs, 40]
    eval_args: [-j, 2]                      # to every timm_cskd.evaluate run
    calib_split: calib                      # temperature scaling where the dataset has this split
    nproc_per_node: 1                       # > 1: the trainer runs under torchrun (--standalone)
    eval_checkpoint: last                   # or best (model_best.pth.tar)
    baseline: CE                            # the row differences are taken against (default: the first)

Each cell lives in ``<output>/<dataset>/<label>/seed<k>/``: ``cell.json`` (its settings and status),
``trainer.yaml`` (the base config without the keys the study sets per cell), ``train/`` (the trainer's
experiment folder), ``eval/`` (``metrics.json``, ``reliability.json``, ``predictions.npz``) and the logs
``train.log`` / ``eval.log``. A finished cell is skipped, an interrupted one resumes (``--resume auto``), one
whose settings changed is refused unless ``--overwrite``, a failed one is reported and the others go on.
The study writes ``study.json`` (for ``timm_cskd.figures``), ``study.md`` (the paper's tables, mean ±
sample std over seeds; differences from the baseline with Welch's t; the calibration regime in words, as
``timm_cskd.study_report`` writes them from a study folder), ``study.csv`` (one row per run and metric),
``results.csv`` (timm validate.py's results columns, one row per run) and ``reliability_<dataset>.png``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from timm_cskd.errors import ConfigError
from timm_cskd.invocation import program_name
from timm_cskd.study.errors import StudyError
from timm_cskd.study.plan import CHECKPOINTS, load_grid, plan_study
from timm_cskd.study.rows import literal
from timm_cskd.study.runner import print_plan, run_study

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.study"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--grid", default=None, help="YAML file describing the study; the flags below override it"
    )
    parser.add_argument("-c", "--config", default=None, help="base trainer config (YAML) of every cell")
    parser.add_argument("--data-dir", nargs="+", default=None, metavar="[NAME=]DIR", help="datasets")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD[:KEY=VALUE,...]")
    parser.add_argument(
        "--sweep",
        nargs="+",
        action="append",
        default=None,
        metavar="METHOD KEY=V1,V2",
        help="rows for every combination, e.g. --sweep cskd temperature=1,4 lambda=1,2,3,4 (repeatable)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--output", default=None, help="the study folder")
    parser.add_argument(
        "--calib-split",
        default=None,
        help="fit a temperature on this split where a dataset has it (e.g. calib)",
    )
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, help="> 1: train each cell under torchrun"
    )
    parser.add_argument("--eval-args", default=None, help="quoted arguments for every timm_cskd.evaluate run")
    parser.add_argument("--eval-checkpoint", choices=tuple(CHECKPOINTS), default=None, help="default: last")
    parser.add_argument(
        "--baseline", default=None, help="the row (label) differences are taken against; default: the first"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rerun cells whose settings changed, from scratch"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the cells and their commands; run nothing"
    )
    parser.add_argument(
        "--figures", action="store_true", help="also draw timm_cskd.figures into <output>/figures"
    )
    return parser


def _cli_sweep(tokens: list[str]) -> dict:
    sweep = {"method": tokens[0]}
    for token in tokens[1:]:
        key, sep, values = token.partition("=")
        if not sep:
            raise StudyError(f"--sweep {shlex.join(tokens)}: expected KEY=V1,V2,..., got '{token}'")
        sweep[key] = values if key == "label" else [literal(v) for v in values.split(",")]
    return sweep


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" belongs to the trainer, never to this parser.
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    try:
        grid = load_grid(args.grid) if args.grid else {}
        overrides = {
            "base_config": args.config,
            "datasets": args.data_dir,
            "methods": args.methods,
            "sweep": [_cli_sweep(t) for t in args.sweep] if args.sweep else None,
            "seeds": args.seeds,
            "output": args.output,
            "calib_split": args.calib_split,
            "nproc_per_node": args.nproc_per_node,
            "eval_args": args.eval_args,
            "eval_checkpoint": args.eval_checkpoint,
            "baseline": args.baseline,
        }
        grid.update({k: v for k, v in overrides.items() if v is not None})
        trainer_args = grid.pop("trainer_args", None) or []
        trainer_args = shlex.split(trainer_args) if isinstance(trainer_args, str) else list(trainer_args)
        if "datasets" not in grid:
            raise StudyError("no datasets: pass --data-dir DIR or list datasets in the grid file")
        study = plan_study(
            grid.pop("output", None),
            grid.pop("datasets"),
            trainer_args=trainer_args + argv[split + 1 :],
            **grid,
        )
        if args.dry_run:
            print_plan(study, overwrite=args.overwrite)
            return 0
        return run_study(study, overwrite=args.overwrite, figures=args.figures).exit_code
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
