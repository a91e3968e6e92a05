"""Training and loader throughput, timed in the habits of timm's ``benchmark.py``: untimed warm-up calls
first, the device synchronised before and after every timed stretch (``torch.cuda.synchronize``, then
``time.perf_counter``, as timm's ``cuda_timestamp``), and the median over rounds, so one noisy round does
not move the number.

``time_rounds`` times any callables, interleaved round by round so machine noise hits them alike;
``training_step`` builds the trainer's objects from its flags (model, method, optimizer, AMP, EMA,
``torch.compile``) and returns one real training step (``timm_cskd.step.train_step``) on synthetic inputs
shaped as the method's sampler and views deliver them; ``loader_rates`` measures the torch loader's images/s.
``timm-cskd benchmark``, ``benchmarks/methods.py``, ``benchmarks/loss_kernel.py`` and the GPU check time
with these.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from timm_cskd import build
from timm_cskd.data.index import ImageIndex
from timm_cskd.data.loader import (
    build_device_preps,
    build_transforms,
    create_train_loader,
    resolve_pin_memory,
)
from timm_cskd.experiment import ResolvedRun
from timm_cskd.methods import Method
from timm_cskd.step import autocast_context, train_step
from timm_cskd.teacher import load_teacher

__all__ = [
    "TrainingStep",
    "images_in",
    "loader_rates",
    "median",
    "synchronize",
    "synthetic_batch",
    "time_rounds",
    "timed",
    "torch_train_loader",
    "training_step",
]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose work is done when it returns)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], calls: int, device: torch.device | str) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_rounds(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    calls: int,
    device: torch.device | str,
    warmup: int = 0,
    more: Callable[[dict[str, list[float]]], bool] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, one entry per round of ``calls`` calls, after ``warmup``
    untimed calls of each; the callables take turns within every round. ``more(times)``, when given, is
    asked before each round after the first whether to go on (a time budget)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        if r and more is not None and not more(times):
            break
        for name, fn in fns.items():
            times[name].append(timed(fn, calls, device))
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def images_in(images) -> int:
    """Images in a batch: one tensor, or a list of view batches of a multi-view method."""
    return sum(v.shape[0] for v in images) if isinstance(images, list | tuple) else images.shape[0]


def synthetic_batch(
    method_cls: type[Method],
    hp: dict,
    batch_size: int,
    num_classes: int,
    input_size: tuple[int, int, int],
    device: torch.device,
    channels_last: bool = False,
    seed: int = 0,
):
    """Random normalised images and labels laid out as the method's sampler and views deliver them:
    ``batch_size`` anchors then as many same-class partners (``anchor``), ``batch_size`` images as
    same-class pairs ``[x; x']`` (``paired``), or ``batch_size`` images (``plain``); one batch per view."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * batch_size if method_cls.batches == "anchor" else batch_size
    if method_cls.batches == "plain":
        target = torch.randint(0, num_classes, (n,), generator=g)
    else:
        target = torch.randint(0, num_classes, (n // 2,), generator=g).repeat(2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = [
        torch.randn(n, *input_size, generator=g).to(device).contiguous(memory_format=memory_format)
        for _ in method_cls.views(hp)
    ]
    return (views[0] if len(views) == 1 else views), target.to(device)


@dataclass
class TrainingStep:
    """One training step of the configured method, ready to call, and what it consumes."""

    run: Callable[[], None]
    images_per_step: int  # what the loader must deliver for one step (every view, partners included)
    task: Method
    data_config: dict


def training_step(run: ResolvedRun, num_classes: int, device: torch.device) -> TrainingStep:
    """The trainer's model, method, optimizer, AMP (GradScaler for float16), EMA and ``torch.compile``
    built from the resolved configuration as ``timm_cskd.train.Trainer`` builds them (one process, no
    DDP), and a step of it on a fixed synthetic batch: every call is one optimizer update, followed by
    the EMA update."""
    config, method_cls, kd = run.config, run.method_cls, run.kd
    method, data, runtime = config.method, config.data, config.runtime
    model = method_cls.adapt_model(build.create_model(config.model, num_classes), method.method_kwargs)
    data_config = build.resolve_data_config(config.model, model)
    mixup_fn = build.create_mixup(data, method.smoothing, num_classes)
    teacher = None
    if kd is not None:
        teacher, _ = load_teacher(method.kd_model_name, num_classes, method.kd_model_arch)
    task = build.create_task(method, method_cls, model, data_config, mixup_fn, teacher, kd, device)
    task.to(device)
    if data.channels_last:
        task.to(memory_format=torch.channels_last)
    optim = config.replace(lr=build.resolve_lr(config.optim, data.batch_size, 1)).optim
    optimizer = build.create_optimizer(optim, task.get_trainable_module())
    autocast = autocast_context(runtime, device)
    scaler = torch.amp.GradScaler(device.type) if runtime.amp and runtime.amp_dtype == "float16" else None
    if optim.model_ema:
        task.setup_ema(decay=optim.model_ema_decay, use_warmup=optim.model_ema_warmup)
    if runtime.torchcompile:
        task.compile(backend=runtime.torchcompile, mode=runtime.torchcompile_mode)
    images, target = synthetic_batch(
        method_cls,
        method.method_kwargs,
        data.batch_size,
        num_classes,
        tuple(data_config["input_size"]),
        device,
        channels_last=data.channels_last,
    )
    task.train()
    steps = 0

    def run_step() -> None:
        nonlocal steps
        train_step(
            task,
            optimizer,
            images,
            target,
            autocast=autocast,
            scaler=scaler,
            clip_grad=optim.clip_grad,
            clip_mode=optim.clip_mode,
        )
        steps += 1
        task.update_ema(step=steps)

    return TrainingStep(run_step, images_in(images), task, data_config)


def torch_train_loader(run: ResolvedRun, index: ImageIndex, data_config: dict, device):
    """The trainer's torch-backend training loader for one process: its sampler, the method's views with
    the configured augmentation, uint8 workers (-j) and the device prep (normalisation, random erasing)."""
    data, views = run.config.data, run.views
    train_tf, _ = build_transforms(data, data_config, views)
    return create_train_loader(
        index,
        train_tf,
        data,
        batches=run.method_cls.batches,
        num_replicas=1,
        rank=0,
        seed=run.config.runtime.seed,
        preps=build_device_preps(data, data_config, views, device),
        pin_memory=resolve_pin_memory(data, device),
    )


def _endless(loader):
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_rates(loader, *, rounds: int, batches: int, warmup: int, device) -> list[float]:
    """Images/s the loader delivers, finished on the device, with nothing consuming them: one entry per
    round of ``batches`` batches, after ``warmup`` untimed ones (the first wait on worker start-up).
    Epochs follow each other as in training (a new epoch starts its workers again)."""
    stream = _endless(loader)
    try:
        for _ in range(warmup):
            next(stream)
        rates = []
        for _ in range(rounds):
            synchronize(device)
            start, count = time.perf_counter(), 0
            for _ in range(batches):
                images, _target = next(stream)
                count += images_in(images)
            synchronize(device)
            rates.append(count / (time.perf_counter() - start))
        return rates
    finally:
        stream.close()
