"""Label index: (file paths, labels, class names) from an ImageFolder tree or a list file.

Classes are the sorted sub-folder names, as timm's and torchvision's ImageFolder order them, so a label
here means the same class as in any timm checkpoint trained on the same tree. Scanning 1.28M ImageNet
files takes minutes on network storage, so the scan is cached (``cache_dir``) and reused until any folder
of the tree changes its modification time (adding, removing or renaming a file touches its folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = [
    "IMG_EXTENSIONS",
    "ImageIndex",
    "DataIndexError",
    "scan_image_folder",
    "read_list_file",
    "build_index",
    "find_split",
    "VAL_SPLITS",
]

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 1
VAL_SPLITS = ["val", "validation"]


class DataIndexError(ValueError):
    """The dataset layout is unusable; the message names the file or folder at fault."""


@dataclass
class ImageIndex:
    root: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    excluded: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def image_source(self, i: int):
        """What ``PIL.Image.open`` reads image ``i`` from: its file path here (a shard index gives bytes)."""
        return self.full_path(i)

    def _subset(self, keep: np.ndarray, labels: np.ndarray, classes: list[str], excluded: list[str]):
        """The entries ``keep`` with new ``labels``; subclasses carry their own per-entry arrays along."""
        return replace(
            self, paths=[self.paths[i] for i in keep], labels=labels, classes=classes, excluded=excluded
        )

    def without_files(self, files) -> ImageIndex:
        """This index minus the given files (absolute, or relative to the working directory)."""
        root = os.path.abspath(self.root)
        relative = {os.path.relpath(os.path.abspath(f), root) for f in files}
        return self.without({p for p in relative if not p.startswith("..")})

    def with_classes(self, classes: list[str], source: str = "--class-map") -> ImageIndex:
        """Only the images of ``classes``, labelled by their position there (timm's --class-map);
        ``source`` says where the classes came from, for the error when this index lacks some."""
        missing = [c for c in classes if c not in self.classes]
        if missing:
            raise DataIndexError(f"{source} names classes {missing[:5]} that {self.root} does not have")
        new_label = np.full(len(self.classes), -1, dtype=np.int64)
        for i, name in enumerate(classes):
            new_label[self.classes.index(name)] = i
        labels = new_label[self.labels]
        keep = np.flatnonzero(labels >= 0)
        return self._subset(keep, labels[keep], list(classes), self.excluded)

    def without(self, bad_paths: set[str]) -> ImageIndex:
        """This index minus the given root-relative paths (e.g. the verify tool's undecodable files)."""
        keep = np.asarray([i for i, p in enumerate(self.paths) if p not in bad_paths], dtype=np.int64)
        if len(keep) == len(self.paths):
            return self
        excluded = sorted(set(self.paths) - {self.paths[i] for i in keep})
        return self._subset(keep, self.labels[keep], self.classes, excluded)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _walk(class_dir: str):
    """Yield (directory, mtime_ns, image file names) for a class folder and its sub-folders."""
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        yield dirpath, os.stat(dirpath).st_mtime_ns, sorted(f for f in filenames if _is_image(f))


def _list_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataIndexError(f"dataset folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataIndexError(
            f"no class sub-folders in {root} (expected ImageFolder layout root/<class>/<image>)"
        )
    return classes


def scan_image_folder(root: str | os.PathLike) -> tuple[ImageIndex, dict[str, int]]:
    """Scan ``root/<class>/**/<image>``; returns the index and each folder's mtime for cache validation."""
    root = Path(root)
    classes = _list_classes(root)
    paths, labels, mtimes = [], [], {str(root): os.stat(root).st_mtime_ns}
    for label, name in enumerate(classes):
        found = 0
        for dirpath, mtime, files in _walk(str(root / name)):
            mtimes[dirpath] = mtime
            rel = os.path.relpath(dirpath, root)
            paths.extend(os.path.join(rel, f) for f in files)
            found += len(files)
        if not found:
            raise DataIndexError(f"class folder {root / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
        labels.extend([label] * found)
    return ImageIndex(str(root), paths, np.asarray(labels, dtype=np.int64), classes), mtimes


def read_list_file(
    list_file: str | os.PathLike,
    root: str | os.PathLike | None = None,
    num_classes: int | None = None,
    classes: list[str] | None = None,
) -> ImageIndex:
    """Read ``relative/path label`` lines (paths relative to ``root``, default: the list file's folder)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataIndexError(f"list file not found: {list_file}")
    root = Path(root) if root is not None else list_file.parent
    if classes is not None:
        num_classes = len(classes)
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, _, label = line.rpartition(" ")
            try:
                label = int(label)
            except ValueError:
                path = ""
            if not path.strip():
                raise DataIndexError(f"{list_file}:{lineno}: expected 'relative/path label', got {line!r}")
            if label < 0 or (num_classes is not None and label >= num_classes):
                limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise DataIndexError(f"{list_file}:{lineno}: label {label} outside {limit}")
            paths.append(path.strip())
            labels.append(label)
    if not paths:
        raise DataIndexError(f"list file {list_file} holds no entries")
    missing = _missing_files(root, paths)
    if missing:
        raise DataIndexError(
            f"{list_file} names {len(missing)} file(s) that do not exist under {root}, e.g. {missing[0]}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if classes is None:
        classes = [str(c) for c in range(num_classes if num_classes is not None else int(labels.max()) + 1)]
    return ImageIndex(str(root), paths, labels, classes)


def _missing_files(root: Path, paths: list[str]) -> list[str]:
    """The listed paths that are not files: one directory listing per folder, not one stat per image
    (a million stats take minutes on network storage)."""
    listings: dict[str, set[str] | None] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(os.path.join(root, path))
        if folder not in listings:
            try:
                listings[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:
                listings[folder] = None
        if listings[folder] is None or name not in listings[folder]:
            missing.append(path)
    return missing


def _cache_path(cache_dir: Path, root: Path) -> Path:
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"index-{root.name}-{key}.json"


def _load_cache(path: Path, root: Path) -> ImageIndex | None:
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("version") != CACHE_VERSION or cached.get("root") != str(root):
            return None
        for folder, mtime in cached["mtimes"].items():
            if os.stat(folder).st_mtime_ns != mtime:
                return None
        # A new class folder touches only the root, which is in mtimes; a new nested folder its parent.
    except (OSError, ValueError, KeyError):
        return None
    return ImageIndex(
        str(root), cached["paths"], np.asarray(cached["labels"], dtype=np.int64), cached["classes"]
    )


def _save_cache(path: Path, index: ImageIndex, mtimes: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": CACHE_VERSION,
        "root": index.root,
        "classes": index.classes,
        "paths": index.paths,
        "labels": index.labels.tolist(),
        "mtimes": mtimes,
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


# timm's split synonyms: asking for one of a group also finds the others.
SPLIT_SYNONYMS = (("train", "training"), ("validation", "val", "valid", "eval", "evaluation"))


def find_split(data_dir: str | os.PathLike, names: list[str]) -> Path | None:
    """The first of ``data_dir/<name>`` (folder) or ``data_dir/<name>.txt`` (list file) that exists,
    trying timm's synonyms of each name after it (``validation`` also finds ``val``)."""
    expanded = []
    for name in names:
        group = next((g for g in SPLIT_SYNONYMS if name in g), (name,))
        expanded += [name] + [n for n in group if n != name]
    for name in dict.fromkeys(expanded):
        for candidate in (Path(data_dir) / name, Path(data_dir) / f"{name}.txt"):
            if candidate.exists():
                return candidate
    return None


def build_index(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    num_classes: int | None = None,
    classes: list[str] | None = None,
) -> ImageIndex:
    """Index an ImageFolder tree (cached in ``cache_dir``) or a list file.

    ``num_classes``, when given, must match the folder's classes; for list files it bounds the labels.
    ``classes`` names a list file's labels (e.g. the train split's folders for a listed val split).
    """
    source = Path(source)
    if source.is_file():
        return read_list_file(source, num_classes=num_classes, classes=classes)
    root = source.absolute()
    index = None
    cache = _cache_path(Path(cache_dir), root) if cache_dir is not None else None
    if cache is not None and cache.exists():
        index = _load_cache(cache, root)
        if index is None:
            _logger.info("dataset index cache %s is stale, rescanning %s", cache, root)
    if index is None:
        index, mtimes = scan_image_folder(root)
        if cache is not None:
            _save_cache(cache, index, mtimes)
    if num_classes is not None and num_classes != index.num_classes:
        raise DataIndexError(
            f"--num-classes is {num_classes} but {root} has {index.num_classes} class folders"
        )
    if classes is not None and classes != index.classes:
        raise DataIndexError(f"class folders of {root} differ from the training classes")
    return index
