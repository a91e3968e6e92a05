"""One-shot GPU check: does CS-KD train correctly on this GPU, and how fast, in one command.

Written for a lent GPU machine (one H100/H200, torch + timm installed, this repository not
pip-installed, no network, no DALI). Synthetic data only; the whole run stays under about 8 minutes
on an H100, torch.compile warm-up included. Run it from the repository root:

    python benchmarks/gpu_check.py --output gpu_out    # GPU: ResNet-50, 224 px, batch 256
    python benchmarks/gpu_check.py --smoke              # CPU: every row at toy sizes (the test)

It prints one markdown table under a header naming the device, the torch/timm versions and the date;
with --output it also writes ``gpu_check.md`` and ``gpu_check.json`` (raw numbers), refreshed after
every row so a run killed part-way still leaves the rows it finished. Exit status 1 if any row FAILed.

Correctness rows (PASS / FAIL / SKIP, each with what was measured):

1. bf16 CS-KD steps: the fused loss through the ``cskd``/``cskd-paired`` methods (anchor and paired modes) under bf16
   autocast stays finite and falls over a few SGD steps on a fixed batch.
2. fp16 GradScaler: fp16 autocast + ``torch.amp.GradScaler`` with growth_interval 2. The fused loss
   (anchor and paired) must produce the same scale sequence as plain cross-entropy on an identical
   model copy and data, with no skipped step. This catches a backward that multiplies by the scale in
   fp16 (65536 is inf in fp16, so every step at 2^16 would be skipped).
3. channels_last: model and input in channels_last give the same bf16 loss and gradient as contiguous.
4. torch.compile: a model compiled with the method's ``compile()`` matches eager on one train step (loss,
   gradient, the loss after the optimizer step). SKIP only when no C compiler is on PATH.
5. DDP 1-process: an NCCL (gloo on CPU) process group of world size 1 on a free localhost port, the
   task wrapped with ``prepare_distributed``, one step whose gradients equal an unwrapped copy's, and
   an all_reduce.
6. evaluate: ``timm_cskd.evaluate.evaluate`` on a small synthetic loader reports the top-1 error and
   NLL that plain torch computes from the same logits.

Measurements (same table): training throughput of ResNet-50 at 224 px, bf16 autocast, channels_last,
``--batch-size`` images with gradient per step, CE (``mode="off"``) vs CS-KD anchor (plus as many
partners under no_grad) vs paired (``batch/2`` pairs), eager and ``torch.compile``d, all six
interleaved round by round, median; and the fused CS-KD loss vs the unfused composition (log_softmax +
kl_div + cross_entropy) on 256x1000 and 1024x1000 bf16 logits: forward+backward time and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The device machine runs this from a checkout without `pip install`: make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from timm_cskd.loss import cskd_loss

try:
    from timm_cskd.methods import get_method, method_hparams
except ImportError as e:
    # timm_cskd.methods needs timm>=1.0.29 (timm.task): on a machine with an older timm every training
    # row fails with this message while the loss rows still run.
    get_method = None
    TASK_IMPORT_ERROR = f"{type(e).__name__}: {e} (timm {timm.__version__}; timm_cskd needs timm>=1.0.29)"

GPU_DEFAULTS = dict(
    device="cuda",
    model="resnet50",
    img_size=224,
    batch_size=256,
    check_batch_size=32,
    num_classes=1000,
    steps=10,
    rounds=3,
    warmup=3,
    loss_iters=50,
)
SMOKE_DEFAULTS = dict(
    device="cpu",
    model="test_resnet",
    img_size=32,
    batch_size=8,
    check_batch_size=8,
    num_classes=10,
    steps=2,
    rounds=2,
    warmup=1,
    loss_iters=3,
)
LOSS_SHAPES = [(256, 1000), (1024, 1000)]
MODES = ("off", "anchor", "paired")
MODE_LABEL = {"off": "CE", "anchor": "CS-KD anchor", "paired": "CS-KD paired"}
CHECK_STEPS = 5
# Four steps from 2^16 with growth every 2 clean steps: the scale grows to 2^17 in use, far from real
# fp16 overflow (ResNet-50's largest gradient at init, the fc bias at ~1/batch, is 0.07 at batch 16:
# 8.7k at 2^17, fp16's max is 65504), so any skipped step is the loss's fault.
SCALER_STEPS = 4
SCALER_GROWTH_INTERVAL = 2
LR = 0.05
# The training configuration measured for throughput. The compile row uses it too, at the throughput
# batch size, so the graphs it compiles are the ones the throughput rows reuse: each compiled once.
AMP_DTYPE = torch.bfloat16
CHANNELS_LAST = True


class Skip(Exception):
    """A row that cannot run here for a reason outside the code under test."""


@dataclass
class Row:
    name: str
    kind: str  # "check" (PASS/FAIL/SKIP) or "measure" (ok/FAIL/SKIP)
    status: str
    value: str = ""
    detail: str = ""
    raw: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Env:
    args: argparse.Namespace
    device: torch.device
    start: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s


# --------------------------------------------------------------------------------------- helpers


def make_model(env: Env, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(env.args.model, num_classes=env.args.num_classes).to(env.device)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # The recipe's optimizer (configs/*.yaml: opt momentum, 0.9, weight decay 1e-4).
    return create_optimizer_v2(model, opt="momentum", lr=LR, momentum=0.9, weight_decay=1e-4)


def make_batch(env: Env, mode: str, size: int, seed: int = 0, channels_last: bool = False):
    """``size`` images with gradient: anchor mode adds ``size`` partners, paired is size/2 pairs.

    Class-pair layout ``[x; x']`` with the targets repeated, as ClassPairSampler yields it.
    """
    g = torch.Generator().manual_seed(seed)
    loaded = 2 * size if mode == "anchor" else size
    half = loaded // 2
    img = env.args.img_size
    images = torch.randn(loaded, 3, img, img, generator=g)
    target = torch.randint(0, env.args.num_classes, (half,), generator=g).repeat(2)
    if mode == "off":
        target = torch.randint(0, env.args.num_classes, (loaded,), generator=g)
    images = images.to(env.device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(env.device)


METHOD_OF_MODE = {"off": "ce", "anchor": "cskd", "paired": "cskd-paired"}


def make_task(model, mode: str):
    """The trainer's method for a mode: ``ce`` on plain batches, ``cskd`` and ``cskd-paired`` on pairs."""
    if get_method is None:
        raise RuntimeError(TASK_IMPORT_ERROR)
    cls = get_method(METHOD_OF_MODE[mode])
    return cls(model, method_hparams(cls, {}))


def autocast(env: Env, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=dtype)


def train_step(env, task, optimizer, batch, amp_dtype=None, scaler=None) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with autocast(env, amp_dtype):
        loss = task(*batch)["loss"]
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach().float()


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compiler_missing(device: torch.device) -> str | None:
    """Inductor builds C++ on CPU; on CUDA Triton builds a small C launcher. Either needs a compiler."""
    names = ["CXX", "g++", "c++", "clang++"] if device.type == "cpu" else ["CC", "cc", "gcc", "clang"]
    env_var = os.environ.get(names[0])
    if (env_var and shutil.which(env_var)) or any(shutil.which(n) for n in names[1:]):
        return None
    return f"no C/C++ compiler on PATH ({', '.join(names[1:])}); inductor needs one"


def is_missing_compiler_error(exc: BaseException) -> bool:
    return any(type(e).__name__ == "InvalidCxxCompiler" for e in (exc, exc.__cause__, exc.__context__))


# ---------------------------------------------------------------------------- correctness rows


def check_bf16_steps(env: Env) -> tuple[bool, str, str, dict]:
    losses = {}
    base = make_model(env)
    for mode in ("anchor", "paired"):
        model = copy.deepcopy(base)
        task, optimizer = make_task(model, mode), make_optimizer(model)
        batch = make_batch(env, mode, env.args.check_batch_size, seed=1)
        model.train()
        losses[mode] = [
            float(train_step(env, task, optimizer, batch, torch.bfloat16)) for _ in range(CHECK_STEPS)
        ]
    finite = all(math.isfinite(v) for ls in losses.values() for v in ls)
    falls = all(v[-1] < v[0] for v in losses.values())
    value = ", ".join(f"{m} {v[0]:.3f}->{v[-1]:.3f}" for m, v in losses.items())
    detail = f"{CHECK_STEPS} steps on a fixed batch, finite={finite}, last<first={falls}"
    return finite and falls, value, detail, {"losses": losses}


def check_fp16_scaler(env: Env) -> tuple[bool, str, str, dict]:
    """Each variant gets an identical model copy, optimizer and scaler; the anchors are the same
    images in every variant, so only the loss differs."""
    base = make_model(env)
    k = env.args.check_batch_size
    pair_batch = make_batch(env, "anchor", k, seed=2)
    variants = {
        "CE": ("off", (pair_batch[0][:k], pair_batch[1][:k])),
        "anchor": ("anchor", pair_batch),
        "paired": ("paired", pair_batch),
    }
    scales, skipped, losses = {}, {}, {}
    for name, (mode, batch) in variants.items():
        model = copy.deepcopy(base).train()
        task, optimizer = make_task(model, mode), make_optimizer(model)
        scaler = torch.amp.GradScaler(
            env.device.type, init_scale=2.0**16, growth_interval=SCALER_GROWTH_INTERVAL
        )
        scales[name], skipped[name], losses[name] = [], 0, []
        for _ in range(SCALER_STEPS):
            before = scaler.get_scale()
            losses[name].append(float(train_step(env, task, optimizer, batch, torch.float16, scaler)))
            # The scaler backs off exactly when it found inf/NaN gradients and skipped the step.
            skipped[name] += scaler.get_scale() < before
            scales[name].append(before)
        scales[name].append(scaler.get_scale())
    finite = all(math.isfinite(v) for ls in losses.values() for v in ls)
    same = scales["anchor"] == scales["CE"] and scales["paired"] == scales["CE"]
    grew = scales["CE"][-1] > scales["CE"][0]
    no_skip = not any(skipped.values())

    def seq(s):
        return ",".join(f"2^{int(v).bit_length() - 1}" if v >= 1 else f"{v:g}" for v in s)

    value = f"skipped CE/anchor/paired {skipped['CE']}/{skipped['anchor']}/{skipped['paired']}"
    detail = f"scales CE {seq(scales['CE'])}; anchor {seq(scales['anchor'])}; paired {seq(scales['paired'])}"
    if not finite:
        detail += "; non-finite loss"
    if not grew:
        detail += "; CE scale never grew"
    raw = {"scales": scales, "skipped": skipped, "losses": losses}
    return same and no_skip and grew and finite, value, detail, raw


def check_channels_last(env: Env) -> tuple[bool, str, str, dict]:
    base = make_model(env).train()
    batch = make_batch(env, "anchor", env.args.check_batch_size, seed=3)
    results = {}
    for layout in ("contiguous", "channels_last"):
        model = copy.deepcopy(base)
        images, target = batch
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        task, optimizer = make_task(model, "anchor"), make_optimizer(model)
        first = float(train_step(env, task, optimizer, (images, target), torch.bfloat16))
        grad = flat_grad(model)
        second = float(train_step(env, task, optimizer, (images, target), torch.bfloat16))
        results[layout] = (first, second, grad)
    (c1, c2, cg), (l1, l2, lg) = results["contiguous"], results["channels_last"]
    cos = cosine(cg, lg)
    ok = rel(l1, c1) < 2e-2 and rel(l2, c2) < 2e-2 and cos > 0.99
    value = f"loss {l1:.4f} vs {c1:.4f}"
    detail = f"rel diff {rel(l1, c1):.1e}, after a step {rel(l2, c2):.1e}, grad cosine {cos:.5f} (bf16)"
    return ok, value, detail, {"contiguous": [c1, c2], "channels_last": [l1, l2], "grad_cosine": cos}


def check_compile(env: Env) -> tuple[bool, str, str, dict]:
    reason = compiler_missing(env.device)
    if reason:
        raise Skip(reason)
    amp_dtype, channels_last = AMP_DTYPE, CHANNELS_LAST
    base = make_model(env).train()
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    batch = make_batch(env, "anchor", env.args.batch_size, seed=4, channels_last=channels_last)
    results = {}
    for variant in ("eager", "compiled"):
        model = copy.deepcopy(base)
        task, optimizer = make_task(model, "anchor"), make_optimizer(model)
        start = time.perf_counter()
        if variant == "compiled":
            task.compile()
        try:
            first = float(train_step(env, task, optimizer, batch, amp_dtype))
        except Exception as e:
            if is_missing_compiler_error(e):
                raise Skip(f"inductor found no usable C++ compiler: {e}") from e
            raise
        grad = flat_grad(model)
        second = float(train_step(env, task, optimizer, batch, amp_dtype))
        env.sync()
        results[variant] = (first, second, grad, time.perf_counter() - start)
    (e1, e2, eg, _), (c1, c2, cg, ct) = results["eager"], results["compiled"]
    cos = cosine(eg, cg)
    ok = rel(c1, e1) < 2e-2 and rel(c2, e2) < 2e-2 and cos > 0.99
    value = f"loss {c1:.4f} vs eager {e1:.4f}"
    detail = (
        f"rel diff {rel(c1, e1):.1e}, after a step {rel(c2, e2):.1e}, grad cosine {cos:.5f}; "
        f"anchor mode, batch {env.args.batch_size}+{env.args.batch_size}, compile + 2 steps {ct:.0f} s"
    )
    raw = {"eager": [e1, e2], "compiled": [c1, c2], "grad_cosine": cos, "compile_seconds": ct}
    return ok, value, detail, raw


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp(env: Env) -> tuple[bool, str, str, dict]:
    import torch.distributed as dist

    backend = "nccl" if env.cuda else "gloo"
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised")
    port = free_port()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        base = make_model(env).train()
        batch = make_batch(env, "anchor", env.args.check_batch_size, seed=5)
        grads, losses = {}, {}
        for variant in ("plain", "ddp"):
            model = copy.deepcopy(base)
            task, optimizer = make_task(model, "anchor"), make_optimizer(model)
            if variant == "ddp":
                task.prepare_distributed(device_ids=[env.device.index or 0] if env.cuda else None)
            # fp32: the gradients of a world-size-1 DDP step must equal the plain step's, not merely
            # come close under bf16 rounding.
            losses[variant] = float(train_step(env, task, optimizer, batch))
            grads[variant] = flat_grad(model)
        probe = torch.tensor([1.0, losses["ddp"]], device=env.device)
        dist.all_reduce(probe)
        env.sync()
        max_diff = float((grads["ddp"] - grads["plain"]).abs().max())
        cos = cosine(grads["ddp"], grads["plain"])
        reduced_ok = float(probe[0]) == 1.0 and rel(float(probe[1]), losses["ddp"]) < 1e-6
        ok = reduced_ok and cos > 0.9999 and rel(losses["ddp"], losses["plain"]) < 1e-5
        value = f"{backend}, loss {losses['ddp']:.4f}"
        detail = (
            f"grad vs unwrapped: cosine {cos:.6f}, max abs diff {max_diff:.1e}; "
            f"all_reduce [1, loss] -> [{probe[0]:g}, {probe[1]:.4f}] ({'ok' if reduced_ok else 'WRONG'})"
        )
        raw = {"backend": backend, "losses": losses, "grad_cosine": cos, "grad_max_abs_diff": max_diff}
        return ok, value, detail, raw
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def no_tf32():
    """IEEE float32 convolutions and matmuls inside (main() turns TF32 on, as the trainer does)."""
    try:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:
        saved = None  # torch >= 2.9 refuses the legacy getters once per-backend settings disagree
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_evaluate(env: Env) -> tuple[bool, str, str, dict]:
    # evaluate.py pulls in matplotlib (reliability diagrams): if the machine lacks it, only this row fails.
    from timm_cskd.evaluate import evaluate

    model = make_model(env).eval()
    g = torch.Generator().manual_seed(6)
    n_batches, size, img = 3, env.args.check_batch_size, env.args.img_size
    images = [torch.randn(size, 3, img, img, generator=g) for _ in range(n_batches)]
    # The reference runs in IEEE float32 as evaluate() does: a random network's top two logits are
    # close enough for TF32 to flip its predictions.
    with torch.no_grad(), no_tf32():
        logits = torch.cat([model(x.to(env.device)).double() for x in images])
    pred = logits.argmax(1).cpu()
    # Half the labels are the prediction, half random, so the top-1 error is nowhere near 0 or 100%.
    labels = torch.where(
        torch.arange(len(pred)) % 2 == 0,
        pred,
        torch.randint(0, env.args.num_classes, pred.shape, generator=g),
    )
    loader = [(x, y) for x, y in zip(images, labels.split(size))]
    metrics = evaluate(model, loader, env.device, collect=True).meter.compute()

    n = len(labels)
    top1_err = 100.0 * float((pred != labels).double().mean())
    nll = float(F.cross_entropy(logits, labels.to(env.device)))
    ok = (
        metrics["num_samples"] == n
        # One image of slack: two equal probabilities may resolve differently than the logits' argmax.
        and abs(metrics["top1_err"] - top1_err) <= 100.0 / n + 1e-9
        and rel(metrics["nll"], nll) < 1e-4
    )
    value = f"top-1 err {metrics['top1_err']:.2f}% vs {top1_err:.2f}%"
    detail = f"NLL {metrics['nll']:.5f} vs {nll:.5f}, {metrics['num_samples']} of {n} images, float32"
    raw = {"evaluate": metrics, "direct": {"top1_err": top1_err, "nll": nll, "num_samples": n}}
    return ok, value, detail, raw


CHECKS = [
    ("bf16 CS-KD steps", check_bf16_steps),
    ("fp16 GradScaler", check_fp16_scaler),
    ("channels_last", check_channels_last),
    ("torch.compile", check_compile),
    ("DDP 1-process", check_ddp),
    ("evaluate", check_evaluate),
]


# ------------------------------------------------------------------------------- measurements


def measure_throughput(env: Env) -> list[Row]:
    """CE vs anchor vs paired, eager and compiled, one model and optimizer, interleaved rounds."""
    args = env.args
    amp_dtype, channels_last = AMP_DTYPE, CHANNELS_LAST
    model = make_model(env).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model)
    batches = {m: make_batch(env, m, args.batch_size, seed=7, channels_last=channels_last) for m in MODES}
    variants = {("eager", m): make_task(model, m) for m in MODES}
    rows: dict[tuple[str, str], Row] = {}

    def run(key, n):
        env.sync()
        start = time.perf_counter()
        for _ in range(n):
            train_step(env, variants[key], optimizer, batches[key[1]], amp_dtype)
        env.sync()
        return (time.perf_counter() - start) / n

    reason = compiler_missing(env.device)
    compiled = None if reason else torch.compile(model)
    for m in MODES:
        if compiled is not None:
            variants[("compiled", m)] = make_task(compiled, m)
        else:
            rows[("compiled", m)] = Row(f"train compiled {MODE_LABEL[m]}", "measure", "SKIP", detail=reason)

    warm = {}
    for key in list(variants):
        start = time.perf_counter()
        try:
            run(key, args.warmup)
        except Exception as e:
            # A compiled variant that breaks must not take the eager numbers down with it.
            status = "SKIP" if is_missing_compiler_error(e) else "FAIL"
            rows[key] = Row(f"train {key[0]} {MODE_LABEL[key[1]]}", "measure", status, detail=error_text(e))
            del variants[key]
        warm[key] = time.perf_counter() - start

    times = {key: [] for key in variants}
    for r in range(args.rounds):
        if r and env.over_budget():
            break  # fewer rounds, still a table
        for key in variants:
            times[key].append(run(key, args.steps))

    for kind in ("eager", "compiled"):
        base = statistics.median(times[(kind, "off")]) if times.get((kind, "off")) else None
        for m in MODES:
            key = (kind, m)
            if key in rows:
                continue
            t = statistics.median(times[key])
            ips = args.batch_size / t
            ratio = f"{base / t:.3f}x CE images/s" if base else "no CE baseline"
            partners = f" + {args.batch_size} partners no_grad" if m == "anchor" else ""
            detail = (
                f"{ratio}; step {t * 1e3:.1f} ms; {args.batch_size} images with grad{partners}; "
                f"warm-up {warm[key]:.1f} s"
            )
            raw = {
                "step_s_median": t,
                "step_s_rounds": times[key],
                "images_per_s": ips,
                "ratio_to_ce": base / t if base else None,
                "warmup_s": warm[key],
            }
            rows[key] = Row(f"train {kind} {MODE_LABEL[m]}", "measure", "ok", f"{ips:.0f} img/s", detail, raw)
    return [rows[(k, m)] for k in ("eager", "compiled") for m in MODES]


