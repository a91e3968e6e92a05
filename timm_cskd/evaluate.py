"""Evaluate a checkpoint: top-1/5 error, NLL, ECE, Brier, recall@1, and a reliability diagram.

    python -m timm_cskd.evaluate --checkpoint output/run/model_best.pth.tar --data-dir /imagenet
    torchrun --nproc_per_node=8 -m timm_cskd.evaluate --checkpoint exported/ --data-dir /imagenet

CKPT is a training checkpoint, a plain state_dict (with --model) or an exported ``local-dir`` folder.
Writes ``metrics.json`` (errors, ECE and the confidence gap in percent, as in the paper),
``reliability.png``, ``reliability.json`` (the bins, for ``timm_cskd.compare``), with
--save-predictions ``predictions.npz`` (probs, labels, features) and with --results-file timm
``validate.py``'s results file (its columns and units, then ours; replaced as timm's is, never appended).
With --calib-split it also fits a temperature on that held-out split (Guo et al. 2017) and reports the
evaluated split's NLL, ECE and confidence gap after scaling. Under torchrun each rank evaluates its share
and every image counts exactly once. Evaluation runs in full float32 (TF32 off) unless --amp asks for
bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import resolve_data_config

from timm_cskd.calibration import T_MAX, T_MIN, fit_temperature, temperature_scaled_metrics
from timm_cskd.checkpoint import CheckpointError, load_model
from timm_cskd.data.index import VAL_SPLITS, DataIndexError, ImageIndex
from timm_cskd.data.loader import build_val_prep, build_val_transform, create_val_loader
from timm_cskd.distributed import setup_context
from timm_cskd.errors import ConfigError
from timm_cskd.eval_splits import check_held_out, split_index
from timm_cskd.evaluation import Evaluation, evaluate, recall_at_1
from timm_cskd.flag_checks import check_device
from timm_cskd.invocation import program_name
from timm_cskd.metrics import DEFAULT_ECE_BINS
from timm_cskd.reliability import bins_to_dict, plot_reliability
from timm_cskd.results import FORMATS, evaluated_setup, results_row, write_results

__all__ = ["EvaluateConfig", "Evaluation", "check_args", "evaluate", "main", "recall_at_1", "run"]

_logger = logging.getLogger("timm_cskd.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.evaluate"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="training .pth.tar, plain state_dict, or exported folder"
    )
    parser.add_argument("--data-dir", required=True, help="root holding the split (folder or list file)")
    parser.add_argument("--split", default="val", help="folder or list file under --data-dir")
    parser.add_argument(
        "--calib-split",
        default=None,
        help="held-out folder or list file under --data-dir to fit a temperature on (e.g. calib)",
    )
    parser.add_argument("--model", default=None, help="timm model name (needed for a plain state_dict)")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--save-predictions", action="store_true", help="also write predictions.npz")
    parser.add_argument("--output", default=None, help="default: <checkpoint folder>/eval-<split>")
    parser.add_argument(
        "--results-file",
        default=None,
        metavar="FILENAME",
        help="also write timm validate.py's results file (model, top1, top1_err, top5, top5_err, "
        "param_count, img_size, crop_pct, interpolation, then our metrics); an existing file is "
        "replaced, as timm's validate.py does",
    )
    parser.add_argument(
        "--results-format", default="csv", choices=FORMATS, help="results file format (default: csv)"
    )
    parser.add_argument("--img-size", type=int, default=None, help="override the checkpoint's input size")
    parser.add_argument("--crop-pct", type=float, default=None, help="override the checkpoint's centre crop")
    parser.add_argument(
        "--interpolation", default=None, help="override the checkpoint's resize interpolation"
    )
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("-j", "--workers", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--ece-bins", type=int, default=DEFAULT_ECE_BINS)
    parser.add_argument(
        "--recall-chunk", type=int, default=1024, help="queries per chunk of the recall@1 search"
    )
    return parser


@dataclass(frozen=True)
class EvaluateConfig:
    """An evaluation's settings, one field per flag (named by its destination, with its default), so a
    Python caller gives only what it needs: ``EvaluateConfig(checkpoint, data_dir, split="test")``."""

    checkpoint: str
    data_dir: str
    split: str = "val"
    calib_split: str | None = None
    model: str | None = None
    ema: bool = False
    save_predictions: bool = False
    output: str | None = None
    results_file: str | None = None
    results_format: str = "csv"
    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    batch_size: int = 128
    workers: int = 4
    device: str | None = None
    amp: bool = False
    channels_last: bool = False
    ece_bins: int = DEFAULT_ECE_BINS
    recall_chunk: int = 1024

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> EvaluateConfig:
        return cls(**vars(args))


def _default_output(checkpoint: Path, split: str) -> Path:
    return (checkpoint if checkpoint.is_dir() else checkpoint.resolve().parent) / f"eval-{split}"


def check_args(args: EvaluateConfig) -> None:
    """The values alone, before any model or image is loaded."""
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
        ("--img-size", args.img_size, 1),
        ("--ece-bins", args.ece_bins, 1),
        ("--recall-chunk", args.recall_chunk, 1),
    ):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be >= {low}")
    if args.crop_pct is not None and not args.crop_pct > 0:
        raise ConfigError(f"--crop-pct {args.crop_pct}: must be > 0")
    check_device(args.device)
    if not Path(args.data_dir).is_dir():
        raise DataIndexError(f"--data-dir {args.data_dir} does not exist or is not a folder")
    if not Path(args.checkpoint).exists():
        raise CheckpointError(f"--checkpoint {args.checkpoint}: checkpoint not found")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is an existing file: evaluate writes a folder")
    if args.results_file and Path(args.results_file).is_dir():
        raise ConfigError(f"--results-file {args.results_file} is a folder: it names the file to write")
    if args.results_format not in FORMATS:
        raise ConfigError(f"--results-format {args.results_format}: must be one of {', '.join(FORMATS)}")


def run(args: EvaluateConfig) -> dict:
    """Evaluate ``args``: the metrics (as metrics.json holds them, with the ``output`` folder) on the
    primary rank; the checks of ``check_args`` refuse a value before any model or image is loaded."""
    check_args(args)
    ctx = setup_context(args)
    root, handler = logging.getLogger(), None
    previous_level = root.level
    if not root.handlers:  # the command line: progress on stderr; a caller's own logging is left alone
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if ctx.primary else logging.WARNING)
    try:
        return _run(args, ctx)
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(previous_level)
        if ctx.distributed and dist.is_initialized():  # also when a rank failed: the caller may go on
            dist.destroy_process_group()


def _run(args: EvaluateConfig, ctx) -> dict:
    loaded = load_model(args.checkpoint, args.model, ema=args.ema)
    model = loaded.model.to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    overrides = {"crop_pct": args.crop_pct, "interpolation": args.interpolation}
    if args.img_size is not None:
        overrides["input_size"] = (3, args.img_size, args.img_size)
    saved = dict(loaded.data_config or {})
    saved.update({k: v for k, v in overrides.items() if v is not None})
    # A plain state_dict carries no preprocessing: the model's pretrained_cfg fills what flags leave open.
    data_config = resolve_data_config(saved, model=model)
    names = VAL_SPLITS if args.split == "val" else [args.split]
    source, index = split_index(args.data_dir, args.split, names, loaded.class_names, model.num_classes)
    calib_index = None
    if args.calib_split is not None:
        calib_source, calib_index = split_index(
            args.data_dir, args.calib_split, [args.calib_split], loaded.class_names, model.num_classes
        )
        check_held_out(calib_source, calib_index, source, index)
    # Once the inputs are checked, before the evaluation: hours of it must not end unable to write.
    out = Path(args.output) if args.output else _default_output(Path(args.checkpoint), args.split)
    error = None
    if ctx.primary:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = ConfigError(f"--output {out}: cannot create it ({e.strerror or e})")
        if args.results_file and error is None:
            try:
                Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                error = ConfigError(
                    f"--results-file {args.results_file}: cannot create its folder ({e.strerror or e})"
                )
    ctx.fail_together(error)
    transform = build_val_transform(data_config)
    prep = build_val_prep(data_config, ctx.device, args.channels_last)

    def loader(split: ImageIndex):
        return create_val_loader(
            split,
            transform,
            args.batch_size,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            workers=args.workers,
            prep=prep,
            pin_memory=ctx.device.type == "cuda",
        )

    options = {
        "autocast": (
            (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16))
            if args.amp
            else contextlib.nullcontext
        ),
        "channels_last": args.channels_last,
        "num_bins": args.ece_bins,
        "progress": ctx.primary,
    }
    _logger.info("evaluating %s on %d images of %s", loaded.source, len(index), source)
    result = evaluate(
        model,
        loader(index),
        ctx.device,
        collect=True,
        save_logits=args.save_predictions or calib_index is not None,
        **options,
    )
    calib = None
    if calib_index is not None:
        _logger.info("fitting the temperature on %d images of %s", len(calib_index), calib_source)
        calib = evaluate(model, loader(calib_index), ctx.device, save_logits=True, **options)
    metrics = result.meter.compute()
    if ctx.primary:
        if calib is not None:
            temperature = fit_temperature(calib.logits, calib.labels)
            if temperature in (T_MIN, T_MAX):
                _logger.warning(
                    "the NLL on %s is minimal at the search bound T = %g: every image right with a "
                    "margin (T_MIN) or logits that tell nothing about the labels (T_MAX)",
                    calib_source,
                    temperature,
                )
            metrics["temperature"] = temperature
            metrics.update(
                temperature_scaled_metrics(result.logits, result.labels, temperature, args.ece_bins)
            )
            metrics["calib_split"] = str(calib_source)
            metrics["calib_num_samples"] = len(calib_index)
            _logger.info(
                "temperature %.4f (fitted on %s): NLL %.4f  ECE %.2f%%  conf. gap %+.2f%% after scaling",
                temperature,
                calib_source,
                metrics["nll_ts"],
                metrics["ece_ts"],
                metrics["conf_gap_ts"],
            )
        metrics["recall_at_1"] = recall_at_1(result, args.recall_chunk)
        metrics["ece_bins"] = args.ece_bins
        metrics["checkpoint"] = loaded.source
        metrics["ema"] = args.ema
        architecture = model.pretrained_cfg.get("architecture") or (loaded.train_args or {}).get("model", "")
        metrics["evaluated"] = evaluated_setup(
            model, data_config, architecture, Path(args.data_dir).resolve().name, source.stem
        )
        bins = bins_to_dict(*result.meter.bins())
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "reliability.json").write_text(json.dumps(bins))
        if args.results_file:
            try:
                write_results(args.results_file, results_row(metrics), args.results_format)
            except OSError as e:
                raise ConfigError(
                    f"--results-file {args.results_file}: cannot write it ({e.strerror or e})"
                ) from e
        name = Path(loaded.source).parent.name if Path(loaded.source).is_file() else Path(loaded.source).name
        plot_reliability(bins, out / "reliability.png", title=name + (" (EMA)" if args.ema else ""))
        if args.save_predictions:
            np.savez_compressed(
                out / "predictions.npz",
                probs=torch.softmax(result.logits, dim=1).cpu().numpy(),
                labels=result.labels.cpu().numpy(),
                features=result.features.cpu().numpy(),
            )
        _logger.info(
            "top-1 err %.2f%%  top-5 err %.2f%%  NLL %.4f  ECE %.2f%%  Brier %.4f  R@1 %.2f%%  (%d images) -> %s",
            metrics["top1_err"],
            metrics["top5_err"],
            metrics["nll"],
            metrics["ece"],
            metrics["brier"],
            metrics["recall_at_1"],
            metrics["num_samples"],
            out,
        )
        metrics["output"] = str(out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(EvaluateConfig.from_namespace(args))
    except (CheckpointError, DataIndexError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
