"""Fitting measured message times: alpha + beta x bytes, piecewise by size where one line does not fit.

Fits minimize the squared *relative* error (each point weighted by 1/time^2), so an 8-byte message counts
as much as a 64 MiB one: alpha comes from the small sizes, beta from the large ones. Coefficients are kept
>= 0 (a negative one is pinned at 0 and the other refitted).

`fit_piecewise` tries 1..max_segments size ranges, each range contiguous in the measured sizes with at
least `min_points` of them, breakpoints searched exhaustively, and takes k ranges over the fewer ones it
has only where they cut the RMS relative error clearly (by `improvement`) while the error is not already
small (`good_enough`): a transport with an eager/rendezvous switch gets two lines, a plain one keeps one,
and one with a switch and a cache cliff gets three even where two alone would not pay (each of the two
kinks is only half the story).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from commlab.collectives.calibration import LinkFit, Segment
from commlab.errors import invalid

GOOD_ENOUGH = 0.03  # RMS relative error below which one more range is not worth it
IMPROVEMENT = 0.7  # more ranges must bring the RMS relative error below this fraction of the fewer


def fit_line(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) >= 0 minimizing sum(((alpha + beta x size) - time) / time)^2."""
    s, t = _arrays(sizes, times, minimum=1)
    if len(s) == 1:
        return float(t[0]), 0.0
    a = np.stack([1 / t, s / t], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if alpha < 0:
        x = s / t
        alpha, beta = 0.0, float(x.sum() / (x * x).sum())
    if beta < 0:
        x = 1 / t
        alpha, beta = float(x.sum() / (x * x).sum()), 0.0
    return float(alpha), float(beta)


def relative_errors(fit: LinkFit, sizes: Sequence[float], times: Sequence[float]) -> np.ndarray:
    """(fit - measured) / measured at each size."""
    s, t = _arrays(sizes, times, minimum=1)
    return np.array([fit.time(x) for x in s]) / t - 1


def r_squared(fit: LinkFit, sizes: Sequence[float], times: Sequence[float]) -> float:
    """1 - SS_res / SS_tot of the fit on log(time) (on the raw times large sizes would decide alone)."""
    s, t = _arrays(sizes, times, minimum=1)
    predicted = np.log([fit.time(x) for x in s])
    observed = np.log(t)
    total = float(((observed - observed.mean()) ** 2).sum())
    residual = float(((observed - predicted) ** 2).sum())
    return 1.0 - residual / total if total > 0 else 1.0


@dataclass(frozen=True)
class _Candidate:
    cuts: tuple[int, ...]  # index where each range after the first starts
    lines: tuple[tuple[float, float], ...]
    rms: float


def _candidate(s: np.ndarray, t: np.ndarray, cuts: tuple[int, ...]) -> _Candidate:
    bounds = (0, *cuts, len(s))
    lines, squared = [], 0.0
    for lo, hi in itertools.pairwise(bounds):
        alpha, beta = fit_line(s[lo:hi], t[lo:hi])
        lines.append((alpha, beta))
        squared += float((((alpha + beta * s[lo:hi]) / t[lo:hi] - 1) ** 2).sum())
    return _Candidate(cuts, tuple(lines), math.sqrt(squared / len(s)))


def fit_piecewise(
    sizes: Sequence[float],
    times: Sequence[float],
    max_segments: int = 3,
    min_points: int = 3,
    good_enough: float = GOOD_ENOUGH,
    improvement: float = IMPROVEMENT,
) -> LinkFit:
    """A LinkFit of 1..max_segments size ranges (see the module docstring for how many are kept).

    A range boundary lies at the geometric mean of the last size of one range and the first of the next.
    """
    if not isinstance(max_segments, int) or max_segments < 1:
        raise invalid("max_segments", max_segments, "an integer >= 1")
    if not isinstance(min_points, int) or min_points < 2:
        raise invalid("min_points", min_points, "an integer >= 2")
    s, t = _arrays(sizes, times, minimum=1)
    order = np.argsort(s)
    s, t = s[order], t[order]
    best = _candidate(s, t, ())
    for count in range(2, max_segments + 1):
        if best.rms <= good_enough or len(s) < count * min_points:
            break
        options = [
            cuts
            for cuts in itertools.combinations(range(min_points, len(s) - min_points + 1), count - 1)
            if all(b - a >= min_points for a, b in itertools.pairwise(cuts))
        ]
        if not options:
            break
        candidate = min((_candidate(s, t, cuts) for cuts in options), key=lambda c: c.rms)
        if candidate.rms < improvement * best.rms:
            best = candidate
    segments = []
    for i, (alpha, beta) in enumerate(best.lines):
        bound = math.inf if i == len(best.lines) - 1 else math.sqrt(s[best.cuts[i] - 1] * s[best.cuts[i]])
        segments.append(Segment(float(bound), alpha, beta))
    provisional = LinkFit(tuple(segments))
    errors = relative_errors(provisional, s, t)
    return LinkFit(tuple(segments), r_squared(provisional, s, t), float(np.abs(errors).max()))


def fit_gamma(sizes: Sequence[float], times: Sequence[float], largest: int = 2) -> float:
    """Seconds per byte of a reduction or a local copy: the median time per byte at the `largest` largest
    measured sizes. Why those: the buffers of the large collectives this cost matters for do not fit in
    the caches, and a reduction there runs at a fraction of its in-cache speed (4 vs 15 GB/s with 4 ranks
    on this 2-core host); a fit over all sizes would take the in-cache rate."""
    s, t = _arrays(sizes, times, minimum=1)
    if not np.all(s > 0):
        raise invalid("sizes", sizes, "byte counts > 0")
    order = np.argsort(s)[-largest:]
    return float(np.median(t[order] / s[order]))


def _arrays(sizes: Sequence[float], times: Sequence[float], minimum: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sizes, dtype=float)
    t = np.asarray(times, dtype=float)
    if s.shape != t.shape or s.ndim != 1 or len(s) < minimum:
        raise invalid("sizes/times", (len(s), len(t)), f"two equal-length lists of at least {minimum} values")
    if not (np.all(np.isfinite(s)) and np.all(s >= 0)):
        raise invalid("sizes", sizes, "finite byte counts >= 0")
    if not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise invalid("times", times, "finite times > 0 seconds")
    return s, t
