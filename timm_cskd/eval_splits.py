"""The splits evaluate reads: the evaluated one and the calibration one, each found under --data-dir and
checked against the model, and the calibration split checked to hold none of the evaluated images."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from timm_cskd.data.index import DataIndexError, ImageIndex, build_index, find_split
from timm_cskd.data.shard_index import MANIFEST, is_shard_folder

__all__ = ["check_held_out", "split_index"]


def split_index(data_dir, name: str, names: list[str], class_names, num_classes: int):
    """(source, index) of a split: a folder or list file under ``data_dir``, checked against the model."""
    if is_shard_folder(data_dir):
        raise DataIndexError(
            f"{data_dir} is a tar shard folder ({MANIFEST}): evaluate reads ImageFolders and list files; "
            "point --data-dir at the folder the shards were written from"
        )
    source = find_split(data_dir, names)
    if source is None:
        raise DataIndexError(f"no '{name}' folder or list file in {data_dir}")
    # A list file need not name every class; its labels index the model's outputs.
    listed = source.is_file()
    index = build_index(
        source, classes=None if listed else class_names, num_classes=num_classes if listed else None
    )
    if index.num_classes != num_classes:
        raise DataIndexError(f"{source} has {index.num_classes} classes, the model predicts {num_classes}")
    return source, index


def _image_files(index: ImageIndex) -> set[str]:
    """The index's files with their folders' symlinks resolved (once per folder, not once per image)."""
    folders, files = {}, set()
    for i in range(len(index)):
        folder, name = os.path.split(index.full_path(i))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        files.add(os.path.join(folders[folder], name))
    return files


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _copies(files: set[str], others: set[str]) -> set[str]:
    """The ``files`` whose bytes equal one of ``others``': only files of a size both sides have are
    hashed, so disjoint splits cost one stat per image."""
    sizes: dict[int, list[str]] = {}
    for path in others:
        sizes.setdefault(os.path.getsize(path), []).append(path)
    candidates = [p for p in files if os.path.getsize(p) in sizes]
    sized = {os.path.getsize(p) for p in candidates}
    digests = {_file_digest(o) for size in sized for o in sizes[size]}
    return {p for p in candidates if _file_digest(p) in digests}


def check_held_out(calib_source: Path, calib: ImageIndex, source: Path, evaluated: ImageIndex) -> None:
    """A temperature fitted on the images it is then judged on flatters NLL and ECE: refuse any overlap
    (the same split, a list file naming the evaluated folder's images, or copies of them)."""
    calib_files, evaluated_files = _image_files(calib), _image_files(evaluated)
    shared = calib_files & evaluated_files
    how = "shares"
    if not shared:
        shared, how = _copies(calib_files, evaluated_files), "holds byte-identical copies of"
    if shared:
        raise DataIndexError(
            f"--calib-split {calib_source} {how} {len(shared)} of its {len(calib)} images with the evaluated "
            f"split {source} (e.g. {min(shared)}): the temperature must be fitted on held-out images"
        )
