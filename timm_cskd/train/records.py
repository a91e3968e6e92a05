"""What a run records on rank 0: each epoch's row in ``summary.csv`` (timm's layout: ``train_loss``,
``train_ce``, ``train_reg`` and the method's own terms as ``train_<term>``, the evaluation columns, ``lr``)
and in W&B/TensorBoard, ``status.json``, the best and the kept (``--checkpoint-hist``) checkpoints, and the
final table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from timm_cskd import checkpoint as ckpt
from timm_cskd.atomic import write_atomic

__all__ = [
    "copy_epoch_checkpoints",
    "eval_value",
    "is_better",
    "keep_checkpoint",
    "print_final_table",
    "record_epoch",
    "write_status",
]

_logger = logging.getLogger("timm_cskd.train")

EVAL_COLUMNS = ("nll", "top1_err", "top5_err", "ece")


def append_summary_row(path: Path, epoch: int, train_metrics: dict, eval_row: dict, lr: float) -> None:
    """timm's ``update_summary`` row (epoch, train_*, eval_*, lr), written by name under the file's header.

    timm writes each row in its own key order under whatever header the file has, so a run resumed with
    other columns (an earlier release's summary.csv without the method's terms, a teacher added on
    resume) would shift every later value into the wrong column. A row with new columns rewrites the file
    once with them added at the end (earlier rows empty there)."""
    row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_metrics.items()}}
    row |= {f"eval_{k}": v for k, v in eval_row.items()}
    row["lr"] = lr
    header, rows = [], []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), list(reader.fieldnames or [])
    added = [k for k in row if k not in header]
    if added:
        if rows:
            _logger.info("summary.csv: columns %s added (earlier rows leave them empty)", ", ".join(added))
        header += added
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(path, buffer.getvalue())
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, restval="").writerow(row)


def eval_value(metrics: dict, eval_metric: str, ema: bool) -> float:
    """timm's --eval-metric as timm's checkpoint ``metric`` holds it: top-1/top-5 accuracy in percent
    (higher is better) or the validation loss (lower is better); the EMA's when there is one (timm)."""
    prefix = "ema_" if ema else ""
    if eval_metric == "loss":
        return metrics[f"{prefix}nll"]
    return 100.0 - metrics[f"{prefix}{eval_metric}_err"]


def is_better(value: float, than: float, eval_metric: str) -> bool:
    return value < than if eval_metric == "loss" else value > than


def keep_checkpoint(
    kept: list[list], value: float | None, epoch: int, keep: int, eval_metric: str
) -> tuple[list[list], list[int]]:
    """--checkpoint-hist: the kept (eval metric, epoch) list with this epoch if it joins the best ``keep``,
    and the epochs it displaces."""
    if value is None or keep <= 0:
        return kept, []
    ranked = sorted(kept + [[value, epoch]], key=lambda item: item[0], reverse=eval_metric != "loss")
    return ranked[:keep], [e for _, e in ranked[keep:]]


def record_epoch(
    out_dir: Path,
    scalars,
    epoch: int,
    num_epochs: int,
    train_metrics: dict,
    metrics: dict,
    lr: float,
    *,
    ema: bool,
    validates: bool,
) -> Exception | None:
    """Rank 0: the epoch's row in summary.csv (and wandb/TensorBoard through ``scalars``), and its log line."""
    # The same columns every epoch (empty when not validated): the CSV header is the first row's.
    prefixes = ("", "ema_") if ema else ("",)
    keys = [f"{p}{k}" for p in prefixes for k in EVAL_COLUMNS]
    eval_row = {k: metrics.get(k, "") for k in keys} if validates else {}
    if metrics:
        _logger.info(
            "epoch %d/%d validation: top-1 err %.2f%%  top-5 err %.2f%%  NLL %.4f  ECE %.2f%%  (%d images)",
            epoch + 1,
            num_epochs,
            metrics["top1_err"],
            metrics["top5_err"],
            metrics["nll"],
            metrics["ece"],
            metrics["num_samples"],
        )
    try:
        append_summary_row(out_dir / "summary.csv", epoch, train_metrics, eval_row, lr)
        scalars.log(epoch, train_metrics, {k: v for k, v in eval_row.items() if v != ""}, lr)
    except OSError as e:
        return ckpt.CheckpointError(f"cannot write {out_dir / 'summary.csv'}: {e}")
    return None


def copy_epoch_checkpoints(
    out_dir: Path, epoch: int, is_best: bool, kept: list[list], dropped: list[int]
) -> Exception | None:
    """Rank 0: last.pth.tar copied to model_best and to this epoch's kept checkpoint; displaced ones go."""
    last = out_dir / ckpt.LAST
    targets = [out_dir / ckpt.BEST] if is_best else []
    if any(e == epoch for _, e in kept):
        targets.append(out_dir / f"checkpoint-{epoch}.pth.tar")
    try:
        for target in targets:
            ckpt.copy_checkpoint(last, target)
        for old in dropped:
            (out_dir / f"checkpoint-{old}.pth.tar").unlink(missing_ok=True)
    except OSError as e:
        return ckpt.CheckpointError(f"cannot copy {last}: {e}")
    return None


def write_status(out_dir: Path, epochs_planned: int, epochs_done: int) -> Exception | None:
    """Rank 0: ``status.json``, the epochs this run plans (the schedule's count: cooldown and a warmup
    prefix included) and has finished, so a caller can tell a finished run from a stopped one."""
    status = {
        "epochs_planned": epochs_planned,
        "epochs_done": epochs_done,
        "finished": epochs_done >= epochs_planned,
    }
    try:
        write_atomic(out_dir / "status.json", json.dumps(status))
    except OSError as e:
        return ckpt.CheckpointError(f"cannot write {out_dir / 'status.json'}: {e}")
    return None


def print_final_table(trainer, metrics: dict[str, float]) -> None:
    """The final validation metrics of ``trainer`` (a finished ``Trainer``) as a table on stdout."""
    rows = [
        ("top-1 error (%)", f"{metrics['top1_err']:.2f}"),
        ("top-5 error (%)", f"{metrics['top5_err']:.2f}"),
        ("NLL", f"{metrics['nll']:.4f}"),
        (f"ECE, {trainer.config.output.ece_bins} bins (%)", f"{metrics['ece']:.2f}"),
        ("Brier", f"{metrics['brier']:.4f}"),
        ("validation images", f"{metrics['num_samples']}"),
    ]
    width = max(len(name) for name, _ in rows)
    config = trainer.config
    print(f"\nFinal metrics ({config.model.model}, method '{config.method.method}'):")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>8}")
    print(
        f"Outputs in {trainer.out_dir.resolve()}: summary.csv, args.yaml, log.txt, {ckpt.LAST}, {ckpt.BEST}"
    )