def unfused_loss(logits, target, partner, temperature=4.0, lambda_cls=1.0):
    """alinlab/cs-kd's composition, the reference the fused kernel replaces."""
    z, v = logits.float(), partner.float().detach()
    kl = F.kl_div(F.log_softmax(z / temperature, 1), F.softmax(v / temperature, 1), reduction="batchmean")
    return F.cross_entropy(z, target) + lambda_cls * temperature**2 * kl


def fused_loss(logits, target, partner):
    return cskd_loss(logits, target, partner)[0]


def measure_loss(env: Env, shape: tuple[int, int]) -> Row:
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(shape, generator=g) * 3).to(env.device, torch.bfloat16).requires_grad_()
    partner = (torch.randn(shape, generator=g) * 3).to(env.device, torch.bfloat16)
    target = torch.randint(0, shape[1], (shape[0],), generator=g).to(env.device)
    fns = {"fused": fused_loss, "unfused": unfused_loss}

    def step(fn):
        logits.grad = None
        fn(logits, target, partner).backward()

    for fn in fns.values():
        for _ in range(3):
            step(fn)
    times = {name: [] for name in fns}
    for _ in range(max(env.args.rounds, 3)):
        for name, fn in fns.items():
            env.sync()
            start = time.perf_counter()
            for _ in range(env.args.loss_iters):
                step(fn)
            env.sync()
            times[name].append((time.perf_counter() - start) / env.args.loss_iters)
    t = {name: statistics.median(v) for name, v in times.items()}
    peak = {}
    if env.cuda:
        for name, fn in fns.items():
            logits.grad = None
            env.sync()
            torch.cuda.reset_peak_memory_stats(env.device)
            before = torch.cuda.memory_allocated(env.device)
            step(fn)
            env.sync()
            peak[name] = torch.cuda.max_memory_allocated(env.device) - before
    mem = (
        f"peak {peak['fused'] / 2**20:.2f} vs {peak['unfused'] / 2**20:.2f} MiB ({peak['fused'] / max(peak['unfused'], 1):.2f}x)"
        if peak
        else "peak memory: CUDA only"
    )
    value = f"fused {t['fused'] * 1e3:.3f} ms"
    detail = f"unfused {t['unfused'] * 1e3:.3f} ms ({t['fused'] / t['unfused']:.2f}x time); {mem}; fwd+bwd"
    raw = {"seconds": t, "rounds": times, "peak_bytes": peak or None}
    return Row(f"loss {shape[0]}x{shape[1]} bf16", "measure", "ok", value, detail, raw)


