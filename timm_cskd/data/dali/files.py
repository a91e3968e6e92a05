"""Encoded image files for DALI's readers: a structural check, and a classmate for a file that fails it.

Broken files never stop a run. The reader checks each file's structure (JPEG start and end markers, PNG
end chunk, known signatures) and substitutes the next classmate for a file that fails, as the torch
backend does (``timm_cskd.data.classmates``). The readers are separate processes: each substitution is
reported once through a marker file, which the loader logs with the file's path.
"""

from __future__ import annotations

import os

import numpy as np

from timm_cskd.data.mapped_index import MappedIndex

__all__ = ["GoodFiles", "read_checked", "structural_problem"]


def structural_problem(data: np.ndarray) -> str | None:
    """What is wrong with an encoded image file, from its first and last bytes, or None if it looks whole.

    Catches truncated and foreign files before they reach a decoder: DALI's error names no file, and two
    such files in one batch have crashed the process outright."""
    if len(data) < 8:
        return "empty or truncated file"
    # Some writers pad a file after its last marker: look at the end without that padding.
    head, tail = bytes(data[:16]), bytes(data[-4096:]).rstrip(b"\x00\r\n ")[-64:]
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return None if int.from_bytes(head[4:8], "little") + 8 <= len(data) else "truncated WebP"
    if head.startswith(b"BM"):
        return None if int.from_bytes(head[2:6], "little") <= len(data) else "truncated BMP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"P5", b"P6", b"P2", b"P3", b"\x00\x00\x00\x0cjP  ")):
        return None
    return "not an image file DALI decodes (unknown signature)"


def read_checked(index: MappedIndex, i: int) -> tuple[np.ndarray | None, str | None]:
    """The encoded bytes of item ``i`` and what is wrong with them (None when they look whole)."""
    try:
        data = index.read(i)
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    return data, structural_problem(data)


class GoodFiles:
    """Encoded bytes of dataset item i, or of its next classmate that reads whole when i does not.

    Problems are reported once per file through marker files in ``report_dir``, shared by every reader
    process; the loader logs them (with paths) from the main process."""

    def __init__(self, index: MappedIndex, excluded: frozenset[int], report_dir: str):
        self.index = index  # pickled as its folder's name: no mapped array may be an attribute here
        self.excluded, self.report_dir = excluded, report_dir
        self._bad: set[int] = set(excluded)

    def _report(self, i: int, reason: str) -> None:
        try:
            fd = os.open(os.path.join(self.report_dir, f"bad-{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except OSError:  # reported already, or the loader is gone
            return
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.index.full_path(i)}\t{reason}")

    def get(self, i: int) -> tuple[np.ndarray, int]:
        """The bytes of ``i`` or of the classmate standing in for it, and which of them was read."""
        label = int(self.index.labels[i])
        for j in self.index.classmates.round_from(int(i), label):
            if j in self._bad:
                continue
            data, problem = read_checked(self.index, j)
            if problem is None:
                return data, j
            self._bad.add(j)
            self._report(j, problem)
        raise RuntimeError(f"no image of class {label} under {self.index.root} can be read whole")
