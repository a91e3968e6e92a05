"""Brute-force references for temperature scaling and calibration metrics, written from the definitions
(Guo et al. 2017) in float64 numpy, independent of timm_cskd's implementations."""

import numpy as np


def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def nll(logits, labels, temperature=1.0):
    logits = np.asarray(logits, dtype=np.float64)
    return float(-log_softmax(logits / temperature)[np.arange(len(labels)), labels].mean())


def grid_temperature(logits, labels, t_min=1e-2, t_max=1e2, points=401, rounds=4):
    """Grid search for the NLL-minimal T on log-spaced grids, each round a finer grid over two steps
    either side of the previous best; returns T and the last grid's step in log T."""
    logits = np.asarray(logits, dtype=np.float64)
    lo, hi = np.log(t_min), np.log(t_max)
    for _ in range(rounds):
        log_t = np.linspace(lo, hi, points)
        best = int(np.argmin([nll(logits, labels, t) for t in np.exp(log_t)]))
        step = log_t[1] - log_t[0]
        lo, hi = max(log_t[best] - 2 * step, lo), min(log_t[best] + 2 * step, hi)
    return float(np.exp(log_t[best])), float(step)


def calibration_metrics(logits, labels, num_bins=20):
    """NLL, ECE (bins ((m-1)/M, m/M], percent) and mean confidence minus accuracy (percent)."""
    probs = np.exp(log_softmax(np.asarray(logits, dtype=np.float64)))
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    ece = 0.0
    for m in range(num_bins):
        members = (conf > m / num_bins) & (conf <= (m + 1) / num_bins)
        if m == 0:
            members |= conf <= 0
        if members.any():
            ece += members.mean() * abs(conf[members].mean() - correct[members].mean())
    return {
        "nll": nll(logits, labels),
        "ece": 100 * ece,
        "conf_gap": 100 * (conf.mean() - correct.mean()),
    }
