"""Uncertainty for probe scores: bootstrap over probe sequences, and verdicts read from intervals.

Every continuous score a probe reports is a mean (or a regression coefficient) over sequences. Its interval
comes from resampling *sequences* (the unit that is independent), never positions. Regressions are
bootstrapped through per-sequence sufficient statistics (``X'X`` and ``X'y`` summed per sequence), so a
replicate is one weighted sum and one small solve, not a refit over every row.

A verdict is read from an interval and a criterion, never from a point estimate against a cut:
``holds`` when the interval clears the criterion, ``fails`` when it lies wholly on the other side,
``inconclusive`` otherwise (:func:`verdict`). :func:`sweep` shows how a verdict moves as its criterion moves.
"""

from __future__ import annotations

import functools
import math
import statistics

import torch

#: bootstrap replicates for probe intervals
REPLICATES = 400
CONFIDENCE = 0.95

HOLDS, FAILS, INCONCLUSIVE, NA = "holds", "fails", "inconclusive", "n/a"

#: reducible error (normalized, above the reference) below which it is not used as a ratio's denominator: an
#: error this small is solved, and a ratio of two vanishing errors amplifies nothing into something
EXCESS_FLOOR = 0.01
#: a layer's read-out counts (a role, a refinement) only where it cuts the best control's reducible error by
#: this fraction, by an interval
SELECT_MARGIN = 0.5
SELECT_SWEEP = (0.0, 0.25, 0.5, 0.75, 0.9)


def resample_weights(n: int, generator: torch.Generator, replicates: int = REPLICATES,
                     dtype=torch.float64) -> torch.Tensor:
    """``[R, n]`` multinomial counts: how often each of ``n`` sequences is drawn in each bootstrap replicate."""
    index = torch.randint(0, n, (replicates, n), generator=generator)
    weights = torch.zeros(replicates, n, dtype=dtype)
    return weights.scatter_add_(1, index, torch.ones_like(index, dtype=dtype))


