"""Label-indexed class-pair batch sampler for CS-KD.

Every batch is ``first + partners``: ``k`` dataset indices, then ``k`` same-class partners in the same
order. The epoch plan is built with numpy in O(N) from a generator seeded by ``(seed, epoch)``, shuffled
before it is sharded, so every rank sees the same plan and takes an equal, disjoint share of it.

- ``mode="anchor"``: the paper's Algorithm 1 (alinlab/cs-kd ``PairBatchSampler``). Every sample is an anchor
  once per epoch, ``k = batch_size``, and each anchor's partner is drawn uniformly from its class without
  the anchor itself (singleton classes pair with themselves; the reference code allows self-pairs always).
- ``mode="paired"``: every class is split into random same-class pairs (an odd one out pairs with a random
  classmate), ``k = batch_size // 2``, so a batch holds ``batch_size`` images and an epoch sees each once.

``ShuffledBatchSampler`` is the same machinery without partners, for a plain cross-entropy baseline.

Rank ``r`` of ``R`` takes plan positions ``start + (b * k + j) * R + r``, so after any number of steps the
trained positions of an epoch are exactly a prefix of the plan. A checkpoint therefore records one global
position, and a run resumes from it with any number of ranks and any per-rank batch (elastic resume):
the rest of the plan is re-sharded over the new ranks, nothing trained twice, nothing skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ClassPairSampler", "ShuffledBatchSampler"]

MODES = ("anchor", "paired")
# The ``plan`` of a rank-local state (``timm_cskd.shard_sampler``): positions in one rank's own plan.
RANK_LOCAL_PLAN = "rank-local"


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


def saved_position(state: dict, defaults=None) -> int:
    """The global plan position a sampler ``state_dict`` records. First-release states saved batches of
    their own size on their own rank count; ``defaults`` (a sampler) fills what such a state omits."""
    if "units_consumed" in state:
        return state["units_consumed"]
    batch_size = state.get("batch_size", getattr(defaults, "batch_size", 1))
    k = batch_size // 2 if state.get("mode", getattr(defaults, "mode", "")) == "paired" else batch_size
    return (
        state.get("batches_consumed", 0) * k * state.get("num_replicas", getattr(defaults, "num_replicas", 1))
    )


def saved_mid_epoch(state: dict) -> bool:
    """Whether a rank-local state stopped inside its epoch (some of it trained, some left). A state from
    before ``epoch_units`` was saved counts any non-zero position."""
    units = state.get("units_consumed", 0)
    return bool(units) and units < state.get("epoch_units", units + 1)


class _PlanBatchSampler(torch.utils.data.Sampler[list[int]]):
    """A seeded per-epoch plan of units (one column, or first and partner columns), sharded over ranks
    from a global position. Subclasses define ``plan()``, ``_num_units`` and ``units_per_batch``."""

    mode: str
    units_per_batch: int
    num_columns: int  # indices per unit: 2 for (first, partner), 1 for plain images
    _num_units: int

    def _setup(self, batch_size, num_replicas, rank, seed, drop_last, repeats):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        if repeats < 0:
            raise ValueError(f"repeats must be >= 0, got {repeats}")
        self.repeats = repeats
        self.epoch = 0
        self._start = 0  # global plan position this epoch's iteration starts from
        self._yielded = 0
        self._finished = False

    def _check_not_empty(self, unit_name: str):
        if len(self) == 0:
            raise ValueError(
                f"{self._num_units} {unit_name} are too few for one batch of {self.units_per_batch} per rank on "
                f"{self.num_replicas} rank(s) with drop_last=True"
            )

    @property
    def _units_per_step(self) -> int:
        return self.units_per_batch * self.num_replicas

    def _batches_from(self, start: int) -> int:
        left = max(self._num_units - start, 0)
        return left // self._units_per_step if self.drop_last else -(-left // self._units_per_step)

    def __len__(self) -> int:
        return self._batches_from(0)

    @property
    def first_batch(self) -> int:
        """The epoch's batch number of the first batch from the start position (a resume's first batch)."""
        return len(self) - self._batches_from(self._start)

    @property
    def position(self) -> int:
        """Batches of the current epoch counted as done: yielded, or restored by load_state_dict."""
        return 0 if self._finished else self.first_batch + self._yielded

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start, self._yielded, self._finished = 0, 0, False
        self.epoch = epoch

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """Position in the epoch. A prefetching DataLoader runs ahead of training: pass the step count."""
        consumed = self.position if batches_consumed is None else batches_consumed
        units = self._start + (consumed - self.first_batch) * self._units_per_step
        return {
            "epoch": self.epoch,
            "units_consumed": int(min(units, self._num_units)),
            "batches_consumed": consumed,
            "seed": self.seed,
            "repeats": self.repeats,
            "mode": self.mode,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the rank count and batch size may differ from the saved ones."""
        for key in ("seed", "mode", "repeats"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this sampler has {getattr(self, key)!r}"
                )
        if state.get("plan") == RANK_LOCAL_PLAN:
            # Its position is one rank's, in that rank's own plan: nothing of this global plan.
            if saved_mid_epoch(state):
                raise ValueError(
                    "it was saved mid-epoch from rank-pinned shards; resume on the shards, or from an epoch "
                    "checkpoint"
                )
            units = self._num_units if state.get("units_consumed") else 0
        else:
            units = saved_position(state, self)
        if not 0 <= units <= self._num_units:
            raise ValueError(f"saved position {units} outside the epoch's [0, {self._num_units}]")
        self.epoch = state["epoch"]
        self._start, self._yielded, self._finished = units, 0, False

    def is_elastic(self, state: dict) -> bool:
        """Whether ``state`` was saved with another rank count or batch size (its RNG cannot replay)."""
        return any(
            state.get(key, getattr(self, key)) != getattr(self, key) for key in ("num_replicas", "batch_size")
        )

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _epoch_plan(self) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def plan(self) -> tuple[np.ndarray, ...]:
        """This epoch's plan columns over all ranks, before sharding and padding.

        With ``repeats`` r (timm's --aug-repeats, DeiT's repeated augmentation) each unit appears r times
        in a row, so its copies land on r different ranks, each augmented differently; the epoch keeps
        its length, so it covers about 1/r of the units, as timm's RepeatAugSampler does."""
        columns = self._epoch_plan()
        if self.repeats and self.repeats != 1:
            source = (np.arange(self._num_units) / self.repeats).astype(np.int64)
            columns = tuple(column[source] for column in columns)
        return columns

    def rank_plan(self, start: int | None = None) -> tuple[np.ndarray, ...]:
        """This rank's plan columns for the batches from global position ``start`` (default: the
        resume position), ``batches * k`` entries each; wrapped to the plan's start without drop_last."""
        start = self._start if start is None else start
        columns = self.plan()
        total = self._batches_from(start) * self._units_per_step
        positions = (start + np.arange(self.rank, total, self.num_replicas)) % self._num_units
        return tuple(column[positions] for column in columns)

    def __iter__(self) -> Iterator[list[int]]:
        if self._finished:
            # Iterating again without set_epoch replays the epoch, as DistributedSampler does.
            self._start, self._yielded, self._finished = 0, 0, False
        columns = self.rank_plan()
        k = self.units_per_batch
        for b in range(self._yielded, len(columns[0]) // k):
            self._yielded = b + 1
            yield np.concatenate([column[b * k : (b + 1) * k] for column in columns]).tolist()
        self._finished = True


class ClassPairSampler(_PlanBatchSampler):
    """Batch sampler yielding ``[first_1..first_k, partner_1..partner_k]`` with same-class pairs.

    Use as ``DataLoader(dataset, batch_sampler=ClassPairSampler(labels, batch_size))``. ``num_replicas`` and
    ``rank`` default to the initialised process group; ``set_epoch`` reshuffles as in DistributedSampler.
    ``state_dict()``/``load_state_dict()`` resume at the exact next batch of an interrupted epoch.
    """

    num_columns = 2

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
        repeats: float = 0,
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
        self._setup(batch_size, num_replicas, rank, seed, drop_last, repeats)
        self.labels = labels.astype(np.int64, copy=False)
        self.mode = mode
        self.units_per_batch = batch_size if mode == "anchor" else batch_size // 2

        # Indices grouped by class once; per-epoch shuffles permute within the groups.
        self._by_class = np.argsort(self.labels, kind="stable")
        self._slot_start, self._slot_size, self._slot_rank = _class_layout(self.labels, self._by_class)
        self._rank_of = np.empty_like(self._slot_rank)
        self._rank_of[self._by_class] = self._slot_rank
        self._start_of = np.empty_like(self._slot_start)
        self._start_of[self._by_class] = self._slot_start
        self._size_of = np.empty_like(self._slot_size)
        self._size_of[self._by_class] = self._slot_size

        self._num_units = (
            len(self.labels) if mode == "anchor" else int(np.count_nonzero(self._slot_rank % 2 == 0))
        )
        self._check_not_empty("samples" if mode == "anchor" else "pairs")

    @property
    def pairs_per_batch(self) -> int:
        return self.units_per_batch

    def _draw_classmates(self, rng: np.random.Generator, idx: np.ndarray) -> np.ndarray:
        """A uniformly drawn classmate of each index other than itself (itself in a singleton class)."""
        size = self._size_of[idx]
        own = self._rank_of[idx]
        pick = np.floor(rng.random(len(idx)) * np.maximum(size - 1, 1)).astype(np.int64)
        pick += pick >= own
        pick = np.where(size > 1, pick, own)
        return self._by_class[self._start_of[idx] + pick]

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's ``(first, partner)`` arrays over all ranks."""
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


class ShuffledBatchSampler(_PlanBatchSampler):
    """Plain shuffled batches of ``batch_size`` indices (a DistributedSampler with the same resumable,
    elastic position), for a cross-entropy baseline without class pairs."""

    mode = "plain"
    num_columns = 1

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        repeats: float = 0,
    ):
        self._setup(batch_size, num_replicas, rank, seed, drop_last, repeats)
        self.units_per_batch = batch_size
        self._num_units = num_samples
        self._check_not_empty("samples")

    def _epoch_plan(self) -> tuple[np.ndarray]:
        return (self._rng().permutation(self._num_units),)
