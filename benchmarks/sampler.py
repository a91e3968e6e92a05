"""Epoch-plan cost of ClassPairSampler vs the reference code's per-sample Python loop.

The reference is alinlab/cs-kd's ``PairBatchSampler.__iter__`` (``random.shuffle`` then one
``random.choice`` per anchor), reproduced below. Both build a whole epoch of ImageNet-size labels
(1,281,167 samples, 1,000 classes) and are timed side by side in this one process.

    python benchmarks/sampler.py
"""

from __future__ import annotations

import argparse
import itertools
import random
import resource
import time
from collections import defaultdict

import numpy as np

from timm_cskd import ClassPairSampler


def reference_epoch(labels: list[int], classwise: dict[int, list[int]], batch_size: int) -> int:
    """alinlab/cs-kd PairBatchSampler.__iter__, num_iterations=None (returns the batch count)."""
    indices = list(range(len(labels)))
    random.shuffle(indices)
    batches = 0
    for k in range(len(labels) // batch_size):
        batch_indices = indices[k * batch_size : (k + 1) * batch_size]
        pair_indices = [random.choice(classwise[labels[idx]]) for idx in batch_indices]
        _ = batch_indices + pair_indices
        batches += 1
    return batches


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=1_281_167)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="anchors per rank (256 global / 8 ranks)")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    labels = np.random.default_rng(0).integers(0, args.num_classes, args.num_samples)
    label_list = labels.tolist()
    classwise = defaultdict(list)
    for i, y in enumerate(label_list):
        classwise[y].append(i)

    start = time.perf_counter()
    samplers = {
        mode: ClassPairSampler(
            labels,
            args.batch_size * (2 if mode == "paired" else 1),
            mode=mode,
            num_replicas=args.ranks,
            rank=0,
        )
        for mode in ("anchor", "paired")
    }
    setup = (time.perf_counter() - start) / 2
    global_sampler = ClassPairSampler(labels, args.batch_size * args.ranks)

    epochs = itertools.count(1)

    def epoch(sampler):
        sampler.set_epoch(next(epochs))
        return sum(1 for _ in sampler)

    ref = timed(lambda: reference_epoch(label_list, classwise, args.batch_size * args.ranks), args.repeats)
    rows = [
        ("reference loop, whole epoch (1 process)", ref),
        (
            "ClassPairSampler anchor, whole epoch (1 process)",
            timed(lambda: epoch(global_sampler), args.repeats),
        ),
        (
            f"ClassPairSampler anchor, plan for 1 of {args.ranks} ranks",
            timed(samplers["anchor"].rank_plan, args.repeats),
        ),
        (
            f"ClassPairSampler paired, plan for 1 of {args.ranks} ranks",
            timed(samplers["paired"].rank_plan, args.repeats),
        ),
        (
            f"ClassPairSampler anchor, iterate 1 of {args.ranks} ranks",
            timed(lambda: epoch(samplers["anchor"]), args.repeats),
        ),
    ]
    print(f"N={args.num_samples} classes={args.num_classes} global batch={args.batch_size * args.ranks}")
    print(f"one-off index setup per sampler: {setup * 1e3:.0f} ms")
    print("| what | seconds | reference / this |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {ref / seconds:.1f}x |")
    print(f"max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
