"""The command line: parse, preflight, run the rows within the budget, write the table."""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import __doc__ as DESCRIPTION
from .preflight import format_preflight, run_preflight

GPU_DEFAULTS = dict(
    device="cuda", model="resnet50", img_size=224, batch_size=256, check_batch_size=32, num_classes=1000,
    steps=10, rounds=3, warmup=3, loss_iters=50, budget_s=330.0, trainer_batch=32, trainer_classes=16,
    trainer_images_per_class=64, workers=min(6, max((os.cpu_count() or 2) - 2, 1)), log_interval=8,
    demand_steps=10, min_free_gib=24.0, min_disk_gib=4.0,
)  # fmt: skip
SMOKE_DEFAULTS = dict(
    device="cpu", model="test_resnet", img_size=32, batch_size=8, check_batch_size=8, num_classes=10,
    steps=2, rounds=2, warmup=1, loss_iters=3, budget_s=900.0, trainer_batch=4, trainer_classes=4,
    trainer_images_per_class=16, workers=2, log_interval=4, demand_steps=3, min_free_gib=0.0,
    min_disk_gib=0.5,
)  # fmt: skip
HELP = {
    "device": "cuda, or cpu with --smoke",
    "model": "timm model of the loss, method and trainer rows",
    "img_size": "input size",
    "batch_size": "throughput and compile rows: images with grad per step",
    "check_batch_size": "anchors per correctness step",
    "num_classes": "classes of the loss and method rows",
    "steps": "timed steps per throughput variant per round",
    "rounds": "interleaved throughput rounds (fewer when the budget runs short)",
    "warmup": "untimed steps per throughput variant",
    "loss_iters": "loss fwd+bwd per round",
    "budget_s": "the whole run's seconds: a row whose estimate no longer fits is SKIPped",
    "trainer_batch": "trainer rows: anchors per step (as many partners load with them)",
    "trainer_classes": "classes of the generated ImageFolder",
    "trainer_images_per_class": "training JPEGs per class (4 more per class for validation)",
    "workers": "loader workers of the trainer rows (half each in the two-rank row)",
    "log_interval": "trainer --log-interval (syncs at log steps are expected and counted apart)",
    "demand_steps": "timed trainer steps for the GPU step's demand",
    "min_free_gib": "preflight: free GPU memory needed",
    "min_disk_gib": "preflight: free disk needed for the generated data and checkpoints",
}
# Spelled out, not imported: nothing here may import torch before the preflight has looked for it.
THROUGHPUT = [f"train {k} {m}" for k in ("eager", "compiled") for m in ("CE", "CS-KD anchor", "CS-KD paired")]
# (row names, function module:name, estimated seconds on an H100, at --smoke). Cheap correctness first,
# then the trainer (the evidence this machine exists for), then the compile and throughput rows.
ROWS = [
    (["bf16 CS-KD steps"], "checks:check_bf16_steps", 8, 10),
    (["fp16 GradScaler"], "checks:check_fp16_scaler", 8, 10),
    (["channels_last"], "checks:check_channels_last", 6, 5),
    (["DDP 1-process"], "checks:check_ddp", 8, 5),
    (["evaluate"], "checks:check_evaluate", 5, 5),
    (["trainer SIGTERM + resume"], "trainer_rows:row_sigterm_resume", 80, 60),
    (["trainer host syncs", "loader vs GPU step"], "trainer_rows:rows_syncs_and_loader", 45, 30),
    (["trainer 2 ranks"], "trainer_rows:row_two_ranks", 50, 40),
    (["torch.compile"], "checks:check_compile", 75, 90),
    (THROUGHPUT, "measure:measure_throughput", 60, 30),
    (["loss 256x1000 bf16"], "measure:loss_256", 5, 5),
    (["loss 1024x1000 bf16"], "measure:loss_1024", 5, 5),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, toy sizes: every row (the test suite's run)"
    )
    parser.add_argument("--output", help="folder for gpu_check.md, gpu_check.json, trainer_logs.txt")
    parser.add_argument("--preflight-only", action="store_true", help="check the environment, run no row")
    parser.add_argument("--rows", help="comma-separated name fragments: run only the rows they match")
    parser.add_argument("--work-dir", help="generated data and trainer runs (default: a temporary folder)")
    for key, value in GPU_DEFAULTS.items():
        kind = type(value) if key != "device" else str
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=kind,
            help=f"{HELP[key]} (default {value}; {SMOKE_DEFAULTS[key]} with --smoke)",
        )
    args = parser.parse_args(argv)
    for key, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size % 2 or args.check_batch_size % 2:
        parser.error("--batch-size and --check-batch-size must be even (paired mode trains batch/2 pairs)")
    return args


