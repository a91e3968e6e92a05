"""Classification and calibration metrics as the CS-KD paper reports them.

Top-1/top-5 error, NLL, Brier score, the expected calibration error (ECE, Guo et al. 2017) with
20 equal-width confidence bins (the paper's choice) and the confidence gap (mean confidence minus
accuracy), accumulated as per-bin sums so that ranks can all-reduce them and every validation image counts
exactly once; recall@k on penultimate pooled features with L2 distance, in chunks so 50,000 images never
need an N x N distance matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ClassificationMeter", "ece_from_bins", "recall_at_k", "DEFAULT_ECE_BINS"]

DEFAULT_ECE_BINS = 20


def ece_from_bins(count: torch.Tensor, conf_sum: torch.Tensor, correct_sum: torch.Tensor) -> float:
    """ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| from per-bin counts and sums, as a fraction."""
    n = count.sum()
    if n == 0:
        return float("nan")
    return float((conf_sum - correct_sum).abs().sum() / n)


class ClassificationMeter:
    """Accumulates the sums behind top-k error, NLL, Brier and ECE on the logits' device (no host sync).

    ``update(logits, target)`` per batch, ``all_reduce()`` once under torch.distributed, ``compute()``.
    Errors, ECE and ``conf_gap`` (mean confidence minus accuracy; positive when over-confident) are
    reported in percent, as in the paper; NLL and Brier as means.
    """

    def __init__(self, num_bins: int = DEFAULT_ECE_BINS, device: torch.device | str = "cpu"):
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        # Layout: [n, top1 correct, top5 correct, nll sum, brier sum], then count/conf/correct per bin.
        self.sums = torch.zeros(5 + 3 * num_bins, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits (N, C) and target (N,), got {tuple(logits.shape)}, {tuple(target.shape)}"
            )
        logits = logits.float()
        if self.sums.device != logits.device:
            self.sums = self.sums.to(logits.device)
        log_probs = torch.log_softmax(logits, dim=1)
        probs = log_probs.exp()
        conf, pred = probs.max(dim=1)
        correct = (pred == target).double()
        topk = min(5, logits.shape[1])
        top5 = (log_probs.topk(topk, dim=1).indices == target[:, None]).any(dim=1).double()
        nll = -log_probs.gather(1, target[:, None]).squeeze(1)
        brier = (probs.square().sum(1) - 2 * probs.gather(1, target[:, None]).squeeze(1) + 1).double()
        # Bin m holds confidences in (m/M, (m+1)/M]; confidence 1.0 falls into the last bin.
        bins = (conf * self.num_bins).ceil().long().clamp_(1, self.num_bins) - 1
        s, nb = self.sums, self.num_bins
        s[0] += len(target)
        s[1] += correct.sum()
        s[2] += top5.sum()
        s[3] += nll.double().sum()
        s[4] += brier.sum()
        s[5 : 5 + nb].index_add_(0, bins, torch.ones_like(correct))
        s[5 + nb : 5 + 2 * nb].index_add_(0, bins, conf.double())
        s[5 + 2 * nb :].index_add_(0, bins, correct)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def bins(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-bin (count, confidence sum, correct sum) on the CPU, for reliability diagrams."""
        s, nb = self.sums.cpu(), self.num_bins
        return s[5 : 5 + nb], s[5 + nb : 5 + 2 * nb], s[5 + 2 * nb :]

    def compute(self) -> dict[str, float]:
        s = self.sums.cpu()
        n = float(s[0])
        if n == 0:
            raise ValueError("no samples were evaluated")
        count, conf_sum, correct_sum = self.bins()
        return {
            "top1_err": 100.0 * (1 - float(s[1]) / n),
            "top5_err": 100.0 * (1 - float(s[2]) / n),
            "nll": float(s[3]) / n,
            "brier": float(s[4]) / n,
            "ece": 100.0 * ece_from_bins(count, conf_sum, correct_sum),
            "conf_gap": 100.0 * float(conf_sum.sum() - correct_sum.sum()) / n,
            "num_samples": int(n),
        }


def recall_at_k(
    features: torch.Tensor, labels: torch.Tensor, k: int = 1, chunk_size: int = 1024, candidates: int = 32
) -> float:
    """Percent of samples with a same-class sample among their k nearest neighbours (L2, self excluded).

    cdist's matrix-product form ``|q|^2 + |x|^2 - 2 q.x`` cancels catastrophically in float32 (or TF32)
    for near neighbours of large norm and can pick the wrong one. So a float32 matrix product (fast on
    every GPU) only shortlists each query's ``k + candidates`` nearest, and those are re-ranked by exact
    float64 differences: float64 work stays O(N * candidates * D) instead of O(N^2 * D), which matters on
    GPUs with slow float64. ``chunk_size`` queries at a time keep memory at O(chunk_size * N).
    """
    n = features.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    single, double = features.float(), features.double()
    shortlist = min(k + candidates, n - 1)
    hits = 0
    for start in range(0, n, chunk_size):
        query = single[start : start + chunk_size]
        rows = torch.arange(len(query), device=features.device)
        distance = torch.cdist(query, single)
        distance[rows, rows + start] = float("inf")
        near = distance.topk(shortlist, dim=1, largest=False).indices
        del distance
        for sub in range(0, len(query), 64):  # exact distances to the shortlist, 64 queries at a time
            picked = near[sub : sub + 64]
            exact = (
                (double[start + sub : start + sub + len(picked), None, :] - double[picked]).square().sum(-1)
            )
            neighbours = picked.gather(1, exact.topk(k, dim=1, largest=False).indices)
            own = labels[start + sub : start + sub + len(picked), None]
            hits += int((labels[neighbours] == own).any(dim=1).sum())
    return 100.0 * hits / n
