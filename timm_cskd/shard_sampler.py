"""Per-rank epoch plans for data pinned to ranks (tar shards on each node's local disk).

The global plan of ``timm_cskd.sampler`` draws a partner from anywhere in the dataset, which a rank that
holds only its own shards cannot read. Here every rank plans over its own samples alone, with the same
machinery (``ClassPairSampler``/``ShuffledBatchSampler`` on one replica) and its own seed stream:

- every sample of the rank's share is an anchor once per epoch (``anchor``), or in one pair (``paired``),
  and every partner is a classmate from the same rank's share; the union over ranks is one pass over
  the data, as with the global plan;
- a class with a single image in a rank's share pairs it with itself (the global plan's rule for a
  singleton class); rank 0 logs such classes per rank;
- all ranks take the same number of steps (DDP needs it): the epoch is as long as the largest share,
  and a smaller share wraps around to the start of its own shuffled plan, so a few of its samples are
  anchors twice that epoch (none when the shares are equal, e.g. equal shards ``R`` divides);
- the position is the rank's own plan position, so a resume on the same rank count replays the epoch
  exactly; another rank count owns other shards, so it may only resume at an epoch boundary.
"""

from __future__ import annotations

import numpy as np

from timm_cskd.sampler import RANK_LOCAL_PLAN as PLAN
from timm_cskd.sampler import ClassPairSampler, ShuffledBatchSampler, saved_mid_epoch

__all__ = ["RankClassPairSampler", "RankShuffledBatchSampler", "PLAN"]


