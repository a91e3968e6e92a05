"""Write MNIST, Fashion-MNIST or CIFAR-10/100 files already on disk as ImageFolder trees for the trainer.

    python -m timm_cskd.data.prepare --source /usr/share/datasets/fashion-mnist --output data/fmnist \\
        --train-per-class 50 --calib-per-class 100

reads the original distribution files (MNIST-format ``*-idx3-ubyte`` / ``*-idx1-ubyte``, plain or
gzipped; CIFAR's ``cifar-10-batches-py`` / ``cifar-100-python`` pickles) and writes lossless PNGs:

    OUTPUT/train/<class>/<i>.png   the training images (or --train-per-class of each class)
    OUTPUT/calib/<class>/<i>.png   --calib-per-class held out from train, for temperature scaling
    OUTPUT/val/<class>/<i>.png     the test images (or --val-per-class of each class)
    OUTPUT/prepare.json            source, format, seed and per-class counts

Class folders are the class names prefixed by a zero-padded label (``00_t-shirt_top``), so their sorted
order, which is how ``timm_cskd.data.build_index`` assigns labels, is the dataset's label order. ``<i>`` is
the image's position in the source's train (``train/``, ``calib/``) or test (``val/``) arrays. Subsets are
drawn per class from ``--seed``; calibration images come first in each class's draw, so the calibration
split does not change with --train-per-class, and smaller training subsets are nested in larger ones.
The CS-KD paper's fine-grained datasets hold tens of training images per class (Yun et al., CVPR 2020).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from timm_cskd.invocation import program_name

__all__ = ["FORMATS", "PrepareError", "SourceDataset", "load_source", "prepare_dataset", "read_idx", "main"]

FORMATS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
MNIST_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
SPLITS = ("train", "calib", "val")
# Element types of the idx format (big-endian), keyed by the third byte of the magic number.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
PROGRESS_EVERY = 5000


class PrepareError(ValueError):
    """The source files or the output folder are unusable; the message names the file or flag at fault."""


@dataclass
class SourceDataset:
    """A dataset's train and test arrays: images (N, H, W) or (N, H, W, 3) uint8, labels (N,) int64."""

    fmt: str
    folder: Path
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip's magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise PrepareError(f"{path}: corrupt gzip data ({e})") from e
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format, plain or gzipped): magic ``00 00 <type> <ndim>``, ``ndim``
    big-endian uint32 sizes, then the elements in row-major order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise PrepareError(
            f"{path}: not an idx file (magic number {data[:4].hex() or 'missing'}; expected 0000 then a type "
            f"byte in {', '.join(f'{t:02x}' for t in IDX_DTYPES)} and the number of dimensions)"
        )
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PrepareError(
            f"{path}: truncated idx header ({len(data)} bytes, {ndim} dimensions need {header})"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise PrepareError(
            f"{path}: header says {'x'.join(map(str, shape))} {dtype.name} ({expected} bytes) "
            f"but {len(data) - header} bytes follow"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, split: str, kind: str, ndim: int) -> Path:
    # The files are distributed as train-images-idx3-ubyte.gz; some mirrors spell train-images.idx3-ubyte.
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = folder / f"{split}-{kind}{sep}idx{ndim}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    raise PrepareError(f"no {split}-{kind}-idx{ndim}-ubyte[.gz] in {folder}")


def _load_idx_pair(folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images_file = _find_idx(folder, split, "images", 3)
    labels_file = _find_idx(folder, split, "labels", 1)
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise PrepareError(
            f"{images_file}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise PrepareError(f"{labels_file}: expected (N,) uint8 labels, got {labels.shape} {labels.dtype}")
    if len(images) != len(labels):
        raise PrepareError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
    return images, _check_labels(labels, num_classes, labels_file)


def _check_labels(labels, num_classes: int, path: Path) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PrepareError(f"{path}: labels outside [0, {num_classes})")
    return labels


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's files are pickles: unpickle dicts, lists and numpy arrays only, never arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 pickles bytes under Python 3
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise PrepareError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            # latin1 reads the Python 2 pickles CIFAR ships (str keys, numpy arrays intact).
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # pickle raises UnpicklingError, EOFError, ValueError, ...
        raise PrepareError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise PrepareError(f"{path}: not a CIFAR python pickle (holds a {type(obj).__name__}, not a dict)")
    return obj


def _load_cifar_batches(paths: list[Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        key = "labels" if "labels" in batch else "fine_labels"
        if "data" not in batch or key not in batch:
            raise PrepareError(
                f"{path}: expected keys 'data' and 'labels' or 'fine_labels', got {sorted(batch)}"
            )
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise PrepareError(f"{path}: expected (N, 3072) uint8 'data', got {data.shape} {data.dtype}")
        if len(batch[key]) != len(data):
            raise PrepareError(f"{path}: {len(data)} images but {len(batch[key])} {key}")
        # Each row holds the red, green and blue 32x32 planes in turn.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(_check_labels(batch[key], num_classes, path))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _cifar_folder(source: Path, fmt: str) -> Path:
    name = "cifar-10-batches-py" if fmt == "cifar10" else "cifar-100-python"
    return source / name if (source / name).is_dir() else source


def detect_format(source: str | os.PathLike) -> str:
    """CIFAR-10/100 from their meta files; idx files are Fashion-MNIST when the folder's path says
    'fashion', MNIST when it says 'mnist' (the files themselves do not tell the two apart)."""
    source = Path(source)
    if (_cifar_folder(source, "cifar10") / "batches.meta").is_file():
        return "cifar10"
    if (_cifar_folder(source, "cifar100") / "meta").is_file():
        return "cifar100"
    if any(source.glob("train-images?idx3-ubyte*")):
        path = str(source.resolve()).lower()
        if "fashion" in path:
            return "fashion-mnist"
        if "mnist" in path:
            return "mnist"
        raise PrepareError(f"{source} holds idx files: pass --format mnist or --format fashion-mnist")
    raise PrepareError(
        f"cannot tell the dataset in {source}: expected MNIST-format idx files, CIFAR-10's batches.meta "
        "or CIFAR-100's meta (or pass --format)"
    )


def load_source(source: str | os.PathLike, fmt: str | None = None) -> SourceDataset:
    """Read a dataset's original files from ``source`` (``fmt`` detected when None)."""
    source = Path(source)
    if not source.is_dir():
        raise PrepareError(f"--source {source} is not a folder")
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise PrepareError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt in ("mnist", "fashion-mnist"):
        classes = MNIST_CLASSES if fmt == "mnist" else FASHION_MNIST_CLASSES
        train = _load_idx_pair(source, "train", len(classes))
        test = _load_idx_pair(source, "t10k", len(classes))
        return SourceDataset(fmt, source, classes, *train, *test)
    folder = _cifar_folder(source, fmt)
    meta_file, names_key = (
        (folder / "batches.meta", "label_names")
        if fmt == "cifar10"
        else (folder / "meta", "fine_label_names")
    )
    meta = _unpickle(meta_file)
    if names_key not in meta:
        raise PrepareError(f"{meta_file}: no '{names_key}' (is this {fmt}?)")
    classes = [str(c) for c in meta[names_key]]
    train_files = (
        [folder / f"data_batch_{i}" for i in range(1, 6)] if fmt == "cifar10" else [folder / "train"]
    )
    test_files = [folder / ("test_batch" if fmt == "cifar10" else "test")]
    train = _load_cifar_batches(train_files, len(classes))
    test = _load_cifar_batches(test_files, len(classes))
    return SourceDataset(fmt, folder, classes, *train, *test)


def class_folder_names(classes: list[str]) -> list[str]:
    """``00_t-shirt_top``: a zero-padded label, so that sorted folder order is label order, and the name."""
    width = max(2, len(str(len(classes) - 1)))
    return [
        f"{i:0{width}d}_{re.sub(r'[^a-z0-9-]+', '_', name.lower()).strip('_')}"
        for i, name in enumerate(classes)
    ]


def _draw(labels: np.ndarray, classes: list[str], sizes: list[int | None], rng_key: tuple, request: str):
    """Per class, consecutive chunks of one seeded permutation of its images: ``sizes[k]`` images for
    part k, None for all that remain (at least one). Returns each part's indices, sorted."""
    parts = [[] for _ in sizes]
    for c, name in enumerate(classes):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([*rng_key, c]).permutation(members)
        start = 0
        for k, size in enumerate(sizes):
            stop = len(order) if size is None else start + size
            if stop > len(order) or stop == start:
                raise PrepareError(f"class {c} ({name}) has {len(members)} images, too few for {request}")
            parts[k].append(order[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]


def _write_split(folder: Path, images, labels, indices, class_dirs, progress) -> dict[str, int]:
    width = max(5, len(str(len(images) - 1)))
    for name in class_dirs:
        (folder / name).mkdir(parents=True)
    for done, i in enumerate(indices, 1):
        Image.fromarray(images[i]).save(folder / class_dirs[labels[i]] / f"{i:0{width}d}.png")
        if progress and (done % PROGRESS_EVERY == 0 or done == len(indices)):
            progress(f"{folder.name}: {done}/{len(indices)} images")
    counts = np.bincount(labels[indices], minlength=len(class_dirs))
    return {name: int(n) for name, n in zip(class_dirs, counts)}


def _check_output(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not output.is_dir():
        raise PrepareError(f"--output {output} is a file")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise PrepareError(f"--output {output} is not empty: pass --overwrite to replace it")
    if not (output / "prepare.json").is_file():
        # --overwrite deletes the folder, so only one this tool wrote.
        raise PrepareError(
            f"--output {output} is not empty and holds no prepare.json: refusing to replace it"
        )


def prepare_dataset(
    source: str | os.PathLike,
    output: str | os.PathLike,
    fmt: str | None = None,
    train_per_class: int | None = None,
    calib_per_class: int = 0,
    val_per_class: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Write ``source``'s dataset under ``output`` as ImageFolder trees; returns what prepare.json holds.

    ``train_per_class`` None keeps every training image that calibration leaves; ``val_per_class`` None
    keeps the whole test set. The trees are written beside ``output`` and renamed into place, so an
    interrupted run leaves no partial dataset behind.
    """
    for flag, value in (("--train-per-class", train_per_class), ("--val-per-class", val_per_class)):
        if value is not None and value < 1:
            raise PrepareError(f"{flag} must be >= 1, got {value}")
    if calib_per_class < 0:
        raise PrepareError(f"--calib-per-class must be >= 0, got {calib_per_class}")
    if seed < 0:
        raise PrepareError(f"--seed must be >= 0, got {seed}")
    output = Path(output)
    _check_output(output, overwrite)
    data = load_source(source, fmt)
    train_request = f"--train-per-class {train_per_class}" if train_per_class else "one training image"
    if calib_per_class:
        calib, train = _draw(
            data.train_labels,
            data.classes,
            [calib_per_class, train_per_class],
            (seed, 0),
            f"--calib-per-class {calib_per_class} plus {train_request}",
        )
    else:
        calib, (train,) = (
            None,
            _draw(data.train_labels, data.classes, [train_per_class], (seed, 0), train_request),
        )
    val_request = f"--val-per-class {val_per_class}" if val_per_class else "one test image"
    (val,) = _draw(data.test_labels, data.classes, [val_per_class], (seed, 1), val_request)

    class_dirs = class_folder_names(data.classes)
    staging = output.parent / f".{output.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    counts = {}
    for split, images, labels, indices in (
        ("train", data.train_images, data.train_labels, train),
        ("calib", data.train_images, data.train_labels, calib),
        ("val", data.test_images, data.test_labels, val),
    ):
        if indices is not None:
            counts[split] = _write_split(staging / split, images, labels, indices, class_dirs, progress)
    record = {
        "format": data.fmt,
        "source": str(data.folder.resolve()),
        "seed": seed,
        "train_per_class": train_per_class,
        "calib_per_class": calib_per_class,
        "val_per_class": val_per_class,
        "classes": class_dirs,
        "num_images": {split: sum(c.values()) for split, c in counts.items()},
        "counts": counts,
    }
    (staging / "prepare.json").write_text(json.dumps(record, indent=2))
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.data.prepare"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, help="folder holding the dataset's original files")
    parser.add_argument("--output", required=True, help="folder to write train/, calib/, val/ into")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the files")
    parser.add_argument("--train-per-class", type=int, default=None, help="default: every training image")
    parser.add_argument(
        "--calib-per-class", type=int, default=0, help="training images per class held out as calib/"
    )
    parser.add_argument("--val-per-class", type=int, default=None, help="default: the whole test set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier prepare output")
    args = parser.parse_args(argv)
    try:
        record = prepare_dataset(
            args.source,
            args.output,
            fmt=args.format,
            train_per_class=args.train_per_class,
            calib_per_class=args.calib_per_class,
            val_per_class=args.val_per_class,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{n} {split}" for split, n in record["num_images"].items())
    print(f"{record['format']}: {sizes} images in {len(record['classes'])} classes -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
