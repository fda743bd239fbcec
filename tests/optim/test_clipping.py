"""de.clip_grad_norm_: one norm over dense gradients and deferred tables' queued ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dynembed as de

VOCAB, DIM = 40, 4


class _Model(nn.Module):
    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb, self.head = emb, nn.Linear(DIM, 1)

    def forward(self, ids):
        return self.head(self.emb(ids)).squeeze(-1)


def _pair(seed: int = 0, **options):
    """A dynembed model and a torch one with nn.Embedding (dense gradients), same weights."""
    torch.manual_seed(seed)
    theirs = _Model(nn.Embedding(VOCAB, DIM))
    ours = _Model(de.DynamicEmbedding(dim=DIM, optimizer=de.optim.Adagrad(lr=0.3),
                                      update_mode="deferred", **options))
    ours.head.load_state_dict(theirs.head.state_dict())
    ours.emb.table.insert_or_assign(torch.arange(VOCAB), theirs.emb.weight.detach())
    return ours, theirs


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clipping_together_trains_as_torch_clips_a_dense_embedding(norm_type):
    """Three micro-batches per step with repeated keys, clipped hard (max_norm well under
    the gradient norm): the rows and the head end as torch's over nn.Embedding with
    Adagrad, whose zero gradient rows stay as they are."""
    ours, theirs = _pair()
    dense_opt = torch.optim.Adagrad(ours.head.parameters(), lr=0.3)
    ref_opt = torch.optim.Adagrad(theirs.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        batches = [(torch.randint(0, VOCAB, (16,), generator=gen),
                    torch.randn(16, generator=gen)) for _ in range(3)]
        for model in (ours, theirs):
            for ids, target in batches:
                ((model(ids) - target) ** 2).mean().backward()
        norm = de.clip_grad_norm_(ours, 0.05, norm_type)
        torch.testing.assert_close(
            norm, torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, norm_type))
        assert float(norm) > 0.05 * 2  # the clip bit
        for opt in (dense_opt, ref_opt):
            opt.step()
            opt.zero_grad()
        de.sparse_step(ours)
    rows = ours.emb.table.find(torch.arange(VOCAB)).values
    torch.testing.assert_close(rows, theirs.emb.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.head.weight, theirs.head.weight, rtol=1e-5, atol=1e-6)


def test_a_norm_under_the_limit_changes_nothing():
    ours, _ = _pair()
    ours(torch.tensor([1, 2, 2])).sum().backward()
    head_grad = ours.head.weight.grad.clone()
    queued = ours.emb.table.queued_gradient_norm()
    total = de.clip_grad_norm_(ours, 1e6)
    expected = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1)
                                            for p in ours.head.parameters()])),
        torch.tensor(queued)]))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(ours.head.weight.grad, head_grad)
    assert ours.emb.table.queued_gradient_norm() == pytest.approx(queued)


def test_the_queued_norm_sums_a_key_over_micro_batches_and_leaves_erased_keys_out():
    emb = de.DynamicEmbedding(dim=2, update_mode="deferred", initializer=de.init.Zeros(),
                              optimizer=de.optim.SGD(lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    emb(torch.tensor([1])).sum().backward()  # key 1: (2, 2) in all
    assert emb.table.queued_gradient_norm() == pytest.approx(math.sqrt(8 + 2))
    emb.table.erase(torch.tensor([2]))
    assert emb.table.queued_gradient_norm() == pytest.approx(math.sqrt(8))
    assert emb.table.queued_gradient_norm(math.inf) == pytest.approx(2.0)


def test_fused_tables_are_named_and_bad_arguments_refused():
    ours, _ = _pair()
    sgd = de.optim.SGD(lr=0.1)
    fused = nn.ModuleDict({"a": de.DynamicEmbedding(dim=2, optimizer=sgd),
                           "b": de.DynamicEmbedding(dim=2, optimizer=sgd,
                                                    update_mode="deferred"),
                           "frozen": de.DynamicEmbedding(dim=2)})
    with pytest.raises(ValueError, match=r"tables \['a.table'\] update their rows inside"):
        de.clip_grad_norm_(fused, 1.0)
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="max_norm must be a positive number"):
            de.clip_grad_norm_(ours, bad)
    with pytest.raises(ValueError, match="norm_type must be a positive number"):
        de.clip_grad_norm_(ours, 1.0, norm_type=0)
    with pytest.raises(TypeError, match="model must be the torch.nn.Module"):
        de.clip_grad_norm_([ours], 1.0)


def test_a_nonfinite_norm_raises_when_asked_and_scales_nothing():
    ours, _ = _pair()
    ours(torch.tensor([1, 2])).sum().backward()
    ours.head.weight.grad[0, 0] = float("inf")
    queued = ours.emb.table.queued_gradient_norm()
    with pytest.raises(RuntimeError, match="cannot be clipped"):
        de.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    assert ours.emb.table.queued_gradient_norm() == pytest.approx(queued)
    assert not np.isfinite(float(de.clip_grad_norm_(ours, 1.0)))


def test_what_the_step_leaves_out_is_left_out_of_the_norm():
    """Rows refused by admission (an empty queue: torch has no inf norm of nothing) and
    NaN rows of a table that skips them: a NaN norm scaled every gradient by NaN."""
    refused = _Model(de.DynamicEmbedding(dim=DIM, optimizer=de.optim.SGD(lr=0.1),
                                         update_mode="deferred",
                                         admission=de.policy.FrequencyAdmission(threshold=9)))
    refused(torch.tensor([1, 2])).sum().backward()
    head = torch.nn.utils.get_total_norm([p.grad for p in refused.head.parameters()], math.inf)
    torch.testing.assert_close(de.clip_grad_norm_(refused, 1.0, math.inf), head)
    ours, _ = _pair(nonfinite_grads="skip")
    ours(torch.tensor([1, 2])).sum().backward()
    ours.emb.table.apply_gradients(np.array([3]), ours.emb.table.index.find(np.array([3])),
                                   torch.full((1, DIM), float("nan")))
    total = de.clip_grad_norm_(ours, 1e-3)
    assert math.isfinite(float(total)) and torch.isfinite(ours.head.weight.grad).all()
    de.sparse_step(ours)
    assert ours.emb.table.stats().totals.nonfinite_gradients == 1


def test_frozen_tables_are_left_out_and_numbers_of_any_kind_accepted():
    ours, _ = _pair()
    frozen = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1))  # fused
    frozen.requires_grad_(False)
    model = nn.ModuleDict({"ours": ours, "frozen": frozen})
    ours(torch.tensor([1])).sum().backward()
    for max_norm in (np.float32(1.0), torch.tensor(1.0), 1):
        assert float(de.clip_grad_norm_(model, max_norm)) > 0
