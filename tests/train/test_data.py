"""The data position: global batches by step, and each rank's part of them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynembed.train.data import epoch_of, global_batch, rank_part


def test_global_batches_walk_each_epoch_once_in_a_seeded_order():
    n, b = 10, 4
    stream = np.concatenate([global_batch(s, b, n, seed=3) for s in range(5)])  # 2 epochs
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # each epoch its own order
    np.testing.assert_array_equal(global_batch(2, b, n, seed=3), stream[8:12])
    assert not np.array_equal(global_batch(0, b, n, seed=4), global_batch(0, b, n, seed=3))
    np.testing.assert_array_equal(global_batch(1, 4, 10, shuffle=False), [4, 5, 6, 7])
    assert epoch_of(2, 4, 10) == 0 and epoch_of(3, 4, 10) == 1


@given(st.integers(1, 64), st.integers(1, 8))
def test_rank_parts_cover_the_batch_in_order(batch, world):
    indices = np.arange(100, 100 + batch)
    parts = [rank_part(indices, r, world) for r in range(world)]
    np.testing.assert_array_equal(np.concatenate(parts), indices)
    sizes = [p.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("call, message", [
    (lambda: global_batch(-1, 4, 10), "step must be"),
    (lambda: global_batch(0, 0, 10), "batch_size must be"),
    (lambda: global_batch(0, 4, 0), "num_samples must be"),
    (lambda: rank_part(np.arange(4), 2, 2), "rank must be"),
    (lambda: rank_part(np.arange(4), 0, 0), "world_size must be"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_shuffle_takes_only_bools_and_rank_part_takes_lists():
    """``shuffle="no"`` shuffled (a truthy string); a list batch gave AttributeError."""
    with pytest.raises(TypeError, match="shuffle must be True or False"):
        global_batch(0, 4, 10, shuffle="no")
    with pytest.raises(TypeError, match="indices must be a 1-D batch"):
        rank_part(np.zeros((2, 2)), 0, 2)
    np.testing.assert_array_equal(rank_part([5, 6, 7], 1, 2), [7])
