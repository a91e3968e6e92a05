"""Measurement rows: training throughput per method, eager and compiled; the fused loss vs unfused; timed
with ``timm_cskd.throughput`` (synchronised rounds, warm-up excluded, the median round)."""

from __future__ import annotations

import functools
import time

import torch

from .common import (
    AMP_DTYPE,
    MODE_LABEL,
    MODES,
    Env,
    Row,
    Skip,
    error_text,
    is_missing_compiler_error,
    make_batch,
    make_optimizer,
    make_task,
    train_step,
)

LOSS_SHAPES = [(256, 1000), (1024, 1000)]


def measure_throughput(env: Env) -> list[Row]:
    """CE vs anchor vs paired, eager and compiled (the compile row's model), interleaved rounds."""
    from timm_cskd.throughput import median, time_rounds, timed

    args = env.args
    model = env.shared_model()
    optimizer = make_optimizer(model)
    batches = {m: make_batch(env, m, args.batch_size, seed=7, channels_last=True) for m in MODES}
    variants = {("eager", m): make_task(model, m) for m in MODES}
    rows: dict[tuple[str, str], Row] = {}

    def step(key):
        return lambda: train_step(env, variants[key], optimizer, batches[key[1]], AMP_DTYPE)

    try:
        compiled = env.compiled_model()
        for m in MODES:
            variants[("compiled", m)] = make_task(compiled, m)
    except Skip as e:
        for m in MODES:
            rows[("compiled", m)] = Row(f"train compiled {MODE_LABEL[m]}", "measure", "SKIP", detail=str(e))

    warm = {}
    for key in list(variants):
        start = time.perf_counter()
        try:
            timed(step(key), args.warmup, env.device)
        except Exception as e:
            # A compiled variant that breaks must not take the eager numbers down with it.
            status = "SKIP" if is_missing_compiler_error(e) else "FAIL"
            rows[key] = Row(f"train {key[0]} {MODE_LABEL[key[1]]}", "measure", status, detail=error_text(e))
            del variants[key]
        warm[key] = time.perf_counter() - start

    def budget_left(times) -> bool:  # fewer rounds, still a table
        return sum(median(t) for t in times.values() if t) * args.steps <= env.left()

    times = time_rounds(
        {key: step(key) for key in variants},
        rounds=args.rounds,
        calls=args.steps,
        device=env.device,
        more=budget_left,
    )

    for kind in ("eager", "compiled"):
        base = median(times[(kind, "off")]) if times.get((kind, "off")) else None
        for m in MODES:
            key = (kind, m)
            if key in rows:
                continue
            t = median(times[key])
            ips = args.batch_size / t
            ratio = f"{base / t:.3f}x CE images/s" if base else "no CE baseline"
            partners = f" + {args.batch_size} partners no_grad" if m == "anchor" else ""
            detail = (
                f"{ratio}; step {t * 1e3:.1f} ms; {args.batch_size} images with grad{partners}; "
                f"{len(times[key])} rounds; warm-up {warm[key]:.1f} s"
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


def fused_loss(logits, target, partner):
    from timm_cskd.loss import cskd_loss

    return cskd_loss(logits, target, partner)[0]


def loss_name(shape) -> str:
    return f"loss {shape[0]}x{shape[1]} bf16"


def measure_loss(env: Env, shape: tuple[int, int]) -> Row:
    from timm_cskd.loss import unfused_cskd_loss
    from timm_cskd.throughput import median, time_rounds

    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(shape, generator=g) * 3).to(env.device, torch.bfloat16).requires_grad_()
    partner = (torch.randn(shape, generator=g) * 3).to(env.device, torch.bfloat16)
    target = torch.randint(0, shape[1], (shape[0],), generator=g).to(env.device)
    fns = {"fused": fused_loss, "unfused": unfused_cskd_loss}

    def step(fn):
        logits.grad = None
        fn(logits, target, partner).backward()

    times = time_rounds(
        {name: functools.partial(step, fn) for name, fn in fns.items()},
        rounds=max(env.args.rounds, 3),
        calls=env.args.loss_iters,
        warmup=3,
        device=env.device,
    )
    t = {name: median(v) for name, v in times.items()}
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
        f"peak {peak['fused'] / 2**20:.2f} vs {peak['unfused'] / 2**20:.2f} MiB "
        f"({peak['fused'] / max(peak['unfused'], 1):.2f}x)"
        if peak
        else "peak memory: CUDA only"
    )
    value = f"fused {t['fused'] * 1e3:.3f} ms"
    detail = f"unfused {t['unfused'] * 1e3:.3f} ms ({t['fused'] / t['unfused']:.2f}x time); {mem}; fwd+bwd"
    raw = {"seconds": t, "rounds": times, "peak_bytes": peak or None}
    return Row(loss_name(shape), "measure", "ok", value, detail, raw)


def loss_256(env: Env) -> Row:
    return measure_loss(env, LOSS_SHAPES[0])


def loss_1024(env: Env) -> Row:
    return measure_loss(env, LOSS_SHAPES[1])
