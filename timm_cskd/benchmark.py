"""``timm-cskd benchmark``: how fast a model, method, batch and precision train on this device, and whether
the torch loader keeps up with it.

    timm-cskd benchmark --model resnet50 --method cskd -b 64 --amp --amp-dtype bfloat16 --channels-last \\
        --data-dir /imagenet -j 8
    python -m timm_cskd.benchmark -c configs/resnet50_cskd.yaml --data-dir /imagenet --torchcompile inductor

Every flag but the four below is the trainer's (``timm-cskd train``, a config's ``-c`` too), with its meaning:
``--model``, ``--method``, ``-b``, ``--amp``/``--amp-dtype``, ``--channels-last``, ``--torchcompile``,
``--model-ema``, ``--bce-loss``, Mixup and the augmentation flags, ``-j``, ``--device``.

The training side is the trainer's own step (``timm_cskd.step.train_step``: forward under autocast,
backward, GradScaler for float16, clipping, optimizer and EMA update) of the method built from those
flags, on synthetic inputs laid out as its sampler and views deliver them (``cskd``: -b anchors and as
many partners, forwarded under no_grad), so decoding and augmentation cost it nothing: ``--warmup``
untimed steps (the compile with --torchcompile, cuDNN's autotuning), then ``--rounds`` rounds of
``--steps`` steps, the device synchronised around each, and the median round. Every step is an
optimizer update (with ``--grad-accum-steps N`` the trainer updates on every Nth batch only).

The loader side is the trainer's torch loader on ``--data-dir``'s training split (of a tar shard folder:
all its training shards, in one process) with the configured augmentation, its ``-j`` uint8 workers and
the device prep (normalisation, random erasing), nothing consuming its batches: ``--rounds`` rounds of
``--loader-batches`` batches after as many warm-up batches as it has workers (at least ``--warmup``).
The last line says what fraction of the step's demand the loader delivers. Without ``--data-dir`` only
the step is measured. ``timm-cskd train --help`` lists the trainer's flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

from timm_cskd.config import DataConfig, RunConfig, parse_args
from timm_cskd.data.index import DataIndexError, build_index, find_split
from timm_cskd.data.shard_index import is_shard_folder, load_shard_index
from timm_cskd.distributed import detect_launch, select_device
from timm_cskd.errors import ConfigError
from timm_cskd.experiment import resolve_run
from timm_cskd.invocation import program_name
from timm_cskd.throughput import loader_rates, median, time_rounds, torch_train_loader, training_step

__all__ = ["build_parser", "main"]

DEFAULT_CLASSES = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.benchmark"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--loader-batches", type=int, default=20, help="loader batches per round")
    return parser


def _check(bench: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--rounds", bench.rounds, 1),
        ("--steps", bench.steps, 1),
        ("--warmup", bench.warmup, 0),
        ("--loader-batches", bench.loader_batches, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be >= {low}")


def _train_index(args: DataConfig, num_classes: int | None):
    if args.data_dir is None:
        return None
    if not Path(args.data_dir).is_dir():
        raise DataIndexError(f"--data-dir {args.data_dir} does not exist or is not a folder")
    if is_shard_folder(args.data_dir):  # one process reads every training shard
        return load_shard_index(args.data_dir, args.train_split)
    train_path = find_split(args.data_dir, [args.train_split])
    if train_path is None:
        raise DataIndexError(f"--data-dir {args.data_dir}: no '{args.train_split}' folder or list file")
    return build_index(train_path, num_classes=num_classes)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _verdict(fraction: float, images_per_step: int) -> str:
    advice = (
        "it keeps up"
        if fraction >= 1.0
        else "add workers (-j), or use --data-backend dali (decoding on the GPU)"
    )
    return f"loader delivers {fraction:.2f}x of the training step's demand at {images_per_step} img/step: {advice}"


def run(bench: argparse.Namespace, config: RunConfig) -> None:
    resolved = resolve_run(config.replace(resume=""))  # the benchmark never resumes a run
    config = resolved.config
    model, data, runtime = config.model, config.data, config.runtime
    index = _train_index(data, model.num_classes)
    num_classes = index.num_classes if index is not None else model.num_classes or DEFAULT_CLASSES
    device = select_device(runtime.device, detect_launch())
    if device.type == "cuda":  # as the trainer sets them (timm_cskd.distributed)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(runtime.seed)
    step = training_step(resolved, num_classes, device)
    size = "x".join(str(s) for s in step.data_config["input_size"][1:])
    amp = runtime.amp_dtype if runtime.amp else "off"
    print(
        f"timm-cskd benchmark: {model.model} at {size}, method {config.method.method}, -b {data.batch_size}, "
        f"{num_classes} classes, amp {amp}, channels_last {'on' if data.channels_last else 'off'}, "
        f"compile {runtime.torchcompile or 'off'}, {_device_name(device)}, torch {torch.__version__}, "
        f"timm {timm.__version__}"
    )
    times = time_rounds(
        {"step": step.run}, rounds=bench.rounds, calls=bench.steps, warmup=bench.warmup, device=device
    )
    step_s = median(times["step"])
    demand = step.images_per_step / step_s
    print(
        f"train step: {step_s * 1e3:.5g} ms, median of {bench.rounds} rounds x {bench.steps} steps after "
        f"{bench.warmup} warm-up steps"
    )
    print(
        f"train rate: {demand:.5g} img/s ({step.images_per_step} images loaded per step; "
        f"{data.batch_size / step_s:.5g} -b samples/s)"
    )
    if index is None:
        print("loader: not measured (no --data-dir)")
        return
    loader = torch_train_loader(resolved, index, step.data_config, device)
    warmup = max(bench.warmup, data.workers)
    rates = loader_rates(
        loader, rounds=bench.rounds, batches=bench.loader_batches, warmup=warmup, device=device
    )
    rate = median(rates)
    print(
        f"loader rate: {rate:.5g} img/s (torch backend, -j {data.workers}, median of {bench.rounds} rounds x "
        f"{bench.loader_batches} batches after {warmup} warm-up batches)"
    )
    print(_verdict(rate / demand, step.images_per_step))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    bench, trainer_argv = parser.parse_known_args(argv)
    try:
        _check(bench)
        args = parse_args(trainer_argv)
        if args.data_backend != "torch":
            raise ConfigError(f"--data-backend {args.data_backend}: the benchmark measures the torch loader")
        run(bench, RunConfig.from_namespace(args))
    except (ConfigError, DataIndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
