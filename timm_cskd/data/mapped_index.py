"""An ``ImageIndex``'s paths and labels in memory-mapped files, for reader processes.

DALI's readers are separate processes, each sent its own pickled copy of what it reads. A 1.28M-path
index as a Python list costs every reader seconds to unpickle and a private hundred-odd MB, and a node
runs ``-j`` readers for each of its ranks, again at every pipeline restart. ``MappedIndex`` writes the
paths (one UTF-8 blob and its offsets), the labels and the classes' members once, to a folder; a pickled
``MappedIndex`` is that folder's name, and every process that unpickles one maps the same files, whose
pages the kernel holds once for all of them.
"""

from __future__ import annotations

import os

import numpy as np

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
        by_class = np.argsort(labels, kind="stable")
        class_starts = np.zeros(int(labels.max(initial=-1)) + 2, dtype=np.int64)
        np.cumsum(np.bincount(labels, minlength=len(class_starts) - 1), out=class_starts[1:])
        np.save(os.path.join(folder, "offsets.npy"), offsets)
        with open(os.path.join(folder, "paths.bin"), "wb") as f:
            f.write(b"".join(encoded))
        np.save(os.path.join(folder, "labels.npy"), labels)
        np.save(os.path.join(folder, "by_class.npy"), by_class)
        np.save(os.path.join(folder, "class_starts.npy"), class_starts)
        return cls(index.root, folder)

    def _open(self) -> None:
        def load(name):
            return np.load(os.path.join(self.folder, name), mmap_mode="r")

        blob = np.memmap(os.path.join(self.folder, "paths.bin"), dtype=np.uint8, mode="r")
        self.paths = _Paths(load("offsets.npy"), blob)
        self.labels = load("labels.npy")
        self._by_class, self._class_starts = load("by_class.npy"), load("class_starts.npy")

    def __getstate__(self) -> dict:
        return {"root": self.root, "folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.root, self.folder = state["root"], state["folder"]
        self._open()

    def __len__(self) -> int:
        return len(self.paths)

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def classmates(self, label: int) -> np.ndarray:
        """The indices of class ``label`` in index order."""
        return self._by_class[self._class_starts[label] : self._class_starts[label + 1]]
