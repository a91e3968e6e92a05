"""A generated ImageFolder for the trainer rows: smooth random JPEGs at ImageNet's common sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# ImageNet's most common sizes (landscape, portrait, wide); --smoke uses tiny images instead.
PHOTO_SIZES = [(500, 375), (375, 500), (500, 333)]


def _image(rng: np.random.Generator, size: tuple[int, int], tint: np.ndarray) -> Image.Image:
    """Low-frequency colour fields plus mild noise: compresses and decodes like a photograph, not like
    white noise (which JPEG cannot compress)."""
    coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.float32) * 0.6 + tint * 0.4
    img = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_image_folder(
    root: Path, classes: int, train_per_class: int, val_per_class: int, sizes: list[tuple[int, int]]
) -> Path:
    """``root/train`` and ``root/val``, class folders ``class_000``..., JPEG quality 90. Each class has
    its own tint, so a few steps of training lower the loss."""
    rng = np.random.default_rng(0)
    tints = rng.integers(0, 256, (classes, 3)).astype(np.float32)
    n = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _image(rng, sizes[n % len(sizes)], tints[c]).save(folder / f"img_{i:04d}.jpg", quality=90)
                n += 1
    return root
