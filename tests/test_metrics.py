"""Metrics against torchmetrics and brute-force formulas from the paper's definitions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from timm_cskd.metrics import ClassificationMeter, recall_at_k


def random_probs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c, generator=g) * 3, dim=1)
    return probs, torch.randint(0, c, (n,), generator=g)


def brute_force(probs, target, num_bins):
    """Guo et al.: bin m holds confidences in ((m-1)/M, m/M]; argmax ties go to the first class."""
    p, y = probs.double().tolist(), target.tolist()
    n = len(y)
    bins = [[] for _ in range(num_bins)]
    top1 = nll = brier = conf_sum = 0.0
    for row, label in zip(p, y):
        conf = max(row)
        pred = row.index(conf)
        conf_sum += conf
        top1 += pred == label
        nll -= math.log(row[label])
        brier += sum((q - (j == label)) ** 2 for j, q in enumerate(row))
        m = min(max(math.ceil(conf * num_bins), 1), num_bins) - 1
        bins[m].append((conf, pred == label))
    ece = sum(
        len(b) / n * abs(sum(c for c, _ in b) / len(b) - sum(a for _, a in b) / len(b)) for b in bins if b
    )
    return {
        "top1_err": 100 * (1 - top1 / n),
        "nll": nll / n,
        "brier": brier / n,
        "ece": 100 * ece,
        "conf_gap": 100 * (conf_sum - top1) / n,
    }


def meter_for(probs, target, num_bins=20, chunks=1):
    meter = ClassificationMeter(num_bins=num_bins)
    for p, t in zip(probs.chunk(chunks), target.chunk(chunks)):
        meter.update(torch.log(p), t)  # softmax(log p) == p
    return meter.compute()


@pytest.mark.parametrize(("n", "c", "bins"), [(500, 10, 20), (64, 1000, 20), (300, 5, 7), (10, 3, 20)])
def test_against_brute_force(n, c, bins):
    probs, target = random_probs(n, c, seed=n + c)
    got = meter_for(probs, target, bins, chunks=3)
    expected = brute_force(probs, target, bins)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert got["num_samples"] == n


def test_against_torchmetrics():
    probs, target = random_probs(2000, 100, seed=3)
    got = meter_for(probs, target, 20, chunks=4)
    ece = MulticlassCalibrationError(num_classes=100, n_bins=20, norm="l1")(probs, target)
    top1 = MulticlassAccuracy(num_classes=100, top_k=1, average="micro")(probs, target)
    top5 = MulticlassAccuracy(num_classes=100, top_k=5, average="micro")(probs, target)
    assert got["ece"] == pytest.approx(100 * ece.item(), abs=1e-4)
    assert got["top1_err"] == pytest.approx(100 * (1 - top1.item()), abs=1e-4)
    assert got["top5_err"] == pytest.approx(100 * (1 - top5.item()), abs=1e-4)
    assert got["nll"] == pytest.approx(torch.nn.functional.nll_loss(probs.log(), target).item(), rel=1e-5)


def test_ties_boundaries_and_empty_bins():
    # Uniform rows (argmax ties, confidence exactly 1/4 on a bin edge) and one-hot rows (confidence 1).
    probs = torch.tensor([[0.25] * 4] * 3 + [[1.0, 0.0, 0.0, 0.0]] * 2 + [[0.0, 0.0, 0.5, 0.5]])
    probs = probs.clamp_min(1e-12) / probs.clamp_min(1e-12).sum(1, keepdim=True)
    target = torch.tensor([0, 1, 2, 0, 1, 3])
    got = meter_for(probs, target, 20)
    expected = brute_force(probs, target, 20)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
    count, _, _ = ClassificationMeter(20).bins()
    assert count.sum() == 0
    with pytest.raises(ValueError, match="no samples"):
        ClassificationMeter(20).compute()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 60),
    c=st.integers(2, 6),
    dim=st.integers(1, 5),
    k=st.integers(1, 3),
    seed=st.integers(0, 999),
)
def test_recall_at_k_against_brute_force(n, c, dim, k, seed):
    rng = np.random.default_rng(seed)
    # Integer-valued features make exact distance ties common.
    features = torch.tensor(rng.integers(0, 3, (n, dim)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, c, n))
    k = min(k, n - 1)
    got = recall_at_k(features, labels, k=k, chunk_size=7)
    assert got == recall_at_k(features, labels, k=k, chunk_size=n)
    if k == 1:
        # With ties, any nearest neighbour may be chosen: the result lies between the strict bounds.
        lo = hi = 0
        for i in range(n):
            d = [((features[i] - features[j]) ** 2).sum().item() if j != i else math.inf for j in range(n)]
            nearest = [j for j in range(n) if d[j] == min(d)]
            same = [labels[j] == labels[i] for j in nearest]
            lo += all(same)
            hi += any(same)
        assert 100 * lo / n - 1e-9 <= got <= 100 * hi / n + 1e-9


def test_recall_at_1_distinct_distances_exact():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(200, 16, generator=g), torch.randint(0, 5, (200,), generator=g)
    expected = 0
    for i in range(200):
        d = ((features - features[i]) ** 2).sum(1)
        d[i] = math.inf
        expected += labels[int(d.argmin())] == labels[i]
    assert recall_at_k(features, labels, 1, chunk_size=33) == pytest.approx(100 * expected.item() / 200)


def test_recall_at_1_near_duplicates_of_large_norm():
    """Pairs of near-duplicates (0.01 apart) far from the origin (norm ~8,000), each with a decoy of
    another class 0.03 away: the matrix-product form of the distance loses them in float32 rounding."""
    g = torch.Generator().manual_seed(0)
    groups = 40
    base = torch.randn(groups, 64, generator=g, dtype=torch.float64) * 1000
    direction = torch.nn.functional.normalize(
        torch.randn(groups, 2, 64, generator=g, dtype=torch.float64), dim=2
    )
    features = torch.cat([base, base + 0.01 * direction[:, 0], base + 0.03 * direction[:, 1]]).float()
    labels = torch.cat([torch.arange(groups), torch.arange(groups), torch.arange(groups) + groups])
    exact = features.double()
    distance = ((exact[:, None] - exact[None]) ** 2).sum(2)
    distance.fill_diagonal_(math.inf)
    nearest = distance.argmin(1)
    expected = 100 * (labels[nearest] == labels).double().mean().item()
    assert expected == pytest.approx(200 / 3), "the duplicates find each other; every decoy misses"
    shortcut = torch.cdist(features, features, compute_mode="use_mm_for_euclid_dist")
    shortcut.fill_diagonal_(math.inf)
    assert (shortcut.argmin(1) != nearest).sum() > groups // 2, (
        "float32 matmul distances pick wrong neighbours"
    )
    assert recall_at_k(features, labels, k=1, chunk_size=50) == pytest.approx(expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), k=3)
    with pytest.raises(ValueError, match="labels"):
        recall_at_k(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_bins"):
        ClassificationMeter(0)
    with pytest.raises(ValueError, match="expected logits"):
        ClassificationMeter().update(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
