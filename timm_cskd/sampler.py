"""Label-indexed class-pair batch sampler for CS-KD.

Every batch is ``first + partners``: ``k`` dataset indices, then ``k`` same-class partners in the same
order. The epoch plan is built with numpy in O(N) from a generator seeded by ``(seed, epoch)``, shuffled
before it is sharded, so every rank sees the same plan and takes an equal, disjoint share of it.

- ``mode="anchor"``: the paper's Algorithm 1 (alinlab/cs-kd ``PairBatchSampler``). Every sample is an anchor
  once per epoch, ``k = batch_size``, and each anchor's partner is drawn uniformly from its class without
  the anchor itself (singleton classes pair with themselves; the reference code allows self-pairs always).
- ``mode="paired"``: every class is split into random same-class pairs (an odd one out pairs with a random
  classmate), ``k = batch_size // 2``, so a batch holds ``batch_size`` images and an epoch sees each once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ClassPairSampler"]

MODES = ("anchor", "paired")


def _class_layout(labels: np.ndarray, order: np.ndarray):
    """For indices grouped by class in ``order``: each slot's class start, class size and rank within class."""
    sorted_labels = labels[order]
    boundaries = np.flatnonzero(np.diff(sorted_labels)) + 1
    starts = np.concatenate(([0], boundaries))
    sizes = np.diff(np.concatenate((starts, [len(order)])))
    slot_start = np.repeat(starts, sizes)
    slot_size = np.repeat(sizes, sizes)
    slot_rank = np.arange(len(order)) - slot_start
    return slot_start, slot_size, slot_rank


class ClassPairSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding ``[first_1..first_k, partner_1..partner_k]`` with same-class pairs.

    Use as ``DataLoader(dataset, batch_sampler=ClassPairSampler(labels, batch_size))``. ``num_replicas`` and
    ``rank`` default to the initialised process group; ``set_epoch`` reshuffles as in DistributedSampler.
    ``state_dict()``/``load_state_dict()`` resume at the exact next batch of an interrupted epoch.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        mode: str = "anchor",
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("labels must be a non-empty 1-D sequence of class indices")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError("labels must be non-negative integers")
        if mode == "paired" and (batch_size < 2 or batch_size % 2):
            raise ValueError(
                f"paired mode needs an even batch_size >= 2 (it holds batch_size // 2 pairs), got {batch_size}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")

        self.labels = labels.astype(np.int64, copy=False)
        self.batch_size = batch_size
        self.mode = mode
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.pairs_per_batch = batch_size if mode == "anchor" else batch_size // 2
        self.epoch = 0
        self._position = 0
        self._finished = False

        # Indices grouped by class once; per-epoch shuffles permute within the groups.
        self._by_class = np.argsort(self.labels, kind="stable")
        self._slot_start, self._slot_size, self._slot_rank = _class_layout(self.labels, self._by_class)
        self._rank_of = np.empty_like(self._slot_rank)
        self._rank_of[self._by_class] = self._slot_rank
        self._start_of = np.empty_like(self._slot_start)
        self._start_of[self._by_class] = self._slot_start
        self._size_of = np.empty_like(self._slot_size)
        self._size_of[self._by_class] = self._slot_size

        units = len(self.labels) if mode == "anchor" else int(np.count_nonzero(self._slot_rank % 2 == 0))
        per_step = self.pairs_per_batch * num_replicas
        self._num_batches = units // per_step if drop_last else -(-units // per_step)
        if self._num_batches == 0:
            raise ValueError(
                f"{units} {'samples' if mode == 'anchor' else 'pairs'} are too few for one batch of "
                f"{self.pairs_per_batch} per rank on {num_replicas} rank(s) with drop_last=True"
            )

    def __len__(self) -> int:
        return self._num_batches

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded, or restored by load_state_dict."""
        return 0 if self._finished else self._position

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._position, self._finished = 0, False
        self.epoch = epoch

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """Position in the epoch. A prefetching DataLoader runs ahead of training: pass the step count."""
        consumed = self._position if batches_consumed is None else batches_consumed
        return {
            "epoch": self.epoch,
            "batches_consumed": consumed,
            "seed": self.seed,
            "mode": self.mode,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "mode", "num_replicas", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this sampler has {getattr(self, key)!r}"
                )
        if not 0 <= state["batches_consumed"] <= self._num_batches:
            raise ValueError(f"batches_consumed {state['batches_consumed']} outside [0, {self._num_batches}]")
        self.epoch = state["epoch"]
        self._position, self._finished = state["batches_consumed"], False

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _draw_classmates(self, rng: np.random.Generator, idx: np.ndarray) -> np.ndarray:
        """A uniformly drawn classmate of each index other than itself (itself in a singleton class)."""
        size = self._size_of[idx]
        own = self._rank_of[idx]
        pick = np.floor(rng.random(len(idx)) * np.maximum(size - 1, 1)).astype(np.int64)
        pick += pick >= own
        pick = np.where(size > 1, pick, own)
        return self._by_class[self._start_of[idx] + pick]

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's ``(first, partner)`` arrays over all ranks, before sharding and padding."""
        rng = self._rng()
        if self.mode == "anchor":
            first = rng.permutation(len(self.labels))
            return first, self._draw_classmates(rng, first)
        # Shuffle within each class by sorting on (label, random 32-bit key) packed into one int64 key
        # (6x faster than lexsort); consecutive slots of a class then form its pairs.
        order = np.argsort((self.labels << 32) | rng.integers(0, 2**32, len(self.labels)))
        heads = np.flatnonzero(self._slot_rank % 2 == 0)
        first = order[heads]
        has_next = self._slot_rank[heads] + 1 < self._slot_size[heads]
        partner = np.where(has_next, order[np.minimum(heads + 1, len(order) - 1)], -1)
        odd = ~has_next
        if odd.any():
            partner[odd] = self._draw_classmates(rng, first[odd])
        shuffle = rng.permutation(len(first))
        return first[shuffle], partner[shuffle]

    def rank_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``(first, partner)`` arrays for the epoch, ``len(self) * k`` of each."""
        first, partner = self.plan()
        total = self._num_batches * self.pairs_per_batch * self.num_replicas
        if total > len(first):
            wrap = np.resize(np.arange(len(first)), total)
            first, partner = first[wrap], partner[wrap]
        take = slice(self.rank, total, self.num_replicas)
        return first[take], partner[take]

    def __iter__(self) -> Iterator[list[int]]:
        first, partner = self.rank_plan()
        k = self.pairs_per_batch
        if self._finished:
            # Iterating again without set_epoch replays the epoch, as DistributedSampler does.
            self._position, self._finished = 0, False
        for b in range(self._position, self._num_batches):
            self._position = b + 1
            yield np.concatenate((first[b * k : (b + 1) * k], partner[b * k : (b + 1) * k])).tolist()
        self._finished = True
