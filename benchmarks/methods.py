"""Training-step time of every registered method relative to cross-entropy, and of knowledge distillation
(``ce`` with a teacher of the student's architecture), side by side in one process.

Each method is built through the registry with its default hyper-parameters around one shared timm model
(a method that changes the model, ``adapt_model``, gets its own adapted copy) and trains with its own SGD
optimizer on synthetic data shaped as its declarations ask: ``batches`` (plain images, anchors + as many
same-class partners, or same-class pairs) and one batch per augmented view (``views``), with the batch the
trainer's ``-b`` gives it: ``--batch-size`` anchors (each with a partner) in anchor batches, images
otherwise. Each step is the trainer's (``timm_cskd.step.train_step``), timed with
``timm_cskd.throughput.time_rounds``: methods interleaved round by round so machine noise hits them alike,
the device synchronised around each round, the table giving the median round.

The data is random tensors, so augmentation and decoding (a second view is a second one of each) are not
in these times: "images loaded" says what the loader has to deliver per step. Forward/backward counts the
images entering the student's first convolution with and without grad, measured on one step.

    python benchmarks/methods.py                                           # CPU: resnet18 at 64 px
    python benchmarks/methods.py --device cuda --model resnet50 --img-size 224 \\
        --batch-size 256 --amp --channels-last                              # one GPU

Its ``ce``, ``cskd`` and ``cskd-paired`` rows are the CE vs CS-KD anchor vs paired comparison the first
release's ``train_throughput.py`` made.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn
from timm.task.distillation import DistillationTeacher

from timm_cskd.methods import LISTING_ORDER, METHODS, KDConfig, Method, get_method, method_hparams
from timm_cskd.step import train_step
from timm_cskd.throughput import time_rounds

KD = "ce + KD"


@dataclass
class Counter:
    """Images entering a model's first convolution in one step, with and without grad."""

    grad: int = 0
    no_grad: int = 0

    def hook(self, _module, args):
        if torch.is_grad_enabled():
            self.grad += args[0].shape[0]
        else:
            self.no_grad += args[0].shape[0]


@dataclass
class Entry:
    name: str
    batches: str
    task: Method
    optimizer: torch.optim.Optimizer
    input: torch.Tensor | list[torch.Tensor]
    target: torch.Tensor
    loaded: int
    counter: Counter = field(default_factory=Counter)
    times: list[float] = field(default_factory=list)
    passes: str = ""


def first_conv(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def synthetic_batch(cls: type[Method], hp: dict, args, device, memory_format):
    """Random images and labels laid out as the method's sampler and views would deliver them."""
    g = torch.Generator().manual_seed(0)
    n = 2 * args.batch_size if cls.batches == "anchor" else args.batch_size
    if cls.batches == "plain":
        target = torch.randint(0, args.num_classes, (n,), generator=g)
    else:  # [x; x']: a half, then same-class partners in the same order
        target = torch.randint(0, args.num_classes, (n // 2,), generator=g).repeat(2)
    views = [
        torch.randn(n, 3, args.img_size, args.img_size, generator=g)
        .to(device)
        .contiguous(memory_format=memory_format)
        for _ in cls.views(hp)
    ]
    return (views[0] if len(views) == 1 else views), target.to(device), n * len(views)


def overrides_adapt_model(cls: type[Method]) -> bool:
    return cls.adapt_model.__func__ is not Method.adapt_model.__func__


def build_entries(args, device) -> tuple[list[Entry], Counter]:
    """One entry per registered method (or ``--methods``) and the KD row; the teacher's image counter."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    shared = timm.create_model(args.model, num_classes=args.num_classes)
    names = [n for n in LISTING_ORDER if n in METHODS] + [n for n in METHODS if n not in LISTING_ORDER]
    if args.methods:
        names = [n for n in names if n in args.methods]
    teacher = DistillationTeacher(timm.create_model(args.model, num_classes=args.num_classes))
    teacher.requires_grad_(False)
    teacher_counter = Counter()
    first_conv(teacher).register_forward_pre_hook(teacher_counter.hook)
    entries, students = [], {}
    for name in [*names, KD]:
        cls = get_method("ce" if name == KD else name)
        hp = method_hparams(cls, {})
        model = cls.adapt_model(copy.deepcopy(shared), hp) if overrides_adapt_model(cls) else shared
        kd = {"teacher": teacher, "kd": KDConfig()} if name == KD else {}
        task = cls(model, hp, device=device, **kd)
        task.to(device=device, memory_format=memory_format)
        task.train()
        optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=1e-3, momentum=0.9)
        batch = synthetic_batch(cls, hp, args, device, memory_format)
        entries.append(Entry(name, cls.batches, task, optimizer, *batch))
        students.setdefault(id(model), (model, []))[1].append(entries[-1])
    # Counting hooks last: an adapted copy must not inherit the shared model's.
    for model, sharing in students.values():
        counter = Counter()
        first_conv(model).register_forward_pre_hook(counter.hook)
        for entry in sharing:
            entry.counter = counter
    return entries, teacher_counter


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="the trainer's -b: anchors in anchor batches, else images"
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per method after the counting one"
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help="a subset of the registry (ce always runs)"
    )
    args = parser.parse_args()
    if args.methods is not None and "ce" not in args.methods:
        args.methods.append("ce")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    entries, teacher_counter = build_entries(args, device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext
    )

    def step(entry: Entry):
        # The trainer's step (forward under autocast, backward, optimizer update).
        return lambda: train_step(entry.task, entry.optimizer, entry.input, entry.target, autocast=autocast)

    for entry in entries:  # one untimed step counts the images each pass sees
        student = entry.counter
        student.grad = student.no_grad = teacher_counter.grad = teacher_counter.no_grad = 0
        step(entry)()
        entry.passes = f"fwd {student.grad} + {student.no_grad} no_grad"
        if teacher_counter.no_grad:
            entry.passes += f" + teacher {teacher_counter.no_grad}"
        entry.passes += f", bwd {student.grad}"
    times = time_rounds(
        {entry.name: step(entry) for entry in entries},
        rounds=args.rounds,
        calls=args.steps,
        warmup=args.warmup,
        device=device,
    )
    for entry in entries:
        entry.times = times[entry.name]

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads"
    )
    print(
        f"{args.model} {args.img_size}px, batch {args.batch_size} (-b), {args.num_classes} "
        f"classes, amp={'bf16' if args.amp else 'off'}, channels_last={args.channels_last}, {name}, "
        f"torch {torch.__version__}, timm {timm.__version__}"
    )
    print(f"median of {args.rounds} rounds x {args.steps} steps, methods interleaved")
    print(
        "| method | batches | images loaded / step | forward / backward (images) | step ms | step time / CE |"
    )
    print("|---|---|---|---|---|---|")
    base = statistics.median(next(e for e in entries if e.name == "ce").times)
    for entry in entries:
        t = statistics.median(entry.times)
        batches = "plain + teacher" if entry.name == KD else entry.batches
        print(
            f"| {entry.name} | {batches} | {entry.loaded} | {entry.passes} | {t * 1e3:.1f} | {t / base:.3f} |"
        )


if __name__ == "__main__":
    main()
