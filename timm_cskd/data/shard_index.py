"""An ImageIndex over tar shards written by ``timm_cskd.data.shards``, read by member offset.

A shard folder is recognised by its ``manifest.json``. Training shards are pinned to ranks: rank ``r``
of ``R`` owns shards ``r, r + R, r + 2R, ...`` (``rank_shards``) and needs only those on its disk, so
a node stages the shards of its local ranks. Validation shards are small (ImageNet's are 6.4 GB): every
node holds all of them and each rank evaluates the stride ``rank, rank + R, ...`` of their images, as
with folders, so every image counts once.

Each rank reads the per-shard ``.json`` indices of its own shards only and reads an image with one
``os.pread`` at its offset: no tar parsing, no shared file position between loader workers, and a
sample's entry is ``SHARD.tar/KEY.EXT``, the name ``--exclude-list`` and the corrupt-file report use.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from timm_cskd.data.index import SPLIT_SYNONYMS, DataIndexError, ImageIndex

__all__ = [
    "ShardIndex",
    "is_shard_folder",
    "read_manifest",
    "find_shard_split",
    "rank_shards",
    "load_shard_index",
]

MANIFEST = "manifest.json"  # the writer's name for it (timm_cskd.data.shards.MANIFEST)
FORMAT = "timm-cskd-shards"


def is_shard_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataIndexError(f"{path}: cannot read the shard manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise DataIndexError(
            f"{path} is not a {FORMAT} manifest (write one with python -m timm_cskd.data.shards)"
        )
    return manifest


def find_shard_split(manifest: dict, name: str) -> str | None:
    """The manifest's split called ``name`` or one of timm's synonyms of it (``validation`` finds ``val``)."""
    group = next((g for g in SPLIT_SYNONYMS if name in g), (name,))
    return next((n for n in (name, *group) if n in manifest["splits"]), None)


def rank_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The training shards rank ``rank`` of ``world_size`` owns: every ``world_size``-th from ``rank``."""
    if num_shards < world_size:
        raise DataIndexError(
            f"{num_shards} training shard(s) cannot give each of {world_size} ranks one: write smaller "
            "shards (--shard-size) or train on fewer ranks"
        )
    return list(range(rank, num_shards, world_size))


@dataclass
class ShardIndex(ImageIndex):
    """Samples of some shards: ``paths`` are ``SHARD.tar/KEY.EXT``; ``tars[shard[i]]`` holds sample ``i``
    at byte ``offsets[i]``, ``sizes[i]`` long."""

    tars: list[str] = field(default_factory=list)
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self):
        self._fds: dict[int, int] = {}

    def __getstate__(self):
        # File descriptors do not travel to spawned loader workers; each process opens its own.
        return {k: v for k, v in self.__dict__.items() if k != "_fds"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fds = {}

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def read_bytes(self, i: int) -> bytes:
        s = int(self.shard[i])
        if s not in self._fds:
            self._fds[s] = os.open(os.path.join(self.root, self.tars[s]), os.O_RDONLY)
        data = os.pread(self._fds[s], int(self.sizes[i]), int(self.offsets[i]))
        if len(data) != self.sizes[i]:
            raise OSError(f"{self.full_path(i)}: the tar ends {self.sizes[i] - len(data)} bytes early")
        return data

    def image_source(self, i: int):
        return io.BytesIO(self.read_bytes(i))

    def _subset(self, keep, labels, classes, excluded):
        subset = super()._subset(keep, labels, classes, excluded)
        subset.shard, subset.offsets, subset.sizes = self.shard[keep], self.offsets[keep], self.sizes[keep]
        return subset


def _read_shard_entries(folder: Path, shard: dict) -> dict:
    path, tar = folder / shard["index"], folder / shard["tar"]
    if not tar.is_file():
        raise DataIndexError(f"shard {tar} is missing on this node: stage it to local disk before training")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataIndexError(f"shard index {path}: cannot read it ({e})") from e
    if len(entries["keys"]) != shard["samples"]:
        raise DataIndexError(
            f"shard index {path} lists {len(entries['keys'])} samples, the manifest {shard['samples']}"
        )
    return entries


def load_shard_index(folder: str | os.PathLike, split: str, shards: list[int] | None = None) -> ShardIndex:
    """The samples of ``split``'s shards numbered ``shards`` (default all), in shard then member order."""
    folder = Path(folder).absolute()
    manifest = read_manifest(folder)
    found = find_shard_split(manifest, split)
    if found is None:
        raise DataIndexError(
            f"no '{split}' split in {folder / MANIFEST} (it has {', '.join(manifest['splits'])})"
        )
    listed = manifest["splits"][found]["shards"]
    chosen = range(len(listed)) if shards is None else shards
    tars = [s["tar"] for s in listed]
    paths, labels, shard_of, offsets, sizes = [], [], [], [], []
    for s in chosen:
        entries = _read_shard_entries(folder, listed[s])
        paths += [f"{tars[s]}/{k}.{e}" for k, e in zip(entries["keys"], entries["ext"], strict=True)]
        labels += entries["labels"]
        offsets += entries["offsets"]
        sizes += entries["sizes"]
        shard_of += [s] * len(entries["keys"])
    return ShardIndex(
        str(folder),
        paths,
        np.asarray(labels, dtype=np.int64),
        list(manifest["classes"]),
        tars=tars,
        shard=np.asarray(shard_of, dtype=np.int64),
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
    )