def interval(samples: torch.Tensor, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval over dim 0 of bootstrap ``samples`` (NaN replicates dropped)."""
    samples = samples.double().flatten()
    samples = samples[torch.isfinite(samples)]
    if samples.numel() == 0:
        return (math.nan, math.nan)
    alpha = (1 - confidence) / 2
    q = torch.quantile(samples, torch.tensor([alpha, 1 - alpha], dtype=samples.dtype))
    return float(q[0]), float(q[1])


def estimate(point, samples: torch.Tensor, confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "ci"}``: the point estimate on all sequences and the bootstrap interval."""
    lo, hi = interval(samples, confidence)
    return {"mean": _round(point), "ci": [_round(lo), _round(hi)]}


def mean_with_ci(per_sequence: torch.Tensor, generator: torch.Generator, weights: torch.Tensor | None = None,
                 confidence: float = CONFIDENCE) -> dict:
    """Mean of ``per_sequence [n]`` (one value per sequence) with its bootstrap interval."""
    x = per_sequence.double().cpu()
    w = resample_weights(len(x), generator) if weights is None else weights
    return estimate(float(x.mean()), (w @ x) / w.sum(1), confidence)


def regression_with_ci(design: torch.Tensor, response: torch.Tensor, generator: torch.Generator,
                       names: list[str], weights: torch.Tensor | None = None, ridge: float = 1e-9,
                       confidence: float = CONFIDENCE) -> dict:
    """Least squares ``response ≈ design @ beta`` with a bootstrap interval for every coefficient.

    ``design [n, rows, k]`` and ``response [n, rows]`` hold the rows of each of ``n`` sequences (rows that
    should not count are all-zero in both). Returns ``{name: {"mean", "ci"}}`` plus ``"_samples" [R, k]``
    for derived statistics (differences of coefficients, ...)."""
    x, y = design.double().cpu(), response.double().cpu()
    xtx = torch.einsum("nri,nrj->nij", x, x)  # per-sequence sufficient statistics
    xty = torch.einsum("nri,nr->ni", x, y)
    k = x.shape[-1]
    scale = torch.diagonal(xtx.sum(0)).mean().clamp_min(1e-12)
    eye = ridge * scale * torch.eye(k, dtype=x.dtype)

    def solve(a, b):
        return torch.linalg.lstsq(a + eye, b[..., None]).solution[..., 0]

    point = solve(xtx.sum(0), xty.sum(0))
    w = resample_weights(len(x), generator) if weights is None else weights
    samples = solve(torch.einsum("rn,nij->rij", w, xtx), w @ xty)  # [R, k]
    out = {name: estimate(float(point[i]), samples[:, i], confidence) for i, name in enumerate(names)}
    out["_samples"] = samples
    out["_point"] = point
    return out


def ratio(num: torch.Tensor, den: torch.Tensor, boot) -> dict:
    """``mean(num) / max(mean(den), EXCESS_FLOOR)`` of two per-sequence quantities, with the interval of
    ``boot`` (one resampling of sequences applied to both alike)."""
    return estimate(float(num.mean() / den.mean().clamp_min(EXCESS_FLOOR)),
                    boot(num) / boot(den).clamp_min(EXCESS_FLOOR))


def relative_drop(before: torch.Tensor, after: torch.Tensor, reference: torch.Tensor, boot) -> dict:
    """How much a per-sequence error falls from ``before`` to ``after``, relative to the *reducible* part of
    ``before`` (its excess over ``reference``, floored at ``EXCESS_FLOOR``)."""
    return ratio(before - after, before - reference, boot)


def selectivity(error: torch.Tensor, control: torch.Tensor, reference: torch.Tensor, boot) -> dict:
    """The fraction of a control's reducible error that the model's read-out removes: 1 − excess / control
    excess (1: solved where the control is not; 0: no better than an untrained network)."""
    return relative_drop(control, error, reference, boot)


def verdict(ci, criterion: float = 0.0, above: bool = True) -> str:
    """``holds`` when the whole interval is beyond ``criterion`` (above it when ``above``), ``fails`` when the
    whole interval is on the other side, ``inconclusive`` when it straddles; ``n/a`` without an interval."""
    if ci is None or any(v is None or not math.isfinite(v) for v in ci):
        return NA
    lo, hi = ci
    if not above:
        lo, hi, criterion = -hi, -lo, -criterion
    if lo > criterion:
        return HOLDS
    if hi < criterion:
        return FAILS
    return INCONCLUSIVE


def within(ci, lo: float, hi: float) -> str:
    """An equivalence test: ``holds`` when the whole interval lies inside ``[lo, hi]``, ``fails`` when it lies
    wholly outside (above ``hi`` or below ``lo``), ``inconclusive`` otherwise; ``n/a`` without an interval."""
    if ci is None or any(v is None or not math.isfinite(v) for v in ci):
        return NA
    if lo <= ci[0] and ci[1] <= hi:
        return HOLDS
    if ci[0] > hi or ci[1] < lo:
        return FAILS
    return INCONCLUSIVE


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: its density integrated by Simpson's
    rule (2,000 panels) and inverted by bisection; accurate to ~1e-9 for the quantiles intervals use."""
    if df < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t):  # P(T <= t) for t >= 0
        x = torch.linspace(0, t, 2001, dtype=torch.float64)
        f = const * (1 + x * x / df) ** (-(df + 1) / 2)
        w = torch.ones(2001, dtype=torch.float64)
        w[1:-1:2], w[2:-1:2] = 4, 2
        return 0.5 + float((w * f).sum()) * t / 6000

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def seed_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Interval for the mean over independently trained models (seeds): Student's t, mean ± t·sd/√n. Exact
    coverage for normal data at every n (a percentile bootstrap over 3 to 10 seeds covers 75-90 % where it
    says 95 %); ``None`` below two values."""
    x = [float(v) for v in values]
    if len(x) < 2:
        return None
    half = t_quantile(0.5 + confidence / 2, len(x) - 1) * statistics.stdev(x) / math.sqrt(len(x))
    m = statistics.fmean(x)
    return m - half, m + half


def share_ci(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``k / n`` (e.g. the share of independently trained models in
    which a claim holds); ``None`` when ``n == 0``. Unlike the bootstrap it stays honest at k = 0 or k = n
    and for small n, where the share of seeds is decided."""
    if n <= 0:
        return None
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sweep(ci, criteria, above: bool = True) -> dict[str, str]:
    """The verdict at each criterion in ``criteria``: how a label moves when its cut moves."""
    return {f"{c:g}": verdict(ci, c, above) for c in criteria}


def combine(*labels: str) -> str:
    """A claim made of parts that must all hold: fails if any part fails, holds if all hold, n/a if a part
    cannot be tested, inconclusive otherwise."""
    if NA in labels:
        return NA
    if FAILS in labels:
        return FAILS
    if all(label == HOLDS for label in labels):
        return HOLDS
    return INCONCLUSIVE


def any_of(labels: list[str]) -> str:
    """At least one of several candidates (heads, layers) holds: holds if any holds, fails if all fail."""
    labels = [label for label in labels if label != NA]
    if not labels:
        return NA
    if HOLDS in labels:
        return HOLDS
    if all(label == FAILS for label in labels):
        return FAILS
    return INCONCLUSIVE


def _round(x):
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None
