"""The assignment kernels behind the router policies."""

from __future__ import annotations

import numpy as np

from twin import routing


def test_water_fill_sends_a_single_job_to_the_cheapest() -> None:
    j = routing.water_fill(np.array([5.0, 1.0, 3.0]), np.ones(3), np.array([10.0]))
    assert j.tolist() == [1]


def test_water_fill_levels_the_load() -> None:
    cost = np.array([0.0, 100.0, 50.0, 1000.0])
    sizes = np.full(300, 1.0)
    j = routing.water_fill(cost, np.ones(4), sizes)
    final = cost + np.bincount(j, weights=sizes, minlength=4)
    assert np.bincount(j, minlength=4)[3] == 0  # the far-off candidate gets nothing
    assert final[:3].max() - final[:3].min() <= 2.0


def test_water_fill_respects_speed() -> None:
    # candidate 1 is twice as fast (half the marginal cost): it takes twice the work
    j = routing.water_fill(np.zeros(2), np.array([2.0, 1.0]), np.ones(300))
    counts = np.bincount(j, minlength=2)
    assert abs(counts[1] - 2 * counts[0]) <= 3


def test_rotate_cycles_from_the_counter() -> None:
    assert routing.rotate(3, 5, 2).tolist() == [2, 0, 1, 2, 0]


def test_apportion_is_exact_over_time() -> None:
    shares = np.array([0.5, 0.3, 0.2])
    credit = np.zeros(3)
    total = np.zeros(3, dtype=int)
    for k in (1, 2, 3, 7, 1, 1, 5):  # 20 jobs in uneven batches
        j, credit = routing.apportion(shares, k, credit)
        assert j.size == k
        total += np.bincount(j, minlength=3)
    assert total.tolist() == [10, 6, 4]
