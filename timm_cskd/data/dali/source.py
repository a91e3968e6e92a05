"""What DALI's reader processes read: the plan-driven external source and the plan files it maps.

The reader workers are spawned, not forked: the trainer has initialised CUDA by the time the pipeline
is built, and DALI refuses to fork a process with a CUDA context. A scheduler's SIGTERM does not stop
them (the trainer saves its preemption checkpoint, then exits) and they leave with the trainer
(``timm_cskd.data.workers``). Each is sent file names, not the index: the index is written once per
loader into memory-mapped files (``timm_cskd.data.mapped_index``) and each epoch's plan into another, so
``-j`` readers on each of a node's ranks share one copy of the pages instead of unpickling 1.28M paths
each at every pipeline start (``benchmarks/dali_index.py``).
"""

from __future__ import annotations

import copy
import multiprocessing
import os

import numpy as np

from timm_cskd.data.dali.files import GoodFiles
from timm_cskd.data.mapped_index import MappedIndex
from timm_cskd.data.workers import become_deaf_worker

__all__ = ["PlanSource", "flat_plan", "images_per_batch", "write_plan"]


def _in_reader() -> None:
    """In a spawned reader (not when unpickled in the trainer): deaf to SIGTERM, gone with the trainer."""
    if multiprocessing.parent_process() is not None:
        become_deaf_worker()


class PlanSource:
    """Per-sample source: the encoded bytes and label of position i of this rank's epoch plan.

    Runs in DALI's spawned worker processes, ``-j`` per rank, each unpickling its own copy: so it holds
    only file names. The index is memory-mapped (``MappedIndex``, shared by every reader of the rank) and
    so is each epoch's plan, written by the loader (``write_plan``) before DALI can ask for it; DALI's
    ``epoch_idx`` counts pipeline resets, mapped to (first_epoch + epoch_idx), the first of which starts
    at plan position ``start``.
    """

    def __init__(
        self,
        index: MappedIndex,
        plans: str,
        first_epoch: int,
        start: int,
        excluded: frozenset[int],
        report_dir: str,
    ):
        self.files = GoodFiles(index, excluded, report_dir)
        self.plans, self.first_epoch, self.start = plans, first_epoch, start
        self._epoch, self._plan = None, None

    def __setstate__(self, state):
        self.__dict__.update(state)
        _in_reader()

    def _plan_for(self, epoch_idx: int) -> np.ndarray:
        if self._epoch != epoch_idx:
            epoch, start = self.first_epoch + epoch_idx, self.start if epoch_idx == 0 else 0
            self._plan = np.load(_plan_file(self.plans, epoch, start), mmap_mode="r")
            self._epoch = epoch_idx
        return self._plan

    def __call__(self, info):
        plan = self._plan_for(info.epoch_idx)
        if info.idx_in_epoch >= len(plan):
            raise StopIteration
        encoded, _ = self.files.get(plan[info.idx_in_epoch])
        return encoded, np.array(self.files.index.labels[plan[info.idx_in_epoch]], dtype=np.int64)


def flat_plan(sampler, start: int) -> np.ndarray:
    """This rank's dataset indices from plan position ``start``, batch after batch (``[first; partners]``
    for class pairs), as the torch loader's batch sampler yields them."""
    columns = sampler.rank_plan(start)
    k = sampler.units_per_batch
    return np.concatenate([column.reshape(-1, k) for column in columns], axis=1).ravel()


def images_per_batch(sampler) -> int:
    return sampler.units_per_batch * sampler.num_columns


def _plan_file(folder: str, epoch: int, start: int) -> str:
    return os.path.join(folder, f"plan-{epoch}-{start}.npy")


def write_plan(folder: str, sampler, epoch: int, start: int) -> None:
    """Write ``flat_plan`` of ``epoch`` from ``start`` for the readers, whole or not at all; drop the
    plans of epochs before the previous one, which no reader can still be reading."""
    path = _plan_file(folder, epoch, start)
    if not os.path.exists(path):
        planner = copy.copy(sampler)  # set_epoch must not move the trainer's sampler
        planner.set_epoch(epoch)
        partial = path.removesuffix(".npy") + ".partial.npy"
        np.save(partial, flat_plan(planner, start))
        os.replace(partial, path)
    for name in os.listdir(folder):
        if name.startswith("plan-") and int(name.split("-")[1]) < epoch - 1:
            os.remove(os.path.join(folder, name))
