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


@pytest.mark.parametrize("write", ["insert_or_assign", "assign", "state"])
def test_rows_holding_nan_or_inf_are_refused_and_nothing_is_written(write):
    """They were written silently, poisoning every later lookup and update of the key."""
    t = _table(dim=2, optimizer=de.optim.Adagrad(lr=0.1))
    t.insert_or_assign([1, 2], torch.ones(2, 2))
    before = t.export()
    bad = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [1e300, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"holds NaN or inf in 2 of 3 rows \(the first is row 1\)"):
        if write == "insert_or_assign":
            t.insert_or_assign([1, 2, 3], bad)
        elif write == "assign":
            t.assign([1, 2, 3], bad)
        else:
            t.insert_or_assign([1, 2, 3], torch.zeros(3, 2), optimizer_state=bad)
    after = t.export()
    assert t.size() == 2 and torch.equal(after.weights, before.weights)
    assert torch.equal(after.optimizer_state, before.optimizer_state)


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
    with pytest.raises(TypeError, match=r"ids must be int64 ids .*table.ids_of\(keys\).ids"):
        t.keys_of(["naïve"])  # the keys themselves: was "too many dimensions 'str'"
    with pytest.raises(TypeError, match="got a torch.float32 tensor"):
        t.keys_of(torch.tensor([1.5]))


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


def _with_rows():
    t = de.DynamicTable(de.TableConfig(
        dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=3, key_log=True,
        admission=de.policy.FrequencyAdmission(threshold=1, width=2048)))
    t.find_or_insert(["a", "b"])
    t.step = 3
    return t


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: dict(s, meta=s["meta"][:3]), "'meta' must be a 1-D int64 tensor of at least 6"),
    (lambda s: dict(s, **{"counters.inserts": torch.tensor([1, 2])}),
     "'counters.inserts' must be a one-element integer tensor"),
    (lambda s: dict(s, ids=s["ids"].double()), "'ids' must be a 1-D integer tensor"),
    (lambda s: dict(s, **{"admission.sketch": torch.zeros(4, 1024, dtype=torch.int32)}),
     "admission state does not load"),
    (lambda s: dict(s, **{"key_log.lengths": torch.tensor([1])}), "key log"),
    # row tensors of the wrong kind: an IndexError, an AttributeError, or a load that went
    # on (a sparse tensor failed after the table was cleared; a meta tensor left the old
    # arena's values as the rows; a complex or float one lost its imaginary or fractional
    # part with at most a warning)
    (lambda s: dict(s, ids=torch.tensor(5)), "'ids' must be a 1-D integer tensor"),
    (lambda s: dict(s, ids=s["ids"].numpy()), "'ids' must be a 1-D integer tensor"),
    (lambda s: dict(s, weights=s["weights"].to_sparse()),
     "'weights' must be a dense floating point tensor"),
    (lambda s: dict(s, weights=torch.empty(s["weights"].shape, device="meta")),
     "'weights' must be a dense floating point tensor"),
    (lambda s: dict(s, weights=s["weights"].to(torch.complex64)),
     "'weights' must be a dense floating point tensor"),
    (lambda s: dict(s, optimizer_state=s["optimizer_state"].long()),
     "'optimizer_state' must be a dense floating point tensor"),
    (lambda s: dict(s, counts=s["counts"].double() + 0.5),
     "'counts' must be a dense integer tensor"),
    (lambda s: dict(s, last_step=s["last_step"].tolist()),
     "'last_step' must be a dense integer tensor"),
])
def test_a_failing_load_leaves_the_table_as_it_was(corrupt, match):
    """Every check runs before the table is cleared (a bad admission sketch, meta or counter
    once left an empty table behind)."""
    source, target = _with_rows(), _with_rows()
    target.find_or_insert(["c"])
    before = target.state_dict()
    with pytest.raises(de.StateDictError, match=match):
        target.load_state_dict(corrupt(source.state_dict()))
    after = target.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_state_remembers_hash_seed():
    """String keys hash with the table's hash_seed: a state loaded into a table with another
    one would silently miss every string key."""
    a = de.DynamicTable(de.TableConfig(dim=2, hash_seed=7))
    a.find_or_insert(["cat"])
    state = a.state_dict()
    with pytest.raises(de.StateDictError, match="hash_seed=7 but the table has hash_seed=0"):
        de.DynamicTable(de.TableConfig(dim=2)).load_state_dict(state)
    b = de.DynamicTable(de.TableConfig(dim=2, hash_seed=7))
    b.load_state_dict(state)
    assert torch.equal(b.find(["cat"]).values, a.find(["cat"]).values)
    old = dict(state, meta=state["meta"][:6])  # saved before hash_seed was recorded
    de.DynamicTable(de.TableConfig(dim=2)).load_state_dict(old)


