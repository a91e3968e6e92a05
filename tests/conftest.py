import numpy as np
import pytest
from PIL import Image

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


def make_tiny_dataset(root, val_per_class=5, val_split="val"):
    """Four coloured classes of 12 noisy 24x20 training images and ``val_per_class`` validation images
    each: a training test runs in seconds and its loss still falls. Returns ``root``."""
    make_image_folder(root / "train", [12] * 4, size=(24, 20), colours=COLOURS, noise=60)
    make_image_folder(root / val_split, [val_per_class] * 4, size=(24, 20), colours=COLOURS, noise=60)
    return root


def make_image_folder(root, class_sizes, size=(40, 32), colours=None, ext=".jpg", noise=0):
    """Write an ImageFolder tree; class c's images are its colour (default distinct per class) plus
    uniform pixel noise of +-``noise``, so that images of one class differ."""
    rng = np.random.default_rng(0)
    for c, n in enumerate(class_sizes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = colours[c] if colours else tuple(int(v) for v in rng.integers(0, 256, 3))
        for i in range(n):
            pixels = np.broadcast_to(np.asarray(colour, dtype=np.int16), (size[1], size[0], 3))
            if noise:
                pixels = pixels + rng.integers(-noise, noise + 1, pixels.shape)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:04d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data", [3, 1, 5])


# The trainer's defaults before it adopted timm train.py's (warmup 5, smoothing 0.1, colour jitter 0.4,
# random interpolation, Nesterov SGD, weight decay 2e-5): tiny 3-epoch runs on colour-coded images need
# the plain recipe to learn reliably.
PLAIN_RECIPE = [
    "--warmup-epochs", "0", "--smoothing", "0", "--color-jitter", "0", "--train-interpolation", "bilinear",
    "--opt", "momentum", "--weight-decay", "1e-4",
]  # fmt: skip
