"""The table: markdown and JSON under --output, rewritten after every row."""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from .common import Env, Row


def header(env: Env) -> list[str]:
    import timm

    args = env.args
    if env.cuda:
        name = torch.cuda.get_device_name(env.device)
        extra = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
        extra = "no CUDA"
    title = "CPU smoke run (not evidence)" if args.smoke else "GPU check"
    return [
        f"## {title}: {name}",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, timm {timm.__version__}, "
        f"{extra}, python {platform.python_version()}, budget {args.budget_s:.0f} s",
        f"{args.model} at {args.img_size} px; checks on {args.check_batch_size} anchors, {args.num_classes} "
        f"classes; throughput: batch {args.batch_size} with grad, bf16 autocast, channels_last, up to "
        f"{args.rounds} interleaved rounds x {args.steps} steps; trainer rows: {args.trainer_batch} anchors + "
        f"{args.trainer_batch} partners per step, {args.trainer_classes} classes x {args.trainer_images_per_class} "
        f"generated JPEGs, fp16 AMP + GradScaler, channels_last, EMA, {args.workers} loader workers",
    ]


def table(rows: list[Row]) -> list[str]:
    lines = ["| row | status | value | detail |", "|---|---|---|---|"]
    for r in rows:
        cells = [r.name, r.status, r.value, r.detail]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


def write_output(env: Env, rows: list[Row], done: bool) -> None:
    if not env.args.output:
        return
    out = Path(env.args.output)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(header(env) + [""] + table(rows)) + "\n"
    if not done:
        text += "\n(incomplete: the run is still going or was interrupted)\n"
    _replace(out / "gpu_check.md", text)
    payload = {
        "device": torch.cuda.get_device_name(env.device) if env.cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": vars(env.args),
        "preflight": env.preflight,
        "complete": done,
        "elapsed_s": env.elapsed(),
        "rows": [asdict(r) for r in rows],
    }
    _replace(out / "gpu_check.json", json.dumps(payload, indent=2, default=str))
    if env.logs:
        _replace(out / "trainer_logs.txt", "\n\n".join(env.logs) + "\n")


def _replace(path: Path, text: str) -> None:
    """Whole or not at all: a run killed mid-write keeps the previous table."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
