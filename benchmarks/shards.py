"""Tar shards against the same images as an ImageFolder, on the same disk; and a rank's plan at scale.

1. Loader throughput: ``--images`` generated JPEGs (``--size`` px, ImageNet-like noise) as a folder and
   as shards (``python -m timm_cskd.data.shards``); the torch dataset (``ImageIndexDataset``, decode +
   timm's training transform to uint8) and the raw reads alone, each in the plan's shuffled order.
   "cold": every file's pages evicted first (``posix_fadvise(DONTNEED)``, these files only: no root,
   nothing else on the machine dropped); "warm": the same pass again.
2. A rank's start on ImageNet's size: ``load_shard_index`` of rank 0 of ``--ranks`` over a 1.28M-sample,
   1,000-class manifest (its own shards' index files only), building its ``RankClassPairSampler`` and
   one epoch's plan.

    python benchmarks/shards.py [--images 2000] [--size 320] [--ranks 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from timm.data import create_transform

from timm_cskd.data import build_index
from timm_cskd.data.loader import ImageIndexDataset
from timm_cskd.data.shard_index import load_shard_index, rank_shards
from timm_cskd.data.shards import write_shards
from timm_cskd.shard_sampler import RankClassPairSampler


def make_folder(root: Path, images: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        pixels = np.kron(base, np.ones((8, 8, 1), np.uint8)) + rng.integers(
            0, 24, (size, size, 3), dtype=np.uint8
        )
        Image.fromarray(pixels).save(folder / f"img_{i:06d}.jpg", quality=90)


def evict(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # dirty pages (a file just written) are not evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def rate(index, order, decode: bool) -> float:
    dataset = ImageIndexDataset(index, create_transform(224, is_training=True, use_prefetcher=True))
    start = time.perf_counter()
    for i in order:
        if decode:
            dataset[int(i)]
        elif hasattr(index, "read_bytes"):
            index.read_bytes(int(i))
        else:
            Path(index.full_path(int(i))).read_bytes()
    return len(order) / (time.perf_counter() - start)


def throughput(args, work: Path) -> None:
    make_folder(work / "folder", args.images, args.size)
    write_shards(work / "folder", work / "shards", 64 * 2**20, splits=("train",), progress=lambda _: None)
    folder, shards = build_index(work / "folder" / "train"), load_shard_index(work / "shards", "train")
    folder_files = [folder.full_path(i) for i in range(len(folder))]
    shard_files = [str(work / "shards" / t) for t in shards.tars]
    megabytes = sum(os.path.getsize(f) for f in folder_files) / 2**20
    print(f"{args.images} JPEGs of {args.size}px ({megabytes:.0f} MiB) in {len(shards.tars)} shard(s)\n")
    print("| pass | work | folder img/s | shards img/s | shards / folder |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    for decode in (False, True):
        order = rng.permutation(len(folder))  # a plan's order: random access in both layouts
        for cache in ("cold", "warm"):
            results = {}
            for name, index, files in (("folder", folder, folder_files), ("shards", shards, shard_files)):
                if cache == "cold":
                    evict(files)
                results[name] = rate(index, order, decode)
            work_name = "decode + transform" if decode else "read bytes"
            print(f"| {cache} | {work_name} | {results['folder']:.0f} | {results['shards']:.0f} | "
                  f"{results['shards'] / results['folder']:.2f} |")  # fmt: skip


def plan_at_scale(args, work: Path) -> None:
    """Rank 0's share of a synthetic 1.28M-sample manifest: only its shards' index files exist."""
    samples, classes, per_shard = 1_281_167, 1000, 1_281_167 // (4 * args.ranks) + 1
    num_shards = -(-samples // per_shard)
    rng = np.random.default_rng(0)
    folder = work / "scale"
    folder.mkdir()
    listed = []
    for s in range(num_shards):
        count = min(per_shard, samples - s * per_shard)
        listed.append({"tar": f"train-{s:06d}.tar", "index": f"train-{s:06d}.json", "samples": count})
    for s in rank_shards(num_shards, 0, args.ranks):
        count = listed[s]["samples"]
        (folder / listed[s]["tar"]).touch()
        keys = [f"{s * per_shard + j:08d}" for j in range(count)]
        entries = {"keys": keys, "ext": ["jpg"] * count, "offsets": list(range(512, 512 + 1024 * count, 1024)),
                   "sizes": [110_000] * count, "labels": rng.integers(0, classes, count).tolist(),
                   "sources": [f"n{k}.JPEG" for k in keys]}  # fmt: skip
        (folder / listed[s]["index"]).write_text(json.dumps(entries))
    manifest = {"format": "timm-cskd-shards", "version": 1, "classes": [f"n{c:08d}" for c in range(classes)],
                "splits": {"train": {"samples": samples, "shards": listed}}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    start = time.perf_counter()
    index = load_shard_index(folder, "train", rank_shards(num_shards, 0, args.ranks))
    loaded = time.perf_counter()
    sampler = RankClassPairSampler(index.labels, 32, rank=0, world_size=args.ranks)
    built = time.perf_counter()
    sampler.rank_plan()
    planned = time.perf_counter()
    print(f"\nrank 0 of {args.ranks}: {len(index)} samples from {len(index.tars) and len(set(index.shard.tolist()))} "
          f"of {num_shards} shards, {len(np.unique(index.labels))} classes, "
          f"{np.bincount(index.labels, minlength=classes).min()} images in its rarest class")  # fmt: skip
    print("| step | seconds |\n|---|---|")
    print(f"| read its shard index files | {loaded - start:.3f} |")
    print(f"| build RankClassPairSampler | {built - loaded:.3f} |")
    print(f"| one epoch's plan | {planned - built:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--ranks", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        throughput(args, Path(tmp))
        plan_at_scale(args, Path(tmp))


if __name__ == "__main__":
    main()
