"""Welch's t-test between two groups of seeds, and the Student t distribution it needs.

The t distribution is written out (its two-sided tail through the regularised incomplete beta function,
Numerical Recipes' continued fraction) because scipy is not a dependency of timm-cskd; the tests check it
against ``scipy.stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev

__all__ = ["Welch", "t_critical", "t_two_sided_p", "welch", "welch_from_stats"]

ALPHA = 0.05  # the two-sided level a difference is marked at


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return h


def _regularised_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _regularised_beta(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df: float, alpha: float = ALPHA) -> float:
    """The |t| beyond which a two-sided test at level ``alpha`` rejects, for ``df`` degrees of freedom."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > alpha:
        low, high = high, 2.0 * high
    for _ in range(200):  # bisection: the tail is monotone in |t|
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_two_sided_p(middle, df) > alpha else (low, middle)
        if high - low < 1e-12 * high:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Welch:
    """A method's mean minus the baseline's, with Welch's t, its Welch-Satterthwaite degrees of freedom,
    the two-sided p and whether |t| passes the two-sided ``ALPHA`` level (``t`` is None with one seed on
    either side, no spread on both, or a value that is not finite)."""

    difference: float
    t: float | None = None
    df: float | None = None
    p: float | None = None
    critical: float | None = None
    why_not: str = ""  # why there is no t: "one seed", "no seed spread" or "not finite"

    @property
    def significant(self) -> bool:
        return self.t is not None and abs(self.t) > self.critical


def welch_from_stats(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int) -> Welch:
    """Welch's t of ``a - b`` from each side's mean, sample standard deviation (ddof=1) and count."""
    difference = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return Welch(difference, why_not="one seed")
    var_a, var_b = sd_a**2 / n_a, sd_b**2 / n_b
    if var_a + var_b == 0.0:
        return Welch(difference, why_not="no seed spread")
    t = difference / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    return Welch(difference, t, df, t_two_sided_p(t, df), t_critical(df))


def welch(a, b) -> Welch:
    """Welch's t-test of the mean of ``a`` minus the mean of ``b`` (unequal variances); no t where a
    value is NaN or infinite (a diverged run's NLL, say)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if not all(math.isfinite(v) for v in a + b):
        return Welch(mean(a) - mean(b), why_not="not finite")
    sd = [stdev(v) if len(v) > 1 else 0.0 for v in (a, b)]
    return welch_from_stats(mean(a), sd[0], len(a), mean(b), sd[1], len(b))
