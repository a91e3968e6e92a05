"""Loader throughput: the DALI pipeline vs the torch/PIL loader (timm transforms), side by side.

Both read the same generated ImageFolder of ImageNet-sized JPEGs (500x375 by default) through the same
ClassPairSampler plan and emit normalised 224 px float batches ``[anchors; partners]``; the same number
of worker processes/threads each, rounds interleaved. DALI runs its CPU operators here; on a GPU
machine pass --device cuda for nvJPEG (mixed) decoding.

    python benchmarks/loader.py --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.loader import build_transforms, create_train_loader
from timm_cskd.distributed import Context

DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
}


def make_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
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


def epoch_rate(loader, sampler, epoch: int, device: torch.device) -> float:
    sampler.set_epoch(epoch)
    images_seen = 0
    start = time.perf_counter()
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        images_seen += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="torch loader processes = DALI threads and workers"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="anchors per batch (as many partners)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="an existing ImageFolder instead of a generated one")
    args = parser.parse_args()

    from timm_cskd.data import dali

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = (
            Path(args.data_dir)
            if args.data_dir
            else make_folder(Path(tmp) / "train", args.classes, args.per_class, (args.width, args.height))
        )
        index = build_index(root)
        cfg = parse_args(
            ["--data-dir", str(root), "-b", str(args.batch_size), "-j", str(args.workers), "--seed", "0"]
        )
        train_tf, _ = build_transforms(cfg, DATA_CONFIG)
        torch_loader = create_train_loader(
            index, train_tf, cfg, batches="anchor", num_replicas=1, rank=0, pin_memory=device.type == "cuda"
        )
        dali_loader, _ = dali.create_dali_loaders(cfg, index, None, DATA_CONFIG, Context(device))
        loaders = {"torch/PIL (timm transforms)": torch_loader, "DALI": dali_loader}
        rates = {name: [] for name in loaders}
        for loader in loaders.values():  # warm-up: worker start, pipeline build
            epoch_rate(loader, loader.batch_sampler, 0, device)
        for r in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(epoch_rate(loader, loader.batch_sampler, r + 1, device))

    sizes = f"{args.width}x{args.height}" if not args.data_dir else args.data_dir
    print(f"{len(index)} JPEGs ({sizes}), 224 px output, batch {2 * args.batch_size} images, "
          f"{args.workers} workers/threads each, device {device}, best of {args.rounds} epochs")  # fmt: skip
    print("| loader | images/s | images/s per worker | vs torch/PIL |")
    print("|---|---|---|---|")
    base = max(rates["torch/PIL (timm transforms)"])
    for name, values in rates.items():
        best = max(values)
        print(f"| {name} | {best:.0f} | {best / args.workers:.0f} | {best / base:.2f}x |")


if __name__ == "__main__":
    main()