def _selected_rows(args) -> list:
    """ROWS with their names filled in, only those that ``--rows`` matches."""
    wanted = [w.strip() for w in args.rows.split(",")] if args.rows else None
    selected = []
    for names, target, gpu_s, smoke_s in ROWS:
        if not wanted or any(w in n for w in wanted for n in names):
            selected.append((names, target, smoke_s if args.smoke else gpu_s))
    return selected


def _resolve(target: str):
    import importlib

    module, name = target.split(":")
    module = importlib.import_module(f"{__package__}.{module}")
    return getattr(module, name)


def _run_rows(env, names, target, estimate):
    from .common import Row, Skip, error_text

    if estimate > env.left():
        why = f"budget: needs ~{estimate:.0f} s, {max(env.left(), 0):.0f} s of --budget-s {env.args.budget_s:.0f} left"
        return [Row(n, "check", "SKIP", detail=why) for n in names]
    start = time.perf_counter()
    try:
        rows = _resolve(target)(env)
        rows = rows if isinstance(rows, list) else [rows]
    except Skip as e:
        rows = [Row(n, "check", "SKIP", detail=str(e)) for n in names]
    except Exception as e:
        traceback.print_exc()
        rows = [Row(n, "check", "FAIL", detail=error_text(e)) for n in names]
    for row in rows:
        row.seconds = time.perf_counter() - start
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    selected = [names for names, *_ in _selected_rows(args)]
    compiles = any("compile" in n for names in selected for n in names)
    preflight = run_preflight(args.device, work_root, args.min_free_gib, args.min_disk_gib, compiles)
    print("\n".join(format_preflight(preflight)), file=sys.stderr)
    if preflight["fatal"]:
        missing = "; ".join(f"{i['name']}: {i['text']}" for i in preflight["fatal"])
        print(f"error: preflight failed: {missing}", file=sys.stderr)
        return 2
    if args.preflight_only:
        return 0
    return _run(args, preflight, work_root, start)


def _run(args, preflight, work_root, start) -> int:
    import torch

    from .common import Env
    from .report import header, table, write_output

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device(
            "cuda", device.index if device.index is not None else torch.cuda.current_device()
        )
        torch.cuda.set_device(device)
        # The trainer's settings (timm_cskd.distributed.setup_context): measure what training runs.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work_dir = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=work_root))
    env = Env(args, device, start, preflight=preflight, work_dir=work_dir)
    for line in header(env):
        print(line, file=sys.stderr)
    rows = []
    try:
        for names, target, estimate in _selected_rows(args):
            for row in _run_rows(env, names, target, estimate):
                rows.append(row)
                print(
                    f"[{env.elapsed():6.1f} s] {row.name}: {row.status} {row.value} {row.detail}",
                    file=sys.stderr,
                )
            gc.collect()
            if env.cuda:
                torch.cuda.empty_cache()
            write_output(env, rows, done=False)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    write_output(env, rows, done=True)
    print("\n".join(header(env) + [""] + table(rows)))
    print(f"\ntotal {env.elapsed():.0f} s")
    return 1 if any(r.status == "FAIL" for r in rows) else 0
