"""ClassPairSampler properties over random imbalanced label sets."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_cskd import ClassPairSampler


@st.composite
def label_sets(draw):
    """Imbalanced labels: some classes with one image, some with many, in random order."""
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=15))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    perm = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(labels))
    return labels[perm]


def epoch_batches(labels, batch_size, mode, world, epoch=0, seed=0, drop_last=True):
    out = []
    for rank in range(world):
        sampler = ClassPairSampler(
            labels, batch_size, mode=mode, num_replicas=world, rank=rank, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def split(batch):
    k = len(batch) // 2
    return batch[:k], batch[k:]


def check_pairs(labels, batches, allow_self_only_for_singletons=True):
    counts = np.bincount(labels)
    for batch in batches:
        first, partner = split(batch)
        for a, b in zip(first, partner):
            assert labels[a] == labels[b]
            if allow_self_only_for_singletons and counts[labels[a]] > 1:
                assert a != b, "a sample was paired with itself although its class has others"


@settings(max_examples=60, deadline=None)
@given(labels=label_sets(), world=st.integers(1, 4), batch_pairs=st.integers(1, 4), seed=st.integers(0, 99))
def test_anchor_mode_properties(labels, world, batch_pairs, seed):
    if len(labels) < batch_pairs * world:
        with pytest.raises(ValueError, match="too few"):
            ClassPairSampler(labels, batch_pairs, num_replicas=world, rank=0)
        return
    per_rank = epoch_batches(labels, batch_pairs, "anchor", world, seed=seed)
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1, "ranks must see equal batch counts or DDP hangs"
    assert lengths.pop() == len(labels) // (batch_pairs * world)
    anchors = [a for batches in per_rank for b in batches for a in split(b)[0]]
    assert all(len(b) == 2 * batch_pairs for batches in per_rank for b in batches)
    assert len(anchors) == len(set(anchors)), "rank shards overlap or an anchor repeats"
    assert len(anchors) == len(labels) - len(labels) % (batch_pairs * world)
    for batches in per_rank:
        check_pairs(labels, batches)


@settings(max_examples=60, deadline=None)
@given(labels=label_sets(), world=st.integers(1, 4), pairs=st.integers(1, 4), seed=st.integers(0, 99))
def test_paired_mode_partitions_each_class(labels, world, pairs, seed):
    counts = np.bincount(labels)
    num_pairs = int(((counts + 1) // 2).sum())
    if num_pairs < pairs * world:
        with pytest.raises(ValueError, match="too few"):
            ClassPairSampler(labels, 2 * pairs, mode="paired", num_replicas=world, rank=0)
        return
    per_rank = epoch_batches(labels, 2 * pairs, "paired", world, seed=seed, drop_last=False)
    assert len({len(b) for b in per_rank}) == 1
    for batches in per_rank:
        check_pairs(labels, batches)
    # Without drop_last the union of all ranks' pairs is the whole partition (padding repeats a few).
    firsts = [a for batches in per_rank for b in batches for a in split(b)[0]]
    everyone = {i for batches in per_rank for b in batches for i in b}
    assert everyone == set(range(len(labels))), "an epoch of paired mode must cover every image"
    assert len(set(firsts)) == num_pairs

    plan_first, plan_partner = ClassPairSampler(labels, 2 * pairs, mode="paired", seed=seed).plan()
    images = np.concatenate([plan_first, plan_partner])
    # Each image appears once, except an odd class's leftover partner which appears twice.
    extra = np.bincount(images, minlength=len(labels)) - 1
    assert (extra >= 0).all(), "an image is missing from the partition"
    assert extra.sum() == int((counts % 2 == 1)[counts > 1].sum()) + int((counts == 1).sum())


@settings(max_examples=30, deadline=None)
@given(labels=label_sets(), world=st.integers(1, 3), seed=st.integers(0, 99))
def test_paired_shards_are_disjoint_with_drop_last(labels, world, seed):
    counts = np.bincount(labels)
    if int(((counts + 1) // 2).sum()) < world:
        return
    per_rank = epoch_batches(labels, 2, "paired", world, seed=seed)
    firsts = [a for batches in per_rank for b in batches for a in split(b)[0]]
    assert len(firsts) == len(set(firsts))
    assert len({len(b) for b in per_rank}) == 1


@pytest.mark.parametrize("mode", ["anchor", "paired"])
def test_deterministic_and_epochs_differ(mode):
    labels = np.random.default_rng(0).integers(0, 20, 500)
    a = epoch_batches(labels, 8, mode, 2, epoch=3, seed=7)
    b = epoch_batches(labels, 8, mode, 2, epoch=3, seed=7)
    c = epoch_batches(labels, 8, mode, 2, epoch=4, seed=7)
    d = epoch_batches(labels, 8, mode, 2, epoch=3, seed=8)
    assert a == b
    assert a != c
    assert a != d


@settings(max_examples=30, deadline=None)
@given(
    labels=label_sets(),
    mode=st.sampled_from(["anchor", "paired"]),
    stop=st.integers(0, 10),
    epoch=st.integers(0, 5),
)
def test_resume_equals_uninterrupted(labels, mode, stop, epoch):
    try:
        full = ClassPairSampler(labels, 2, mode=mode, seed=3)
    except ValueError:
        return
    full.set_epoch(epoch)
    expected = list(full)
    stop = min(stop, len(expected))

    first_run = ClassPairSampler(labels, 2, mode=mode, seed=3)
    first_run.set_epoch(epoch)
    it = iter(first_run)
    seen = [next(it) for _ in range(stop)]
    state = first_run.state_dict()
    assert state["batches_consumed"] == stop

    resumed = ClassPairSampler(labels, 2, mode=mode, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)
    assert seen + list(resumed) == expected
    resumed.set_epoch(epoch + 1)
    assert len(list(resumed)) == len(expected), "the epoch after a resume starts from its first batch"


def test_state_dict_takes_trainer_step_count_and_checks_config():
    sampler = ClassPairSampler(np.arange(40) % 4, 4, seed=1)
    assert sampler.state_dict(batches_consumed=3)["batches_consumed"] == 3
    other = ClassPairSampler(np.arange(40) % 4, 4, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(sampler.state_dict())


def test_anchor_partner_is_uniform_over_classmates():
    labels = np.array([0] * 4 + [1])
    sampler = ClassPairSampler(labels, 5)
    hits = np.zeros((5, 5), dtype=int)
    for epoch in range(4000):
        sampler.set_epoch(epoch)
        first, partner = sampler.plan()
        np.add.at(hits, (first, partner), 1)
    class0 = hits[:4, :4]
    assert np.diag(class0).sum() == 0
    off_diag = class0[~np.eye(4, dtype=bool)]
    # 4000 draws over 3 classmates each: expected 1333, std ~30.
    assert np.all(np.abs(off_diag - 4000 / 3) < 150)
    assert hits[4, 4] == 4000


def test_uses_process_group_defaults_and_rejects_bad_arguments():
    sampler = ClassPairSampler(np.arange(10) % 2, 2)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    with pytest.raises(ValueError, match="even batch_size"):
        ClassPairSampler(np.arange(10) % 2, 3, mode="paired")
    with pytest.raises(ValueError, match="even batch_size"):
        ClassPairSampler(np.arange(10) % 2, 0, mode="paired")
    with pytest.raises(ValueError, match="mode"):
        ClassPairSampler(np.arange(10) % 2, 2, mode="pairs")
    with pytest.raises(ValueError, match="rank"):
        ClassPairSampler(np.arange(10) % 2, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-negative"):
        ClassPairSampler(np.array([0, -1, 1]), 1)


def test_works_as_dataloader_batch_sampler():
    import torch

    labels = np.arange(32) % 4
    dataset = torch.utils.data.TensorDataset(torch.arange(32), torch.as_tensor(labels))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=ClassPairSampler(labels, 4, seed=0))
    assert len(loader) == 8
    for idx, y in loader:
        assert torch.equal(y[:4], y[4:])
        assert torch.equal(torch.as_tensor(labels)[idx], y)


@settings(max_examples=40, deadline=None)
@given(
    labels=label_sets(),
    mode=st.sampled_from(["anchor", "paired"]),
    before=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    after=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stop=st.integers(0, 6),
)
def test_elastic_resume_trains_each_plan_pair_once(labels, mode, before, after, stop):
    """World size and per-rank batch change mid-epoch: the pairs trained before and after the change
    are the plan's pairs in order, none repeated, none skipped (up to the last incomplete step)."""
    (world, pairs), (new_world, new_pairs) = before, after
    size = pairs if mode == "anchor" else 2 * pairs
    new_size = new_pairs if mode == "anchor" else 2 * new_pairs
    try:
        samplers = [
            ClassPairSampler(labels, size, mode=mode, num_replicas=world, rank=r, seed=4)
            for r in range(world)
        ]
        resumed = [
            ClassPairSampler(labels, new_size, mode=mode, num_replicas=new_world, rank=r, seed=4)
            for r in range(new_world)
        ]
    except ValueError:
        return
    stop = min(stop, len(samplers[0]))
    trained = []
    for sampler in samplers:
        sampler.set_epoch(2)
        it = iter(sampler)
        trained += [split(next(it)) for _ in range(stop)]
    state = samplers[0].state_dict(batches_consumed=stop)
    for sampler in resumed:
        sampler.load_state_dict(state)
        sampler.set_epoch(2)
        assert sampler.is_elastic(state) == (before != after)
        assert sampler.position == sampler.first_batch
        batches = [split(batch) for batch in sampler]
        assert sampler.first_batch + len(batches) == len(sampler), "the epoch ends at its last batch"
        trained += batches
    pairs_trained = sorted((a, b) for first, partner in trained for a, b in zip(first, partner))
    first, partner = samplers[0].plan()
    done = stop * pairs * world
    remaining = (len(first) - done) // (new_pairs * new_world) * new_pairs * new_world
    assert pairs_trained == sorted(
        zip(first[: done + remaining].tolist(), partner[: done + remaining].tolist())
    )


def test_plain_shuffled_batches_resume_elastically():
    from timm_cskd import ShuffledBatchSampler

    two = [ShuffledBatchSampler(48, 4, num_replicas=2, rank=r, seed=1) for r in range(2)]
    seen = [i for sampler in two for batch in list(sampler)[:2] for i in batch]
    one = ShuffledBatchSampler(48, 4, num_replicas=1, rank=0, seed=1)
    one.load_state_dict(two[0].state_dict(batches_consumed=2))
    assert one.position == 4 and len(one) == 12
    seen += [i for batch in one for i in batch]
    assert sorted(seen) == list(range(48))
    assert seen[:16] != sorted(seen[:16]), "the plan is shuffled"
