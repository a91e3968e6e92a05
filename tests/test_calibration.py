"""Temperature scaling against a brute-force grid search over T and direct metric computations."""

import math

import numpy as np
import pytest
import torch
from calibration_reference import calibration_metrics, grid_temperature, nll

from timm_cskd.calibration import (
    T_MAX,
    T_MIN,
    fit_temperature,
    nll_at_temperature,
    temperature_scaled_metrics,
)


def sampled(n, c, scale, seed):
    """Labels drawn from softmax(z), logits ``scale * z``: the NLL-optimal temperature is near ``scale``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, c))
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=p) for p in probs])
    return torch.tensor(scale * z, dtype=torch.float32), torch.tensor(labels)


@pytest.mark.parametrize(("scale", "n", "c"), [(3.0, 3000, 10), (0.4, 3000, 5), (1.0, 500, 100)])
def test_fit_matches_grid_search(scale, n, c):
    logits, labels = sampled(n, c, scale, seed=c)
    fitted = fit_temperature(logits, labels)
    best, step = grid_temperature(logits.numpy(), labels.numpy())
    assert abs(math.log(fitted) - math.log(best)) <= step
    assert nll(logits.numpy(), labels.numpy(), fitted) <= nll(logits.numpy(), labels.numpy(), best) + 1e-12
    assert fitted == pytest.approx(scale, rel=0.1), "labels drawn at temperature 1 of logits / scale"
    assert nll_at_temperature(logits, labels, fitted) == pytest.approx(
        nll(logits.numpy(), labels.numpy(), fitted), rel=1e-12
    )


def test_minimum_beyond_the_bracket_returns_the_bound():
    logits = torch.tensor([[4.0, 0.0, -1.0], [0.0, 3.0, 1.0], [-2.0, 0.0, 5.0]])
    # Every sample right with a margin: the NLL keeps falling as T -> 0.
    assert fit_temperature(logits, torch.tensor([0, 1, 2])) == T_MIN
    # The label always has the lowest logit: the NLL keeps falling as T grows.
    assert fit_temperature(logits, torch.tensor([2, 0, 0])) == T_MAX


def test_scaled_metrics_equal_direct_computation():
    logits, labels = sampled(2000, 10, 2.5, seed=7)
    temperature = fit_temperature(logits, labels)
    got = temperature_scaled_metrics(logits, labels, temperature, num_bins=15)
    expected = calibration_metrics(logits.double().numpy() / temperature, labels.numpy(), num_bins=15)
    assert set(got) == {"nll_ts", "ece_ts", "conf_gap_ts"}
    for key, value in expected.items():
        assert got[f"{key}_ts"] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    before = calibration_metrics(logits.numpy(), labels.numpy(), num_bins=15)
    assert before["conf_gap"] > 10 and abs(got["conf_gap_ts"]) < 2, "scaling removes the over-confidence"


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected logits"):
        fit_temperature(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="expected logits"):
        fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        fit_temperature(torch.tensor([[0.0, math.inf]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels outside \[0, 2\)"):
        fit_temperature(torch.zeros(2, 2), torch.tensor([0, 2]))
