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
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import resolve_data_config

from timm_cskd.calibration import T_MAX, T_MIN, fit_temperature, temperature_scaled_metrics
from timm_cskd.checkpoint import CheckpointError, load_model
from timm_cskd.data.index import VAL_SPLITS, DataIndexError, ImageIndex, build_index, find_split
from timm_cskd.data.loader import build_val_prep, build_val_transform, create_val_loader
from timm_cskd.data.shard_index import MANIFEST, is_shard_folder
from timm_cskd.distributed import setup_context
from timm_cskd.errors import ConfigError
from timm_cskd.flag_checks import check_device
from timm_cskd.metrics import DEFAULT_ECE_BINS, ClassificationMeter, recall_at_k
from timm_cskd.reliability import bins_to_dict, plot_reliability
from timm_cskd.results import FORMATS, evaluated_setup, results_row, write_results

__all__ = ["Evaluation", "evaluate", "main", "recall_at_1"]

_logger = logging.getLogger("timm_cskd.evaluate")


@dataclass
class Evaluation:
    meter: ClassificationMeter
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def _forward(model, images, collect: bool):
    if not collect:
        return model(images), None
    features = model.forward_features(images)
    return model.forward_head(features), model.forward_head(features, pre_logits=True)


def _gather_to_primary(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor | None:
    """On rank 0, the ranks' shards in dataset order (rank r held images r, r + W, r + 2W, ...); None on
    the other ranks, which never use them (an all-gather would hold W copies of the features)."""
    if world_size == 1:
        return local
    longest = -(-total // world_size)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: len(local)] = local
    primary = dist.get_rank() == 0
    parts = [torch.empty_like(padded) for _ in range(world_size)] if primary else None
    dist.gather(padded, parts, dst=0)
    if not primary:
        return None
    out = local.new_empty((total, *local.shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::world_size] = part[: len(range(rank, total, world_size))]
    return out


def _precision_settings() -> list:
    """torch >= 2.9's per-backend float32 precision settings ("ieee", "tf32", "bf16", or "none": as the
    enclosing backend), where this torch has them."""
    found = []
    for path in ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"):
        holder = torch.backends
        for part in path.split("."):
            holder = getattr(holder, part, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            found.append(holder)
    return found


def _readable(getter):
    # torch's legacy getters raise once the per-backend API has left the backends disagreeing.
    try:
        return getter()
    except RuntimeError:
        return None


@contextlib.contextmanager
def full_fp32():
    """Float32 matmuls and convolutions in IEEE float32 (no TF32, no bf16) inside; the caller's
    settings restored after, also on errors.

    ``setup_context`` turns TF32 on for training speed; metrics compared across runs, GPUs and papers
    must not carry its 10-bit mantissa.
    """
    settings = _precision_settings()
    saved = [holder.fp32_precision for holder in settings]
    saved_matmul = _readable(torch.get_float32_matmul_precision)
    saved_cudnn = _readable(lambda: torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        for holder in settings:
            holder.fp32_precision = "ieee"
        yield
    finally:
        # The legacy setters also write the per-backend settings, so those are restored last.
        if saved_matmul is not None:
            torch.set_float32_matmul_precision(saved_matmul)
        if saved_cudnn is not None:
            torch.backends.cudnn.allow_tf32 = saved_cudnn
        for holder, value in zip(settings, saved):
            holder.fp32_precision = value


def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    *,
    autocast=contextlib.nullcontext,
    channels_last: bool = False,
    num_bins: int = DEFAULT_ECE_BINS,
    collect: bool = False,
    save_logits: bool = False,
    progress: bool = False,
) -> Evaluation:
    """Run ``model`` over ``loader`` (this rank's shard) in full float32 and all-reduce the metric sums.

    ``collect`` also gathers penultimate pooled features (for recall@k), ``save_logits`` the float32
    logits; either gathers the labels, all in dataset order on rank 0 (None on the other ranks).
    ``progress`` logs every tenth of the batches.
    """
    meter = ClassificationMeter(num_bins=num_bins, device=device)
    features, logits_seen, labels = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad(), full_fp32():
        report_every = max(len(loader) // 10, 1)
        for step, (images, target) in enumerate(loader, 1):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits, pooled = _forward(model, images, collect)
            meter.update(logits, target)
            if collect:
                features.append(pooled.float())
            if save_logits:
                logits_seen.append(logits.float())
            if collect or save_logits:
                labels.append(target)
            if progress and (step % report_every == 0 or step == len(loader)):
                _logger.info("evaluated %d/%d batches", step, len(loader))
    model.train(was_training)
    meter.all_reduce()
    result = Evaluation(meter)
    if collect or save_logits:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        total = int(meter.sums[0].item())
        result.labels = _gather_to_primary(torch.cat(labels), total, world)
        if collect:
            result.features = _gather_to_primary(torch.cat(features), total, world)
        if save_logits:
            result.logits = _gather_to_primary(torch.cat(logits_seen), total, world)
    return result


def recall_at_1(result: Evaluation, chunk_size: int = 1024) -> float:
    """recall@1 (percent) of an evaluation's gathered features, on rank 0, in full float32 like every
    other metric: its shortlist's matrix products would otherwise run in the TF32 training turns on."""
    with full_fp32():
        return recall_at_k(result.features, result.labels, k=1, chunk_size=chunk_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m timm_cskd.evaluate",
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


def _default_output(checkpoint: Path, split: str) -> Path:
    return (checkpoint if checkpoint.is_dir() else checkpoint.resolve().parent) / f"eval-{split}"


def _split_index(data_dir, name: str, names: list[str], class_names, num_classes: int):
    """(source, index) of a split: a folder or list file under ``data_dir``, checked against the model."""
    if is_shard_folder(data_dir):
        raise DataIndexError(
            f"{data_dir} is a tar shard folder ({MANIFEST}): evaluate reads ImageFolders and list files; "
            "point --data-dir at the folder the shards were written from"
        )
    source = find_split(data_dir, names)
    if source is None:
        raise DataIndexError(f"no '{name}' folder or list file in {data_dir}")
    # A list file need not name every class; its labels index the model's outputs.
    listed = source.is_file()
    index = build_index(
        source, classes=None if listed else class_names, num_classes=num_classes if listed else None
    )
    if index.num_classes != num_classes:
        raise DataIndexError(f"{source} has {index.num_classes} classes, the model predicts {num_classes}")
    return source, index


def _image_files(index: ImageIndex) -> set[str]:
    """The index's files with their folders' symlinks resolved (once per folder, not once per image)."""
    folders, files = {}, set()
    for i in range(len(index)):
        folder, name = os.path.split(index.full_path(i))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        files.add(os.path.join(folders[folder], name))
    return files


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _copies(files: set[str], others: set[str]) -> set[str]:
    """The ``files`` whose bytes equal one of ``others``': only files of a size both sides have are
    hashed, so disjoint splits cost one stat per image."""
    sizes: dict[int, list[str]] = {}
    for path in others:
        sizes.setdefault(os.path.getsize(path), []).append(path)
    candidates = [p for p in files if os.path.getsize(p) in sizes]
    sized = {os.path.getsize(p) for p in candidates}
    digests = {_file_digest(o) for size in sized for o in sizes[size]}
    return {p for p in candidates if _file_digest(p) in digests}


def _check_held_out(calib_source: Path, calib: ImageIndex, source: Path, evaluated: ImageIndex) -> None:
    """A temperature fitted on the images it is then judged on flatters NLL and ECE: refuse any overlap
    (the same split, a list file naming the evaluated folder's images, or copies of them)."""
    calib_files, evaluated_files = _image_files(calib), _image_files(evaluated)
    shared = calib_files & evaluated_files
    how = "shares"
    if not shared:
        shared, how = _copies(calib_files, evaluated_files), "holds byte-identical copies of"
    if shared:
        raise DataIndexError(
            f"--calib-split {calib_source} {how} {len(shared)} of its {len(calib)} images with the evaluated "
            f"split {source} (e.g. {min(shared)}): the temperature must be fitted on held-out images"
        )


def check_args(args) -> None:
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


def run(args) -> dict:
    check_args(args)
    ctx = setup_context(args)
    logging.basicConfig(level=logging.INFO if ctx.primary else logging.WARNING, format="%(message)s")
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
    source, index = _split_index(args.data_dir, args.split, names, loaded.class_names, model.num_classes)
    calib_index = None
    if args.calib_split is not None:
        calib_source, calib_index = _split_index(
            args.data_dir, args.calib_split, [args.calib_split], loaded.class_names, model.num_classes
        )
        _check_held_out(calib_source, calib_index, source, index)
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
    if ctx.distributed:
        dist.destroy_process_group()
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, DataIndexError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
