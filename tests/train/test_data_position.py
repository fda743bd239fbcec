"""dynembed.train.data's argument checks (the examples' global batches come from it); the
positions' own tests are in test_data.py."""

import numpy as np
import pytest

from dynembed.train.data import epoch_of, global_batch, rank_part


@pytest.mark.parametrize("call, message", [
    # numpy's "expected non-negative integer" named no argument
    (lambda: global_batch(0, 4, 10, seed=-1), "seed must be an int >= 0"),
    # a ZeroDivisionError, and a negative epoch for a negative step
    (lambda: epoch_of(0, 4, 0), "num_samples must be"),
    (lambda: epoch_of(-3, 4, 10), "step must be"),
    (lambda: epoch_of(1, 0, 10), "batch_size must be"),
    # an OverflowError from numpy
    (lambda: global_batch(2**62, 4, 10), "past the int64"),
])
def test_bad_positions_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_ints_are_ranks_as_they_are_world_sizes():
    indices = np.arange(8)
    np.testing.assert_array_equal(rank_part(indices, np.int64(1), np.int64(2)), [4, 5, 6, 7])
    assert epoch_of(np.int64(3), 4, 10) == 1


def test_the_last_representable_batch_still_works():
    step = (2**63 - 1) // 4 - 1  # its positions end below 2**63 - 1
    assert global_batch(step, 4, 10, shuffle=False).shape == (4,)
