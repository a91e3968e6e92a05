"""Loader throughput on JPEG photographs: timm's own loader (with and without its prefetcher), this
project's torch backend on its former float path and on its uint8 path, and DALI, side by side.

By default the images are real photographs: crops of scikit-learn's two sample photos (640x427) resized
to ImageNet's common sizes (500x375, 375x500, 500x333, a tail of 800x600 and 1024x768), saved at JPEG
quality 85-95; ``--source textures`` writes the older synthetic colour fields instead. Every loader runs
timm train.py's default augmentation (random-resized crop 224, flip, colour jitter 0.4, random
bilinear/bicubic) with the same number of worker processes (DALI: CPU threads and as many reader
processes), rounds interleaved, on the CPU here (``--device cuda`` on a GPU machine; DALI then decodes
with nvJPEG). Printed per loader: images/s, images/s per worker, and the bytes per image that leave the
workers (what the main process receives, pins and copies to the device), and the CPU time per image
of the main process and its workers together (steadier than wall time on a shared machine).

- timm create_loader, no prefetcher: float32 normalised in the workers (timm's ``--no-prefetcher``).
- timm create_loader + PrefetchLoader: uint8 from the workers, normalised by the PrefetchLoader (timm's
  default; on the CPU it runs without a stream, as timm allows).
- timm-cskd float path: this project's loader before the uint8 change (kept here only): the float
  transform under the same per-sample seeding.
- timm-cskd uint8 path: ``create_train_loader`` as the trainer builds it (uint8 + device prep).
- DALI: ``--data-backend dali`` (its output is normalised float32 on the device).

It also prints what seeding each sample's augmentation costs (``seeded_rngs``) in a loader worker, where the
generators are the worker's own and only seeded, and in the main process (``-j 0``), which saves and restores
python's, NumPy's and torch's states around each sample.

``--draft`` also measures what decoding at reduced scale (PIL ``Image.draft``, JPEG DCT scaling) would
save where the random-resized crop is at least twice the output size on both sides.

    python benchmarks/loader.py --workers 2
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_loader, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.loader import (
    ImageIndexDataset,
    SeededBatches,
    SignalSafeDataLoader,
    build_device_preps,
    build_transforms,
    create_batch_sampler,
    create_train_loader,
    init_loader_worker,
    seeded_rngs,
    train_transform_kwargs,
)
from timm_cskd.distributed import Context

DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
}
# ImageNet's common sizes, most to least frequent, with the share of files each gets.
PHOTO_SIZES = [
    ((500, 375), 0.45),
    ((375, 500), 0.2),
    ((500, 333), 0.2),
    ((800, 600), 0.1),
    ((1024, 768), 0.05),
]


def make_photo_folder(root: Path, classes: int, per_class: int) -> Path:
    """Random crops of the two scikit-learn sample photographs, resized to ImageNet's common sizes."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    sizes, shares = zip(*PHOTO_SIZES)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            photo = photos[rng.integers(len(photos))]
            w, h = sizes[rng.choice(len(sizes), p=shares)]
            # The largest crop of the photo with the target's aspect ratio, shrunk by up to 30%.
            cw = min(photo.width, photo.height * w / h) * rng.uniform(0.7, 1.0)
            ch = cw * h / w
            left, top = rng.uniform(0, photo.width - cw), rng.uniform(0, photo.height - ch)
            crop = photo.resize((w, h), Image.BICUBIC, box=(left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{i:05d}.JPEG", quality=int(rng.integers(85, 96)))
    return root


def make_texture_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
    """Smooth colour fields with texture, so JPEG sizes resemble photos (~40-60 KB at 500x375)."""
    rng = np.random.default_rng(0)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            a, b, phase = rng.uniform(2, 12, 3)
            base = np.stack([np.sin(a * xx + phase), np.cos(b * yy), np.sin(a * xx * yy * 3)], -1)
            pixels = (base * 90 + 128 + rng.normal(0, 18, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.JPEG", quality=90)
    return root


def float_path_loader(index, cfg, device):
    """This project's torch loader before the uint8 change: the float transform (ToTensor + Normalize in
    the workers) with the same per-sample seeding, pageable unless on CUDA, copied by the consumer."""
    transform = create_transform(**train_transform_kwargs(cfg, DATA_CONFIG))
    sampler = create_batch_sampler(index, "plain", cfg.batch_size, num_replicas=1, rank=0, seed=cfg.seed)
    return SignalSafeDataLoader(
        ImageIndexDataset(index, transform),
        batch_sampler=SeededBatches(sampler, cfg.seed, 0),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=init_loader_worker,
        generator=torch.Generator(),
        persistent_workers=cfg.workers > 0,
    )


def timm_loader(root, cfg, device, prefetcher: bool):
    """timm train.py's loader for the same flags (its default augmentation, random erasing off)."""
    return create_loader(
        ImageDataset(str(root)),
        input_size=DATA_CONFIG["input_size"],
        batch_size=cfg.batch_size,
        is_training=True,
        re_prob=cfg.reprob,
        color_jitter=cfg.color_jitter,
        interpolation=cfg.train_interpolation,
        mean=DATA_CONFIG["mean"],
        std=DATA_CONFIG["std"],
        num_workers=cfg.workers,
        device=device,
        use_prefetcher=prefetcher,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )


def shipped_bytes(loader) -> float:
    """Bytes per image of one batch as it leaves the workers (the prefetchers' inner loaders)."""
    images, *rest = next(iter(getattr(loader, "loader", loader)))
    extra = sum(t.nbytes for t in rest[1:])  # the uint8 path's per-sample seeds
    return (images.nbytes + extra) / len(images)


def cpu_seconds() -> float:
    """CPU time of this process and its children (loader workers, DALI readers), reaped or alive: on a
    shared machine a steadier measure of a loader's cost than wall time."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = {os.getpid()}
    for children in Path("/proc/self/task").glob("*/children"):
        pids.update(int(p) for p in children.read_text().split())
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a worker that just exited: counted below once reaped
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    reaped = os.times()
    return total + reaped.children_user + reaped.children_system


def epoch_rate(loader, epoch: int, device: torch.device) -> tuple[float, float]:
    """Images/s (wall) and CPU milliseconds per image over one epoch."""
    sampler = loader.batch_sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    images_seen = 0
    start, cpu = time.perf_counter(), cpu_seconds()
    for images, *_ in loader:
        images = images.to(device, non_blocking=True)
        images_seen += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_seen / (time.perf_counter() - start), 1e3 * (cpu_seconds() - cpu) / images_seen


def _seeding_us(calls: int) -> float:
    start = time.perf_counter()
    for seed in range(calls):
        with seeded_rngs(seed):
            pass
    return 1e6 * (time.perf_counter() - start) / calls


class _SeedingInWorker(torch.utils.data.Dataset):
    def __init__(self, calls: int):
        self.calls = calls

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _index: int) -> float:
        return _seeding_us(self.calls)


def seeding_cost(calls: int = 2000) -> str:
    """Microseconds per sample of ``seeded_rngs`` in a loader worker and in the main process (best of 3)."""
    loader = torch.utils.data.DataLoader(_SeedingInWorker(calls), batch_size=None, num_workers=1)
    worker = min(float(next(iter(loader))) for _ in range(3))
    main_process = min(_seeding_us(calls) for _ in range(3))
    return (
        f"per-sample seeding: {worker:.1f} us in a loader worker, {main_process:.1f} us in the main process "
        "(-j 0: python, NumPy and torch states saved and restored)"
    )


def draft_savings(index, samples: int = 400) -> str:
    """What PIL's reduced-scale JPEG decoding would save: per file, the crop timm's random-resized crop
    draws (area 8-100%, ratio 3/4-4/3); where it is at least 2x the 224 output on both sides the file
    could be decoded at 1/2 (1/4, 1/8) scale. Times full decodes against those draft decodes."""
    rrc = RandomResizedCropAndInterpolation(224)
    rng = np.random.default_rng(0)
    full_s = draft_s = 0.0
    reducible = 0
    for _ in range(samples):
        path = index.full_path(int(rng.integers(len(index))))
        with Image.open(path) as img:
            _, _, ch, cw = rrc.get_params(img, rrc.scale, rrc.ratio)
        factor = 2 ** min(3, int(math.log2(max(min(cw, ch) / 224, 1))))
        start = time.perf_counter()
        with Image.open(path) as img:
            img.convert("RGB")
        full = time.perf_counter() - start
        full_s += full
        if factor == 1:
            draft_s += full
            continue
        reducible += 1
        start = time.perf_counter()
        with Image.open(path) as img:
            img.draft("RGB", (math.ceil(img.width / factor), math.ceil(img.height / factor)))
            img.convert("RGB")
        draft_s += time.perf_counter() - start
    return (
        f"draft decoding: {reducible}/{samples} random-resized crops are >= 2x 224 px on both sides; "
        f"decode time {1e3 * full_s / samples:.2f} ms/image full, {1e3 * draft_s / samples:.2f} ms/image "
        f"with draft where it applies ({100 * (1 - draft_s / full_s):.1f}% of decoding saved)"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="loader processes (DALI threads and readers) for each"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--source", choices=("photos", "textures"), default="photos")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--width", type=int, default=500, help="textures only")
    parser.add_argument("--height", type=int, default=375, help="textures only")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-dali", action="store_true", help="leave DALI out (not installed)")
    parser.add_argument("--draft", action="store_true", help="also measure reduced-scale JPEG decoding")
    parser.add_argument("--data-dir", default=None, help="an existing ImageFolder instead of a generated one")
    args = parser.parse_args()

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            root = Path(args.data_dir)
        elif args.source == "photos":
            root = make_photo_folder(Path(tmp) / "train", args.classes, args.per_class)
        else:
            root = make_texture_folder(
                Path(tmp) / "train", args.classes, args.per_class, (args.width, args.height)
            )
        index = build_index(root)
        # Plain shuffled batches for all (timm's loader has no class-pair plan; the per-image work is the
        # same) and workers kept across epochs: steady-state throughput, worker start-up left out.
        cfg = parse_args(
            ["--data-dir", str(root), "-b", str(args.batch_size), "-j", str(args.workers), "--seed", "0",
             "--use-multi-epochs-loader"]
        )  # fmt: skip
        train_tf, _ = build_transforms(cfg, DATA_CONFIG)
        loaders = {
            "timm create_loader, no prefetcher (float32)": timm_loader(root, cfg, device, prefetcher=False),
            "timm create_loader + PrefetchLoader (uint8)": timm_loader(root, cfg, device, prefetcher=True),
            "timm-cskd torch, float path (before)": float_path_loader(index, cfg, device),
            "timm-cskd torch, uint8 + device prep (after)": create_train_loader(
                index,
                train_tf,
                cfg,
                batches="plain",
                num_replicas=1,
                rank=0,
                preps=build_device_preps(cfg, DATA_CONFIG, None, device),
                pin_memory=device.type == "cuda",
                seed=cfg.seed,
            ),
        }
        if not args.no_dali:
            from timm_cskd.data import dali

            loaders["DALI (float32 out)"] = dali.create_dali_loaders(
                cfg, index, None, DATA_CONFIG, Context(device), "plain", seed=cfg.seed
            )[0]
        sizes = {name: shipped_bytes(loader) for name, loader in loaders.items() if "DALI" not in name}
        sizes["DALI (float32 out)"] = 4 * 3 * 224 * 224
        rates = {name: [] for name in loaders}
        for loader in loaders.values():  # warm-up: worker start, pipeline build, page cache
            epoch_rate(loader, 0, device)
        names = list(loaders)
        for r in range(args.rounds):
            # Each round starts with another loader, so that a neighbour's load spreads over them all.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(epoch_rate(loaders[name], r + 1, device))
        draft = draft_savings(index) if args.draft else None
        seeding = seeding_cost()
        kb = sum(Path(index.full_path(i)).stat().st_size for i in range(len(index))) / 1e3 / len(index)

    source = args.data_dir or (
        "photo crops (500x375, 375x500, 500x333, 800x600, 1024x768; quality 85-95)"
        if args.source == "photos"
        else f"textures {args.width}x{args.height}"
    )
    print(f"{len(index)} JPEGs: {source}, {kb:.0f} KB each; 224 px output, "
          f"batch {args.batch_size} images, {args.workers} workers each, device {device}, "
          f"best of {args.rounds} epochs")  # fmt: skip
    print("| loader | images/s | images/s per worker | vs timm prefetcher | CPU ms/image (median) | "
          "bytes/image shipped |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    base = max(r for r, _ in rates["timm create_loader + PrefetchLoader (uint8)"])
    for name, values in rates.items():
        best = max(r for r, _ in values)
        cpu = float(np.median([c for _, c in values]))
        print(
            f"| {name} | {best:.0f} | {best / args.workers:.0f} | {best / base:.2f}x | {cpu:.1f} "
            f"| {sizes[name]:,.0f} |"
        )
    print(seeding)
    if draft:
        print(draft)


if __name__ == "__main__":
    main()