def test_an_arena_that_cannot_grow_stays_whole(monkeypatch):
    """Growth allocates weights, state and metadata before replacing any: running out of
    memory for the last one once left new zeroed weights beside the old metadata."""
    from dynembed.table.arena import RowArena
    t = de.DynamicTable(de.TableConfig(dim=3, optimizer=de.optim.Adagrad(lr=0.1)))
    t.insert_or_assign([1, 2], torch.ones(2, 3))
    real, calls = RowArena._empty, []

    def third_fails(self, shape, dtype):
        calls.append(shape)
        if len(calls) == 3:
            raise OSError(12, "Cannot allocate memory")
        return real(self, shape, dtype)

    monkeypatch.setattr(RowArena, "_empty", third_fails)
    capacity = t.arena.capacity
    with pytest.raises(MemoryError, match="table is unchanged"):
        t.reserve(capacity * 4)
    monkeypatch.setattr(RowArena, "_empty", real)
    assert t.arena.capacity == capacity == t.arena.state.shape[0] == t.arena.meta.shape[0]
    assert torch.equal(t.find([1, 2]).values, torch.ones(2, 3))
    t.find_or_insert(np.arange(100, 100 + 3 * capacity))  # grows normally afterwards
    assert torch.equal(t.find([1, 2]).values, torch.ones(2, 3))


def test_config_takes_numpy_integers():
    cfg = de.TableConfig(dim=np.int64(4), seed=np.uint64(3), max_rows=np.int32(10),
                         initial_capacity=np.int64(8), default_value=np.float32(0.5))
    assert type(cfg.dim) is int and cfg.dim == 4 and type(cfg.seed) is int
    assert torch.equal(de.DynamicTable(cfg).find([5]).values, torch.full((1, 4), 0.5))


@pytest.mark.parametrize("name", ["last_step", "counts"])
def test_a_state_with_negative_steps_or_counts_is_refused(name):
    """last_step -1 (the arena's mark of a free slot) made loaded rows invisible to top_k,
    samplers and eviction, and Uniform sampling never returned."""
    source = de.DynamicTable(de.TableConfig(dim=2))
    source.find_or_insert(torch.arange(3))
    state = source.state_dict()
    state[name] = torch.tensor([0, -1, 2])
    table = de.DynamicTable(de.TableConfig(dim=2))
    with pytest.raises(de.errors.StateDictError, match=f"'{name}' holds -1"):
        table.load_state_dict(state)
    assert table.size() == 0


@pytest.mark.parametrize("extra", ["weight", "key_log.ids"])
def test_a_table_load_refuses_keys_it_would_drop_unless_told(extra):
    """A misspelt or foreign key (a key log's strings into a table without one) was ignored:
    the strings silently did not come along."""
    source = de.DynamicTable(de.TableConfig(dim=2))
    source.find_or_insert(torch.arange(3))
    state = source.state_dict()
    state[extra] = torch.zeros(3)
    table = de.DynamicTable(de.TableConfig(dim=2))
    with pytest.raises(de.errors.StateDictError, match=rf"would not load: \['{extra}'\].*"
                                                       "strict=False"):
        table.load_state_dict(state)
    assert table.size() == 0
    with pytest.raises(TypeError, match="strict must be True or False"):
        table.load_state_dict(state, strict="no")
    table.load_state_dict(state, strict=False)
    assert torch.equal(table.find(torch.arange(3)).values, source.find(torch.arange(3)).values)


@pytest.mark.parametrize("saved, other", [
    (de.optim.SGD(lr=0.1, momentum=0.9), de.optim.Adagrad(lr=0.1)),
    (de.optim.Adagrad(lr=0.1), de.optim.SGD(lr=0.1, momentum=0.9)),
    (de.optim.Adam(lr=0.1), de.optim.FTRL(lr=0.1)),
    (de.optim.FTRL(lr=0.1), de.optim.Adam(lr=0.1)),
])
def test_optimizer_state_of_another_optimizer_of_the_same_width_is_refused(saved, other):
    """SGD's momentum (possibly negative) loaded as Adagrad's sums of squares made rows NaN:
    only the width was checked, and these widths are equal."""
    a = de.DynamicTable(de.TableConfig(dim=3, optimizer=saved))
    a.find_or_insert([1, 2])
    state = a.state_dict()
    b = de.DynamicTable(de.TableConfig(dim=3, optimizer=other))
    assert b.arena.state_width == a.arena.state_width
    b.find_or_insert([5])
    with pytest.raises(de.StateDictError, match=f"holds {type(saved).__name__}'s optimizer "
                                                f"state.*optimizer={type(saved).__name__}"):
        b.load_state_dict(state)
    assert b.size() == 1  # unchanged
    de.DynamicTable(de.TableConfig(dim=3, optimizer=saved)).load_state_dict(state)
    # a state saved before the layout was recorded, and a table without an optimizer
    # (evaluation) load as before
    b.load_state_dict(dict(state, meta=state["meta"][:7]))
    de.DynamicTable(de.TableConfig(dim=3)).load_state_dict(
        de.DynamicTable(de.TableConfig(dim=3)).state_dict())



def test_pandas_export_keeps_keys_utf8_cannot_hold():
    """A key with a lone surrogate (text decoded with errors="surrogateescape") is a valid
    str key; pandas' str dtype failed the whole export on it."""
    pytest.importorskip("pandas")
    odd = b"caf\xe9".decode("utf-8", errors="surrogateescape")
    emb = de.DynamicEmbedding(dim=3, key_log=True, seed=0)
    emb(["ok", odd])  # all str (with bytes among them the column was object already)
    frame = emb.table.to_pandas()
    assert set(frame["key"]) == {"ok", odd}
    for key, vector in zip(frame["key"], frame["vector"]):
        assert np.array_equal(vector, emb.table.find([key]).values.numpy()[0])