# ------------------------------------------------------------------------------------- driver


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def run_check(env: Env, name: str, fn) -> Row:
    start = time.perf_counter()
    if env.over_budget():
        return Row(name, "check", "SKIP", detail=f"time budget of {env.args.budget_s:.0f} s spent")
    try:
        ok, value, detail, raw = fn(env)
        row = Row(name, "check", "PASS" if ok else "FAIL", value, detail, raw)
    except Skip as e:
        row = Row(name, "check", "SKIP", detail=str(e))
    except Exception as e:
        traceback.print_exc()
        row = Row(name, "check", "FAIL", detail=error_text(e))
    row.seconds = time.perf_counter() - start
    return row


def run_measure(env: Env, names: list[str], fn) -> list[Row]:
    start = time.perf_counter()
    if env.over_budget():
        return [
            Row(n, "measure", "SKIP", detail=f"time budget of {env.args.budget_s:.0f} s spent") for n in names
        ]
    try:
        rows = fn(env)
        rows = rows if isinstance(rows, list) else [rows]
    except Exception as e:
        traceback.print_exc()
        rows = [Row(n, "measure", "FAIL", detail=error_text(e)) for n in names]
    for row in rows:
        row.seconds = time.perf_counter() - start
    return rows


def header(env: Env) -> list[str]:
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
        f"{extra}, python {platform.python_version()}",
        f"{args.model} at {args.img_size} px, {args.num_classes} classes; checks on {args.check_batch_size} "
        f"anchors; throughput: batch {args.batch_size} with grad, bf16 autocast, channels_last, "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps",
    ]


