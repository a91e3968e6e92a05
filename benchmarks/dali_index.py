"""Start time and memory of one DALI reader process: the whole index pickled into it vs mapped files.

DALI sends its parallel external source, pickled, to each of the ``-j`` reader processes of every rank,
at every pipeline start and restart. Before, that source held the ImageIndex's paths (a Python list), its
labels and a copy of the class-pair sampler, and each reader computed its epoch plan itself; now it holds
file names: the index is mapped from files written once per loader (``MappedIndex``) and the plan from a
file the loader writes per epoch. "before" reproduces the old payload and the old reader's first steps
below; "after" is the real ``DaliTrainLoader._source``. Both run side by side in this one run, each
reader in a fresh spawned process (as DALI starts them), alternating, median of the repeats.

A reader's start is: receive the pickled bytes, unpickle, get the epoch plan, look up its first file's
path and label (the file read and decode that follow are the same either way). Its memory is the growth
of its resident set over that start, and the private part of it (``Private_*`` in smaps_rollup: pages no
other reader shares; a mapped file's pages are in the page cache once for all readers of the machine).

    python benchmarks/dali_index.py [--images 1281167] [--ranks 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import pickle
import statistics
import time

import numpy as np

from timm_cskd.config import parse_args
from timm_cskd.data import ImageIndex
from timm_cskd.data.dali import DaliTrainLoader
from timm_cskd.data.dali.source import flat_plan
from timm_cskd.data.loader import create_batch_sampler

DATA_CONFIG = {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 0.875}


class OldReader:
    """What the old ``PlanSource`` carried into each reader, and what it did first."""

    def __init__(self, index: ImageIndex, sampler, epoch: int):
        self.root, self.paths, self.labels = index.root, index.paths, index.labels
        self.sampler, self.epoch = copy.copy(sampler), epoch

    def first_sample(self) -> tuple[str, int]:
        self.sampler.set_epoch(self.epoch)
        plan = flat_plan(self.sampler, 0)
        return f"{self.root}/{self.paths[plan[0]]}", int(self.labels[plan[0]])


def new_first_sample(source) -> tuple[str, int]:
    plan = source._plan_for(0)
    return source.files.index.full_path(plan[0]), int(source.files.index.labels[plan[0]])


def memory_mib() -> tuple[float, float]:
    """(resident, private) MiB of this process."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0])
    return fields["Rss"] / 1024, (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def reader(conn) -> None:
    before = memory_mib()
    conn.send("ready")
    start = time.perf_counter()
    source = pickle.loads(conn.recv_bytes())
    first = source.first_sample() if isinstance(source, OldReader) else new_first_sample(source)
    seconds = time.perf_counter() - start
    after = memory_mib()
    conn.send((seconds, after[0] - before[0], after[1] - before[1], first))


def run_reader(payload: bytes):
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=reader, args=(child,))
    process.start()
    assert parent.recv() == "ready"
    parent.send_bytes(payload)
    result = parent.recv()
    process.join()
    return result


def synthetic_index(n: int, classes: int = 1000) -> ImageIndex:
    labels = np.sort(np.arange(n) % classes)
    paths = [f"n{y:08d}/n{y:08d}_{i}.JPEG" for i, y in enumerate(labels)]  # ImageNet's path lengths
    return ImageIndex("/imagenet/train", paths, labels, [f"n{c:08d}" for c in range(classes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    index = synthetic_index(args.images)
    sampler = create_batch_sampler(index, "anchor", args.batch_size, num_replicas=args.ranks, rank=0, seed=0)
    dali_args = parse_args(["--data-dir", "unused", "-b", str(args.batch_size), "-j", "1"])
    start = time.perf_counter()
    loader = DaliTrainLoader(index, sampler, DATA_CONFIG, dali_args, None, seed=0)
    write_index = time.perf_counter() - start
    start = time.perf_counter()
    new_source = loader._source(3, 0)  # writes epochs 3 and 4's plans
    write_plans = time.perf_counter() - start
    payloads = {
        "before": pickle.dumps(OldReader(index, sampler, 3)),
        "after": pickle.dumps(new_source),
    }
    results = {name: [] for name in payloads}
    for _ in range(args.repeats):
        for name, payload in payloads.items():
            results[name].append(run_reader(payload))
    firsts = {name: rows[0][3] for name, rows in results.items()}
    assert firsts["before"] == firsts["after"], firsts

    print(
        f"{args.images:,} images, {args.ranks} ranks, rank 0's plan, -b {args.batch_size} anchors; "
        f"median of {args.repeats} readers each"
    )
    print(
        f"once per loader (rank): write the mapped index {write_index:.2f} s; two epoch plans {write_plans:.3f} s"
    )
    print("| reader | payload bytes | start s | RSS growth MiB | private MiB |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, rows in results.items():
        medians[name] = [statistics.median(row[k] for row in rows) for k in range(3)]
        seconds, rss, private = medians[name]
        print(f"| {name} | {len(payloads[name]):,} | {seconds:.3f} | {rss:.1f} | {private:.1f} |")
    (b_s, b_rss, b_priv), (a_s, a_rss, a_priv) = medians["before"], medians["after"]
    print(
        f"before/after: payload {len(payloads['before']) / len(payloads['after']):,.0f}x, start "
        f"{b_s / a_s:.1f}x, RSS growth {b_rss / max(a_rss, 0.1):.1f}x, private {b_priv / max(a_priv, 0.1):.1f}x"
    )


if __name__ == "__main__":
    main()