class _RankLocalPlan:
    """Mixin over a one-replica plan sampler: the common epoch length and the rank-local position."""

    def _pin(self, rank: int, world_size: int, epoch_units: int | None) -> None:
        self.rank, self.world_size = rank, world_size
        # One replica's positions, shared with nobody; ``rank`` still seeds SeededBatches and names logs.
        self.num_replicas = 1
        # Until the ranks agree on the epoch's length, this rank's share stands in for it; one rank's is
        # the world's.
        self._epoch_units, self._agreed, self._rank_units = self._num_units, False, None
        if epoch_units is not None:
            self.set_epoch_units(epoch_units)
        elif world_size == 1:
            self.set_rank_units([self._num_units])

    @property
    def local_units(self) -> int:
        return self._num_units

    @property
    def _unit_name(self) -> str:
        return "pairs" if getattr(self, "mode", "plain") == "paired" else "samples"

    def set_epoch_units(self, units: int) -> None:
        """The largest share's unit count over all ranks (the epoch's length on every rank)."""
        if units < self._num_units:
            raise ValueError(f"epoch of {units} units is shorter than this rank's {self._num_units}")
        self._epoch_units, self._agreed = units, True
        self._check_not_empty(self._unit_name)

    def set_rank_units(self, rank_units: list[int]) -> None:
        """Every rank's unit count, gathered: the epoch is as long as the largest share. A mid-epoch resume
        checks them against the saved ones (the checkpoint holds rank 0's state, for every rank)."""
        self.set_epoch_units(max(rank_units))
        self._rank_units = [int(u) for u in rank_units]

    def _describe_plan(self, epoch_units: int, rank_units: list[int] | None) -> str:
        shares = "" if rank_units is None else f" (ranks' shares {', '.join(map(str, rank_units))})"
        return f"an epoch of {epoch_units} {self._unit_name}{shares}"

    def _check_not_empty(self, unit_name: str) -> None:
        # The base samplers check from __init__, against this rank's share alone: a share below one batch
        # must not fail on its rank only (the others would wait in the gather that agrees the length).
        if getattr(self, "_agreed", False) and len(self) == 0:
            raise ValueError(
                f"the largest rank's shards hold {self._epoch_units} {unit_name}, too few for one batch of "
                f"{self.units_per_batch} on each of {self.world_size} rank(s): lower -b, or train on fewer ranks"
            )

    def _batches_from(self, start: int) -> int:
        left = max(self._epoch_units - start, 0)
        return left // self.units_per_batch if self.drop_last else -(-left // self.units_per_batch)

    def rank_plan(self, start: int | None = None) -> tuple[np.ndarray, ...]:
        """This rank's plan columns from position ``start``, wrapped to its start past its own share."""
        start = self._start if start is None else start
        total = self._batches_from(start) * self.units_per_batch
        positions = (start + np.arange(total)) % self._num_units
        return tuple(column[positions] for column in self.plan())

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        state = super().state_dict(batches_consumed)
        consumed = state["batches_consumed"]
        units = self._start + (consumed - self.first_batch) * self.units_per_batch
        # After the epoch's last batch its end, whatever drop_last left over: any rank count continues.
        units = self._epoch_units if consumed >= len(self) else min(units, self._epoch_units)
        state.update(
            units_consumed=int(units),
            num_replicas=self.world_size,
            plan=PLAN,
            epoch_units=self._epoch_units,
            rank_units=self._rank_units,
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        units = state.get("units_consumed", 0)
        if units and state.get("plan") != PLAN:
            raise ValueError(
                "it was saved mid-epoch from a global (folder) plan; this run reads rank-pinned shards"
            )
        for key in ("seed", "mode", "repeats"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this sampler has {getattr(self, key)!r}"
                )
        if not saved_mid_epoch(state):
            # At the epoch's start or after its last batch: any rank count continues from here.
            units = self._epoch_units if units else 0
        elif state.get("num_replicas") != self.world_size:
            raise ValueError(
                f"it was saved mid-epoch on {state.get('num_replicas')} rank(s); shards are pinned to ranks, so "
                f"{self.world_size} ranks own other samples: resume on {state.get('num_replicas')} ranks, "
                "or from an epoch checkpoint"
            )
        else:
            # States from before these keys were saved: accepted.
            saved_epoch, saved_ranks = state.get("epoch_units", self._epoch_units), state.get("rank_units")
            known = saved_ranks is not None and self._rank_units is not None
            if saved_epoch != self._epoch_units or (known and saved_ranks != self._rank_units):
                raise ValueError(
                    f"it was saved mid-epoch with {self._describe_plan(saved_epoch, saved_ranks)}; these shards "
                    f"give {self._describe_plan(self._epoch_units, self._rank_units)}: the shards or "
                    "--exclude-list changed since; restore them, or resume from an epoch checkpoint"
                )
        if not 0 <= units <= self._epoch_units:
            raise ValueError(f"saved position {units} outside the epoch's [0, {self._epoch_units}]")
        self.epoch = state["epoch"]
        self._start, self._yielded, self._finished = units, 0, False

    def is_elastic(self, state: dict) -> bool:
        return (
            state.get("num_replicas", self.world_size) != self.world_size
            or state.get("batch_size", self.batch_size) != self.batch_size
        )

    def _rng(self) -> np.random.Generator:
        # Each rank's plan has its own stream: equal seeds would shuffle equal-sized shares alike.
        return np.random.default_rng([self.seed, self.epoch, self.rank])


def _refuse_repeats(repeats: float) -> None:
    if repeats and repeats != 1:  # 1 is timm's no-op
        raise ValueError(
            f"--aug-repeats {repeats:g} spreads a sample's copies over ranks, which rank-pinned shards cannot "
            "do: drop it (or pass 1) when training on shards"
        )


class RankClassPairSampler(_RankLocalPlan, ClassPairSampler):
    """``ClassPairSampler`` over this rank's samples only (indices into its own index)."""

    def __init__(self, labels, batch_size, *, rank, world_size, epoch_units=None, **kwargs):
        _refuse_repeats(kwargs.get("repeats", 0))
        super().__init__(labels, batch_size, num_replicas=1, rank=0, **kwargs)
        self._pin(rank, world_size, epoch_units)


class RankShuffledBatchSampler(_RankLocalPlan, ShuffledBatchSampler):
    """``ShuffledBatchSampler`` over this rank's samples only."""

    def __init__(self, num_samples, batch_size, *, rank, world_size, epoch_units=None, **kwargs):
        _refuse_repeats(kwargs.get("repeats", 0))
        super().__init__(num_samples, batch_size, num_replicas=1, rank=0, **kwargs)
        self._pin(rank, world_size, epoch_units)