def table(rows: list[Row]) -> list[str]:
    lines = ["| row | status | value | detail |", "|---|---|---|---|"]
    for r in rows:
        cells = [r.name, r.status, r.value, r.detail]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def write_output(env: Env, rows: list[Row], done: bool) -> None:
    if not env.args.output:
        return
    out = Path(env.args.output)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(header(env) + [""] + table(rows)) + "\n"
    if not done:
        text += "\n(incomplete: the run is still going or was interrupted)\n"
    (out / "gpu_check.md").write_text(text)
    payload = {
        "device": torch.cuda.get_device_name(env.device) if env.cuda else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": vars(env.args),
        "complete": done,
        "elapsed_s": time.perf_counter() - env.start,
        "rows": [asdict(r) for r in rows],
    }
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, toy sizes: every row in 1-2 minutes on 2 cores"
    )
    parser.add_argument(
        "--device", help=f"default {GPU_DEFAULTS['device']} ({SMOKE_DEFAULTS['device']} with --smoke)"
    )
    parser.add_argument("--model", help=f"timm model (default {GPU_DEFAULTS['model']})")
    parser.add_argument("--img-size", type=int, help=f"default {GPU_DEFAULTS['img_size']}")
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"throughput images with grad per step (default {GPU_DEFAULTS['batch_size']})",
    )
    parser.add_argument(
        "--check-batch-size",
        type=int,
        help=f"anchors per correctness step (default {GPU_DEFAULTS['check_batch_size']})",
    )
    parser.add_argument("--num-classes", type=int, help=f"default {GPU_DEFAULTS['num_classes']}")
    parser.add_argument(
        "--steps", type=int, help=f"timed steps per variant per round (default {GPU_DEFAULTS['steps']})"
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {GPU_DEFAULTS['rounds']})")
    parser.add_argument(
        "--warmup", type=int, help=f"untimed steps per variant (default {GPU_DEFAULTS['warmup']})"
    )
    parser.add_argument(
        "--loss-iters", type=int, help=f"loss fwd+bwd per round (default {GPU_DEFAULTS['loss_iters']})"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="soft time budget: rows not started by then are SKIPped and throughput stops adding rounds",
    )
    parser.add_argument("--output", help="folder for gpu_check.md and gpu_check.json")
    args = parser.parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size % 2 or args.check_batch_size % 2:
        parser.error("batch sizes must be even (paired mode trains batch/2 pairs)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(
                "error: --device cuda but torch sees no GPU (use --smoke on a CPU machine)", file=sys.stderr
            )
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        # The trainer's settings (timm_cskd.distributed.setup_context): measure what training runs.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = Env(args, device, time.perf_counter())
    for line in header(env):
        print(line, file=sys.stderr)

    rows: list[Row] = []

    def add(new: list[Row]) -> None:
        for row in new:
            rows.append(row)
            print(
                f"[{time.perf_counter() - env.start:6.1f} s] {row.name}: {row.status} {row.value} {row.detail}",
                file=sys.stderr,
            )
        write_output(env, rows, done=False)

    for name, fn in CHECKS:
        add([run_check(env, name, fn)])
    throughput_names = [f"train {k} {MODE_LABEL[m]}" for k in ("eager", "compiled") for m in MODES]
    add(run_measure(env, throughput_names, measure_throughput))
    for shape in LOSS_SHAPES:
        add(run_measure(env, [f"loss {shape[0]}x{shape[1]} bf16"], lambda e, s=shape: measure_loss(e, s)))

    write_output(env, rows, done=True)
    print("\n".join(header(env) + [""] + table(rows)))
    print(f"\ntotal {time.perf_counter() - env.start:.0f} s")
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
