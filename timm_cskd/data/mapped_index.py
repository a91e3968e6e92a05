"""An ``ImageIndex``'s paths and labels in memory-mapped files, for reader processes.

DALI's readers are separate processes, each sent its own pickled copy of what it reads. A 1.28M-path
index as a Python list costs every reader seconds to unpickle and a private hundred-odd MB, and a node
runs ``-j`` readers for each of its ranks, again at every pipeline restart. ``MappedIndex`` writes the
paths (one UTF-8 blob and its offsets), the labels and the classes' members once, to a folder; a pickled
``MappedIndex`` is that folder's name, and every process that unpickles one maps the same files, whose
pages the kernel holds once for all of them. An index over tar shards (``ShardIndex``) also maps each
sample's (shard, offset, size), and ``read`` then takes the bytes from the tar at that offset.
"""

from __future__ import annotations

import json
import os

import numpy as np

from timm_cskd.data.classmates import Classmates
from timm_cskd.data.index import ImageIndex

__all__ = ["MappedIndex"]


class _Paths:
    """Root-relative path i, decoded from the blob on each access."""

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        self._offsets, self._blob = offsets, blob

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes().decode()


class MappedIndex:
    """Read-only paths, labels and classmates of an index, mapped from ``folder`` (written by ``write``)."""

    def __init__(self, root: str, folder: str):
        self.root, self.folder = root, folder
        self._open()

    @classmethod
    def write(cls, index: ImageIndex, folder: str) -> MappedIndex:
        """Write ``index`` into ``folder`` (which must exist) and map it."""
        encoded = [path.encode() for path in index.paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        labels = np.asarray(index.labels, dtype=np.int64)
        classmates = Classmates.group(labels)
        np.save(os.path.join(folder, "offsets.npy"), offsets)
        with open(os.path.join(folder, "paths.bin"), "wb") as f:
            f.write(b"".join(encoded))
        np.save(os.path.join(folder, "labels.npy"), labels)
        np.save(os.path.join(folder, "by_class.npy"), classmates.order)
        np.save(os.path.join(folder, "class_starts.npy"), classmates.starts)
        if hasattr(index, "offsets"):  # a ShardIndex: members read by offset from their tars
            np.save(
                os.path.join(folder, "members.npy"), np.stack([index.shard, index.offsets, index.sizes], 1)
            )
            with open(os.path.join(folder, "tars.json"), "w", encoding="utf-8") as f:
                json.dump(index.tars, f)
        return cls(index.root, folder)

    def _open(self) -> None:
        def load(name):
            return np.load(os.path.join(self.folder, name), mmap_mode="r")

        blob = np.memmap(os.path.join(self.folder, "paths.bin"), dtype=np.uint8, mode="r")
        self.paths = _Paths(load("offsets.npy"), blob)
        self.labels = load("labels.npy")
        self.classmates = Classmates(load("by_class.npy"), load("class_starts.npy"))
        self._members, self._tars, self._fds = None, None, {}
        if os.path.exists(os.path.join(self.folder, "members.npy")):
            self._members = load("members.npy")
            with open(os.path.join(self.folder, "tars.json"), encoding="utf-8") as f:
                self._tars = json.load(f)

    def __getstate__(self) -> dict:
        return {"root": self.root, "folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.root, self.folder = state["root"], state["folder"]
        self._open()

    def __len__(self) -> int:
        return len(self.paths)

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of item ``i``: its file, or its member of a tar shard (one pread)."""
        if self._members is None:
            return np.fromfile(self.full_path(i), dtype=np.uint8)
        shard, offset, size = (int(v) for v in self._members[i])
        if shard not in self._fds:
            self._fds[shard] = os.open(os.path.join(self.root, self._tars[shard]), os.O_RDONLY)
        data = os.pread(self._fds[shard], size, offset)
        if len(data) != size:
            raise OSError(f"{self.full_path(i)}: the tar ends {size - len(data)} bytes early")
        return np.frombuffer(data, dtype=np.uint8)
