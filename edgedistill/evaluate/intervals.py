"""95% bootstrap intervals for every score and share eval reports, so that a small held-out set
says how much its numbers can be trusted.

    python -c "from edgedistill.evaluate.intervals import bootstrap_mean; print(bootstrap_mean([1.0, 0.0] * 64))"

The choices, the same for every number:
- percentile bootstrap: the interval is the 2.5th and 97.5th percentiles of the statistic over
  resamples of the examples (drawn with replacement, as many as there are). It assumes nothing
  about the shape of the scores (0/1 labels, chrF in [0, 1], JSON field shares) and stays inside
  their range;
- 2000 resamples: the percentiles then move by well under a point from one seed to another;
- paired resampling: artifacts (and the teacher) answer the same held-out examples, so a
  difference or a share of the teacher resamples example indices jointly and keeps each example's
  values together. How hard an example is then cancels out, and the interval is that of the
  difference itself, far narrower than two separate intervals would suggest.

Why it matters: on 128 examples a score near 0.8 has an interval of about ±0.07, and two artifacts
that disagree on one example in ten still differ by about ±0.055 paired, so a 2-point difference
is within the noise. `within_noise` says so for the report.

Every function is deterministic for a given seed: the same values give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SAMPLES = 2000
LEVEL = 0.95
# resampled indices are drawn in blocks of about this many, so that 2000 resamples of a large
# held-out set do not hold samples x n indices at once
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Interval:
    """A statistic over n examples and its bootstrap interval [low, high]; all None when n is 0
    (or, for a ratio, when its denominator's mean is 0)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def contains(self, value: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def _columns(*values: Sequence[float]) -> list[np.ndarray]:
    columns = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
    if len({len(c) for c in columns}) > 1:
        raise ValueError(f"paired values differ in length: {[len(c) for c in columns]}")
    for column in columns:
        if not np.all(np.isfinite(column)):
            raise ValueError("bootstrap values must be finite numbers")
    return columns


def _check(samples: int, level: float) -> None:
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, not {level}")


def _resampled_means(columns: list[np.ndarray], samples: int, seed: int) -> list[np.ndarray]:
    """Per column, the mean of each of `samples` resamples; every column uses the same indices."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    means: list[list[np.ndarray]] = [[] for _ in columns]
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, samples, block):
        indices = rng.integers(0, n, size=(min(block, samples - start), n))
        for out, column in zip(means, columns):
            out.append(column[indices].mean(axis=1))
    return [np.concatenate(parts) for parts in means]


def _percentiles(statistics: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(statistics, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_mean(values: Sequence[float], *, samples: int = SAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of `values` and its percentile bootstrap interval; one value has a zero-width one."""
    _check(samples, level)
    (column,) = _columns(values)
    n = len(column)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = float(column.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1)
    (means,) = _resampled_means([column], samples, seed)
    return Interval(mean, *_percentiles(means, level), n)


def bootstrap_ratio(numerator_values: Sequence[float], denominator_values: Sequence[float], *,
                    samples: int = SAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """mean(numerator) / mean(denominator) on paired examples (an artifact's score as a share of
    the teacher's on the same examples), resampling example indices jointly. None throughout when
    the denominator's mean is 0; a resample whose denominator mean is 0 is left out of the
    percentiles."""
    _check(samples, level)
    numerator, denominator = _columns(numerator_values, denominator_values)
    n = len(numerator)
    if n == 0 or denominator.mean() == 0:
        return Interval(None, None, None, n)
    ratio = float(numerator.mean() / denominator.mean())
    if n == 1:
        return Interval(ratio, ratio, ratio, 1)
    top, bottom = _resampled_means([numerator, denominator], samples, seed)
    kept = bottom != 0
    return Interval(ratio, *_percentiles(top[kept] / bottom[kept], level), n)


def paired_difference(a: Sequence[float], b: Sequence[float], *, samples: int = SAMPLES, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """The mean of a - b over the same examples and its interval (resampling the pairs jointly is
    resampling their differences)."""
    first, second = _columns(a, b)
    return bootstrap_mean(first - second, samples=samples, seed=seed, level=level)


def within_noise(a: Sequence[float], b: Sequence[float], *, samples: int = SAMPLES, seed: int = 0,
                 level: float = LEVEL) -> bool:
    """Whether two artifacts' scores on the same examples differ by less than the noise: the paired
    difference's interval contains 0. Fewer than two examples give no noise to measure a difference
    against, so they never tell two artifacts apart (True)."""
    difference = paired_difference(a, b, samples=samples, seed=seed, level=level)
    return difference.n < 2 or difference.contains(0.0)
