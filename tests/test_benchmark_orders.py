"""The benchmarks' pass orders: every system in every place, after every other equally."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks._common import balanced_orders


@pytest.mark.parametrize("n", range(1, 9))
def test_orders_are_balanced_for_place_and_predecessor(n):
    rows = balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    for place in range(n):  # each system equally often in each place
        assert set(Counter(row[place] for row in rows).values()) == {len(rows) // n}
    follows = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    assert len(follows) == n * (n - 1)  # every ordered pair of systems occurs ...
    assert len(set(follows.values())) <= 1  # ... equally often
