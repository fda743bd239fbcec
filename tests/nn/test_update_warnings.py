"""Warnings for update patterns that silently differ from what a torch user expects."""

from __future__ import annotations

import warnings

import pytest
import torch

import dynembed as de
from dynembed.table import updates

KEYS_A, KEYS_B = torch.tensor([1, 2]), torch.tensor([2, 3])


def _lookups_twice(emb) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (emb(KEYS_A) * emb(KEYS_B)).sum().backward()
    return [w for w in caught if "one backward() stepped a dynembed table" in str(w.message)]


def test_two_fused_lookups_in_one_backward_warn_once_at_the_callers_line():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1))
    caught = _lookups_twice(emb)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "update_mode='deferred'" in str(caught[0].message)
    assert not _lookups_twice(emb)  # once per table


@pytest.mark.parametrize("options", [
    {"optimizer": de.optim.SGD(lr=0.1)},  # plain SGD: two steps are one summed step
    {"optimizer": de.optim.Adagrad(lr=0.1), "update_mode": "deferred"},
], ids=["plain-sgd", "deferred"])
def test_lookups_that_add_up_do_not_warn(options):
    assert not _lookups_twice(de.DynamicEmbedding(dim=4, **options))


@pytest.mark.parametrize("optimizer, warns", [
    (de.optim.Adagrad(lr=0.1), False), (de.optim.SGD(lr=0.1, momentum=0.9), False),
    (de.optim.Adam(lr=0.1), True),  # counts steps: its bias correction moves
    (de.optim.Adagrad(lr=0.1, lr_decay=0.1), True),
], ids=["adagrad", "momentum", "adam", "adagrad-lr-decay"])
def test_lookups_of_disjoint_keys_warn_only_where_steps_are_counted(optimizer, warns):
    """The README's first example looks up disjoint keys twice before one backward: the
    same as one step, except for optimizers whose step count moves twice."""
    emb = de.DynamicEmbedding(dim=4, optimizer=optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (emb(["cat", "dog", "cat"]).sum() + emb(torch.tensor([12, -7])).sum()).backward()
    assert any("stepped a dynembed table" in str(w.message) for w in caught) == warns


def test_sgd_with_momentum_on_shared_keys_warns():
    assert _lookups_twice(de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1,
                                                                            momentum=0.9)))


def test_lookups_in_separate_backwards_do_not_warn():
    """Also a lookup whose graph is still alive, as in ``v = emb(a); v = emb(b)``, the
    README's first lines: only two steps in one backward() differ from torch."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            emb(KEYS_A).sum().backward()
        kept = emb(KEYS_A)  # a graph kept for later
        emb(KEYS_B).sum().backward()
        kept.sum().backward()


def test_a_forgotten_sparse_step_warns(monkeypatch):
    monkeypatch.setattr(updates, "QUEUED_BACKWARDS_WARNING", 3)
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1),
                              update_mode="deferred")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            emb(KEYS_A).sum().backward()
        assert not caught  # gradient accumulation queues a few
        emb(KEYS_A).sum().backward()
        assert len(caught) == 1 and "3 backward calls queued" in str(caught[0].message)
        assert "de.sparse_step(model)" in str(caught[0].message)
        assert caught[0].filename == __file__
        de.sparse_step(emb)
        for _ in range(2):
            emb(KEYS_A).sum().backward()
        assert len(caught) == 1  # the count starts again after a step


def test_many_lookups_in_one_backward_are_one_queued_backward(monkeypatch):
    """The count is of backward calls, not of the lookups whose gradients one holds."""
    monkeypatch.setattr(updates, "QUEUED_BACKWARDS_WARNING", 3)
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1),
                              update_mode="deferred")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            sum(emb(KEYS_A).sum() for _ in range(5)).backward()
        de.sparse_step(emb)


class _LookupInCollate:
    """A collate_fn that looks keys up, recording the warnings it raises in the worker."""

    def __init__(self, emb, train: bool):
        self.emb, self.train = emb, train

    def __call__(self, keys):
        self.emb.train(self.train)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                self.emb(keys)
                self.emb(keys)
        return [str(w.message) for w in caught], self.emb.table.size()


@pytest.mark.parametrize("train", [True, False])
def test_a_training_lookup_in_a_data_loader_worker_warns_once(train):
    """A train-mode lookup in a collate_fn inserted rows into the worker's copy of the
    table, which the training process never saw, and nothing said so."""
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1))
    loader = torch.utils.data.DataLoader(["cat", "dog"], batch_size=2, num_workers=1,
                                         collate_fn=_LookupInCollate(emb, train),
                                         multiprocessing_context="fork", timeout=120)
    (messages, rows_in_worker), = list(loader)
    assert emb.table.size() == 0  # the main process's table
    if train:
        assert rows_in_worker == 2
        assert len(messages) == 1 and "a training lookup in a DataLoader worker" in messages[0]
    else:
        assert messages == [] and rows_in_worker == 0
