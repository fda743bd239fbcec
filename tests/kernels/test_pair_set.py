"""The compiled (query, id) pair set against Python's set."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dynembed.kernels.pair_set import pair_set, pair_set_contains

int64s = st.integers(-2**63, 2**63 - 1)
pairs = st.lists(st.tuples(st.integers(-3, 3), int64s), max_size=60)


@settings(max_examples=100, deadline=None)
@given(members=pairs, probes=pairs)
def test_membership_equals_a_python_set(members, probes):
    q = np.array([p[0] for p in members], dtype=np.int64)
    ids = np.array([p[1] for p in members], dtype=np.int64)
    table = pair_set(q, ids)
    asked = members + probes + [(b, a) for a, b in members if -3 <= b <= 3]
    aq = np.array([p[0] for p in asked], dtype=np.int64)
    aid = np.array([p[1] for p in asked], dtype=np.int64)
    got = pair_set_contains(*table, aq, aid)
    assert got.tolist() == [p in set(members) for p in asked]


def test_large_sets_on_many_threads():
    rng = np.random.default_rng(0)
    q, ids = rng.integers(0, 1000, 200_000), rng.integers(-2**63, 2**63 - 1, 200_000)
    table = pair_set(q, ids)
    assert pair_set_contains(*table, q, ids).all()
    assert not pair_set_contains(*table, q + 1000, ids).any()  # other queries
