"""Correctness rows: the fused loss and the methods on the device, outside the trainer."""

from __future__ import annotations

import copy
import math
import socket
import time

import torch
import torch.nn.functional as F

from .common import (
    AMP_DTYPE,
    Env,
    Row,
    Skip,
    check,
    cosine,
    flat_grad,
    is_missing_compiler_error,
    make_batch,
    make_model,
    make_optimizer,
    make_task,
    rel,
    train_step,
)

CHECK_STEPS = 5
# Four steps from 2^16 with growth every 2 clean steps: the scale grows to 2^17 in use, far from real
# fp16 overflow (ResNet-50's largest gradient at init, the fc bias at ~1/batch, is 0.07 at batch 16:
# 8.7k at 2^17, fp16's max is 65504), so any skipped step is the loss's fault.
SCALER_STEPS = 4
SCALER_GROWTH_INTERVAL = 2


def check_bf16_steps(env: Env) -> Row:
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
    return check("bf16 CS-KD steps", finite and falls, value, detail, {"losses": losses})


def check_fp16_scaler(env: Env) -> Row:
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
    return check("fp16 GradScaler", same and no_skip and grew and finite, value, detail, raw)


def check_channels_last(env: Env) -> Row:
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
    raw = {"contiguous": [c1, c2], "channels_last": [l1, l2], "grad_cosine": cos}
    return check("channels_last", ok, value, detail, raw)


def check_compile(env: Env) -> Row:
    """The shared compiled model (compiled here, once) against an eager copy of the same weights, anchor
    mode at the throughput batch in bf16 + channels_last: the graphs the compiled throughput rows reuse."""
    eager_model = env.initial_weights()
    compiled = env.compiled_model()
    batch = make_batch(env, "anchor", env.args.batch_size, seed=4, channels_last=True)
    results = {}
    for variant, model, grads_of in (
        ("eager", eager_model, eager_model),
        ("compiled", compiled, env.shared_model()),
    ):
        task, optimizer = make_task(model, "anchor"), make_optimizer(grads_of)
        start = time.perf_counter()
        try:
            first = float(train_step(env, task, optimizer, batch, AMP_DTYPE))
        except Exception as e:
            if is_missing_compiler_error(e):
                raise Skip(f"inductor found no usable C++ compiler: {e}") from e
            raise
        grad = flat_grad(grads_of)
        second = float(train_step(env, task, optimizer, batch, AMP_DTYPE))
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
    return check("torch.compile", ok, value, detail, raw)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp(env: Env) -> Row:
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
        return check("DDP 1-process", ok, value, detail, raw)
    finally:
        dist.destroy_process_group()


def check_evaluate(env: Env) -> Row:
    from timm_cskd.evaluation import evaluate
    from timm_cskd.precision import full_fp32

    model = make_model(env).eval()
    g = torch.Generator().manual_seed(6)
    n_batches, size, img = 3, env.args.check_batch_size, env.args.img_size
    images = [torch.randn(size, 3, img, img, generator=g) for _ in range(n_batches)]
    # The reference runs in IEEE float32 as evaluate() does: a random network's top two logits are
    # close enough for TF32 to flip its predictions.
    with torch.no_grad(), full_fp32():
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
    return check("evaluate", ok, value, detail, raw)
