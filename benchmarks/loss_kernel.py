"""Fused CSKDLoss vs the unfused PyTorch composition (log_softmax + kl_div + cross_entropy).

Forward + backward on (batch x classes) logits, float32 and bfloat16, timed interleaved in one run
(``timm_cskd.throughput.time_rounds``; the best round is reported), and the peak extra memory of one
step: CUDA's allocator peak on a GPU, or on CPU the peak-RSS growth of a fresh child process per variant
(one process each so no allocator cache carries over).

    python benchmarks/loss_kernel.py                 # CPU
    python benchmarks/loss_kernel.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys

import torch

from timm_cskd.loss import cskd_loss, unfused_cskd_loss
from timm_cskd.throughput import time_rounds

SHAPES = [(512, 1000), (2048, 1000)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fused(logits, target, partner):
    return cskd_loss(logits, target, partner)[0]


VARIANTS = {"fused": fused, "unfused": unfused_cskd_loss}


def make_inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_()
    partner = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    target = torch.randint(0, shape[1], (shape[0],), generator=g).to(device)
    return logits, target, partner


def step(fn, logits, target, partner):
    logits.grad = None
    fn(logits, target, partner).backward()


def time_pair(shape, dtype, device, iters, rounds):
    """The best round's seconds per step of each variant (3 warm-up steps each, interleaved rounds)."""
    inputs = make_inputs(shape, dtype, device)
    times = time_rounds(
        {name: functools.partial(step, fn, *inputs) for name, fn in VARIANTS.items()},
        rounds=rounds,
        calls=iters,
        warmup=3,
        device=device,
    )
    return {name: min(t) for name, t in times.items()}


def peak_bytes_cuda(name, shape, dtype, device):
    inputs = make_inputs(shape, dtype, device)
    step(VARIANTS[name], *inputs)
    inputs[0].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(VARIANTS[name], *inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def cpu_step_peak(name, shape, dtype):
    """Peak RSS growth of one step: Linux resets the high-water mark on writing 5 to clear_refs."""
    inputs = make_inputs(shape, getattr(torch, dtype), torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_kib("VmRSS:")
    step(VARIANTS[name], *inputs)
    return (rss_kib("VmHWM:") - before) * 1024


def peak_bytes_cpu(name, shape, dtype):
    """One fresh child process per variant, so no allocator cache carries over between them."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import loss_kernel as lk\n"
        f"print(json.dumps(lk.cpu_step_peak({name!r}, {shape!r}, {dtype!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(
        "| logits | dtype | fused ms | unfused ms | time fused/unfused | peak MiB fused | unfused | mem ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype_name, dtype in DTYPES.items():
            best = time_pair(shape, dtype, device, args.iters, args.rounds)
            if device.type == "cuda":
                peak = {name: peak_bytes_cuda(name, shape, dtype, device) for name in VARIANTS}
            else:
                peak = {name: peak_bytes_cpu(name, shape, dtype_name) for name in VARIANTS}
            print(
                f"| {shape[0]}x{shape[1]} | {dtype_name} | {best['fused'] * 1e3:.2f} | {best['unfused'] * 1e3:.2f} "
                f"| {best['fused'] / best['unfused']:.2f} | {peak['fused'] / 2**20:.1f} "
                f"| {peak['unfused'] / 2**20:.1f} | {peak['fused'] / max(peak['unfused'], 1):.2f} |"
            )
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
