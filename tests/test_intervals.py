"""Bootstrap intervals of edgedistill.evaluate.intervals on cases whose answer is known.

    .venv/bin/python -m pytest -q tests/test_intervals.py
"""

from __future__ import annotations

import numpy as np
import pytest

from edgedistill.evaluate.intervals import (Interval, bootstrap_mean, bootstrap_ratio, paired_difference,
                                            within_noise)
from edgedistill.evaluate.scoring import kl_interval
from edgedistill.export.verify import Agreement


@pytest.mark.unit
def test_equal_values_have_a_zero_width_interval():
    assert bootstrap_mean([0.5] * 40) == Interval(0.5, 0.5, 0.5, 40)


@pytest.mark.unit
def test_no_values_and_one_value():
    assert bootstrap_mean([]) == Interval(None, None, None, 0)
    assert bootstrap_mean([0.25]) == Interval(0.25, 0.25, 0.25, 1)
    assert not Interval(None, None, None, 0).contains(0.0)


@pytest.mark.unit
def test_half_right_on_128_examples_is_about_plus_minus_0_087():
    # the normal approximation: 1.96 * sqrt(0.25 / 128) = 0.0866
    interval = bootstrap_mean([1.0, 0.0] * 64)
    assert interval.mean == 0.5 and interval.n == 128
    assert interval.low < 0.5 < interval.high
    assert 0.075 < (interval.high - interval.low) / 2 < 0.1
    assert abs((0.5 - interval.low) - (interval.high - 0.5)) < 0.02


@pytest.mark.unit
def test_more_examples_narrow_the_interval():
    small, large = bootstrap_mean([1.0, 0.0] * 16), bootstrap_mean([1.0, 0.0] * 256)
    assert large.high - large.low < (small.high - small.low) / 2


@pytest.mark.unit
def test_same_seed_same_interval_other_seed_other_interval():
    values = [1.0, 0.0, 0.0, 1.0, 1.0] * 20
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    assert bootstrap_mean(values, seed=3) != bootstrap_mean(values, seed=4)
    assert paired_difference(values, values[::-1], seed=1) == paired_difference(values, values[::-1], seed=1)


@pytest.mark.unit
def test_level_widens_the_interval():
    values = [1.0, 0.0, 0.0] * 30
    narrow, wide = bootstrap_mean(values, level=0.5), bootstrap_mean(values, level=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


@pytest.mark.unit
def test_many_examples_are_resampled_in_blocks():
    # 2000 x 5000 indices would be 80 MB at once; blocks give the same kind of interval
    interval = bootstrap_mean([1.0, 0.0] * 2500, samples=300)
    assert 0.48 < interval.low < 0.5 < interval.high < 0.52


@pytest.mark.unit
def test_paired_difference_of_identical_lists_is_zero_and_within_noise():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.3] * 10
    assert paired_difference(values, values) == Interval(0.0, 0.0, 0.0, 60)
    assert within_noise(values, values)


@pytest.mark.unit
def test_a_clear_difference_is_not_within_noise():
    better, worse = [1.0] * 100, [1.0] * 50 + [0.0] * 50
    difference = paired_difference(better, worse)
    assert difference.mean == 0.5 and difference.low > 0.3
    assert not within_noise(better, worse)


@pytest.mark.unit
def test_two_points_on_128_examples_is_within_noise():
    # the module docstring's claim: they disagree on 13 examples, 8 to 5
    a = [1.0] * 100 + [0.0] * 28
    b = [1.0] * 92 + [0.0] * 8 + [1.0] * 5 + [0.0] * 23
    assert round(paired_difference(a, b).mean, 3) == 0.023
    assert within_noise(a, b)


@pytest.mark.unit
def test_pairing_is_narrower_than_two_separate_intervals():
    # the same hard examples are missed by both, save one: paired, the difference is tiny
    a = [1.0, 0.0] * 64
    b = a[:-2] + [0.0, 0.0]
    separate = bootstrap_mean(a).high - bootstrap_mean(a).low
    paired = paired_difference(a, b)
    assert paired.high - paired.low < separate / 4


@pytest.mark.unit
def test_fewer_than_two_examples_never_tell_artifacts_apart():
    assert within_noise([1.0], [0.0])
    assert within_noise([], [])


@pytest.mark.unit
def test_ratio_of_paired_means():
    student = [1.0, 0.0, 1.0, 1.0] * 25
    teacher = [1.0, 1.0, 1.0, 1.0] * 25
    share = bootstrap_ratio(student, teacher)
    assert share.mean == 0.75 and share.n == 100
    assert share.low < 0.75 < share.high < 1.0
    assert bootstrap_ratio(student, teacher, seed=2) == bootstrap_ratio(student, teacher, seed=2)


@pytest.mark.unit
def test_ratio_is_none_when_the_denominator_mean_is_zero():
    assert bootstrap_ratio([1.0, 0.0], [0.0, 0.0]) == Interval(None, None, None, 2)
    # resamples that happen to draw only the zero are left out
    share = bootstrap_ratio([0.5, 0.5], [1.0, 0.0])
    assert share.mean == 1.0 and share.low == 0.5 and share.high == 1.0


@pytest.mark.unit
def test_bad_input_is_a_programming_error():
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([0.5, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([0.5], level=95)


@pytest.mark.unit
def test_the_mean_kl_interval_resamples_records():
    """eval's KL to the reference is a mean over positions; its interval resamples whole records, so
    one record far from the reference (an answer near a decision) widens it as it moves the mean."""
    reference, near, far = (np.log(np.array(p)) for p in ([[0.5, 0.5], [0.9, 0.1]], [[0.45, 0.55], [0.88, 0.12]],
                                                       [[0.05, 0.95], [0.9, 0.1]]))
    even, skewed = Agreement(), Agreement()
    for i in range(64):
        even.add(reference, near)
        skewed.add(reference, far if i == 0 else reference)
    for agreement in (even, skewed):
        interval = kl_interval(agreement)
        assert interval.n == 64 and interval.mean == pytest.approx(agreement.mean_kl)
        assert interval.low - 1e-12 <= agreement.mean_kl <= interval.high + 1e-12
    assert kl_interval(even).high - kl_interval(even).low < 1e-9  # every record alike
    # one far record carries the mean: resamples without it give 0, with it twice, twice the mean
    assert kl_interval(skewed).low == pytest.approx(0, abs=1e-12) and kl_interval(skewed).high >= 2 * skewed.mean_kl
