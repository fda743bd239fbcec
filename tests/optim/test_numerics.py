"""Float32 limits in the update kernels: a finite gradient never makes a row NaN or inf.

torch's rules are the reference where they stay finite; where torch's own float32 state
overflows into inf - inf, the row must stay finite and keep training.
"""

from __future__ import annotations

import pytest
import torch

import dynembed as de

HUGE = 3e38  # finite in float32, its square is not; two of them sum past float32's range


def _train(optimizer, grads, dim: int = 3) -> list[torch.Tensor]:
    """Rows of key 7 after each backward with a gradient of ``g`` everywhere."""
    emb = de.DynamicEmbedding(dim=dim, optimizer=optimizer, seed=1)
    rows = []
    for g in grads:
        out = emb(torch.tensor([7]))
        out.backward(torch.full_like(out, g))
        rows.append(emb.table.find([7]).values.clone())
    assert emb.table.stats().totals.nonfinite_gradients == 0
    return rows


@pytest.mark.parametrize("dim", [3, 16, 17])
def test_adam_row_stays_finite_and_trains_after_its_second_moment_overflowed(dim):
    """v became inf at |g| > 1.8e19 (the row left as it was, as torch); SparseAdam's next
    update v + (g * g - v) * (1 - beta2) is inf - inf: the row turned NaN, uncounted."""
    rows = _train(de.optim.Adam(lr=0.1), [1e20, 1.0, -1.0, 1.0], dim=dim)
    for row in rows:
        assert torch.isfinite(row).all()
    assert not torch.equal(rows[1], rows[0]), "the row never trains again"
    assert not torch.equal(rows[3], rows[2])


def test_ftrl_stays_finite_after_gradients_whose_sum_overflows_float32():
    """z (float32) became inf after two gradients of 3e38, the weight -inf, and the next
    update made the row NaN, uncounted."""
    rows = _train(de.optim.FTRL(lr=0.1), [HUGE, HUGE, 1.0, -1.0])
    for row in rows:
        assert torch.isfinite(row).all()


def test_ftrl_with_l1_zeroes_a_coordinate_after_a_huge_gradient_as_the_formula_says():
    # z capped at float32's largest value: the weight is -(z - l1) / ((beta + sqrt(n)) / a)
    rows = _train(de.optim.FTRL(lr=0.1, l1=1.0), [HUGE, HUGE])
    cap = float(torch.finfo(torch.float32).max)
    expected = -(cap - 1.0) / ((1.0 + cap ** 0.5) / 0.1)
    torch.testing.assert_close(rows[1], torch.full((1, 3), expected))
