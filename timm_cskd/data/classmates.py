"""The members of each class of an index, for standing a classmate in for a file that cannot be read.

Both backends substitute a broken file with the next member of its class (index order, wrapping round
to the first), so a long run never dies on one file and class pairs stay same-class: the torch dataset
(``timm_cskd.data.loader``) keeps these arrays in memory, ``MappedIndex`` writes them to files that
DALI's reader processes map.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

__all__ = ["Classmates"]


class Classmates:
    """``order`` holds the indices sorted by class, index order within each class; class c's members are
    ``order[starts[c] : starts[c + 1]]``."""

    def __init__(self, order: np.ndarray, starts: np.ndarray):
        self.order, self.starts = order, starts

    @classmethod
    def group(cls, labels) -> Classmates:
        """Group the indices of ``labels`` (class numbers from 0) by class."""
        labels = np.asarray(labels, dtype=np.int64)
        starts = np.zeros(int(labels.max(initial=-1)) + 2, dtype=np.int64)
        np.cumsum(np.bincount(labels, minlength=len(starts) - 1), out=starts[1:])
        return cls(np.argsort(labels, kind="stable"), starts)

    def of(self, label: int) -> np.ndarray:
        """The indices of class ``label`` in index order."""
        return self.order[self.starts[label] : self.starts[label + 1]]

    def round_from(self, i: int, label: int) -> Iterator[int]:
        """Class ``label``'s members from ``i`` (one of them) on, then round from the first to the one
        before ``i``: the order in which classmates stand in for ``i``."""
        mates = self.of(label)
        start = int(np.flatnonzero(mates == i)[0])
        return (int(j) for j in itertools.chain(mates[start:], mates[:start]))
