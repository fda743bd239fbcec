"""DynamicTable verbs, growth, slot reuse, export and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de


def _table(dim=4, **kw):
    return de.DynamicTable(de.TableConfig(dim=dim, seed=0, **kw))


def test_find_reports_misses_without_inserting():
    t = _table()
    t.find_or_insert([1, 2])
    res = t.find([2, 3, 1])
    assert res.found.tolist() == [True, False, True]
    assert torch.equal(res.values[1], torch.zeros(4))
    assert t.size() == 2
    assert t.contains([3, 1]).tolist() == [False, True]


def test_find_or_insert_reports_new_rows_once_per_key():
    t = _table()
    res = t.find_or_insert([5, 5, 6])
    assert res.inserted.tolist() == [True, True, True]
    assert torch.equal(res.values[0], res.values[1])
    assert t.find_or_insert([5, 7]).inserted.tolist() == [False, True]


def test_insert_or_assign_and_assign():
    t = _table(dim=2)
    t.insert_or_assign([1, 2], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert torch.equal(t.find([2]).values, torch.tensor([[2.0, 2.0]]))
    found = t.assign([2, 3], torch.tensor([[5.0, 5.0], [6.0, 6.0]]))
    assert found.tolist() == [True, False]
    assert t.size() == 2 and torch.equal(t.find([2]).values, torch.tensor([[5.0, 5.0]]))
    with pytest.raises(ValueError, match="values must have shape"):
        t.insert_or_assign([1], torch.zeros(2, 2))


def test_assigned_values_that_require_grad_are_copied_not_linked():
    """Values in an autograd graph once pulled the arena into it: every later numpy view
    of the weights (inserts, updates, state_dict) raised."""
    t = _table(dim=2)
    values = torch.ones(2, 2, requires_grad=True) * 3
    t.insert_or_assign([1, 2], values)
    t.assign([2], values[:1])
    assert not t.arena.weights.requires_grad and t.arena.weights.grad_fn is None
    assert t.find_or_insert([3]).inserted.all()  # a new row: a numpy write into the arena
    assert torch.equal(t.state_dict()["weights"][:2], torch.full((2, 2), 3.0))


def test_insert_or_assign_with_optimizer_state():
    t = _table(dim=2, optimizer=de.optim.Adagrad(lr=0.1))
    t.insert_or_assign([9], torch.ones(1, 2), optimizer_state=torch.full((1, 2), 3.0))
    assert torch.equal(t.export().optimizer_state, torch.full((1, 2), 3.0))


def test_erase_frees_slots_that_are_reused():
    t = _table()
    t.find_or_insert(torch.arange(2000))
    cap = t.capacity()
    assert t.erase(torch.arange(0, 2000, 2)) == 1000
    assert t.erase([0, 2, -5]) == 0
    assert t.size() == 1000
    t.find_or_insert(torch.arange(10_000, 11_000))
    assert t.capacity() == cap and t.size() == 2000
    assert t.find(torch.arange(1, 2000, 2)).found.all()
    assert not t.find(torch.arange(0, 2000, 2)).found.any()


def test_growth_keeps_rows_and_is_amortised():
    t = _table(dim=3)
    first = t.find_or_insert(torch.arange(10)).values.clone()
    caps = set()
    for start in range(10, 50_000, 997):
        t.find_or_insert(torch.arange(start, start + 997))
        caps.add(t.capacity())
    assert torch.equal(t.find(torch.arange(10)).values, first)
    assert len(caps) < 15  # geometric growth, not one resize per call
    assert t.capacity() < 1.6 * t.size()


def test_reserve_presizes():
    t = _table()
    t.reserve(100_000)
    cap = t.capacity()
    t.find_or_insert(torch.arange(100_000))
    assert t.capacity() == cap
    with pytest.raises(ValueError, match="rows"):
        t.reserve(-1)


def test_export_in_slot_order_with_metadata():
    t = _table(dim=2)
    t.find_or_insert([30, 10, 20])
    e = t.export()
    assert e.ids.tolist() == [30, 10, 20]
    assert e.weights.shape == (3, 2) and e.optimizer_state.shape == (3, 0)
    assert torch.equal(e.weights, t.find([30, 10, 20]).values)


def test_clear():
    t = _table()
    t.find_or_insert([1, 2, 3])
    t.clear()
    assert t.size() == 0 and not t.contains([1]).any()
    t.find_or_insert([4])
    assert t.size() == 1


def test_key_log_lists_real_strings():
    t = _table(key_log=True)
    t.find_or_insert(["naïve", "café", "naïve"])
    e = t.export()
    assert sorted(t.keys_of(e.ids)) == ["café", "naïve"]
    t.erase(["café"])
    assert t.keys_of(t.export().ids) == ["naïve"]
    with pytest.raises(RuntimeError, match="key_log=True"):
        _table().keys_of([1])


def test_to_numpy_and_pandas_export():
    pd = pytest.importorskip("pandas")
    emb = de.DynamicEmbedding(dim=3, key_log=True, seed=0)
    emb(["a", "b"])
    frame = emb.table.to_pandas()
    arrays = emb.table.to_numpy()
    assert arrays["vector"].shape == (2, 3) and sorted(arrays["key"]) == ["a", "b"]
    assert isinstance(frame, pd.DataFrame)
    assert sorted(frame["key"]) == ["a", "b"]
    assert np.array_equal(np.stack(frame["vector"].to_numpy()),
                          emb.table.find(list(frame["key"])).values.numpy())


def test_state_dict_rejects_corrupted_input():
    t = _table()
    t.find_or_insert([1, 2])
    state = t.state_dict()
    broken = dict(state, ids=torch.tensor([1, 1]))
    with pytest.raises(de.StateDictError, match="duplicates"):
        _table().load_state_dict(broken)
    with pytest.raises(de.StateDictError, match="lacks"):
        _table().load_state_dict({k: v for k, v in state.items() if k != "weights"})
    bad_shape = dict(state, counts=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(de.StateDictError, match="counts"):
        _table().load_state_dict(bad_shape)
