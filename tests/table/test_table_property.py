"""DynamicTable against a plain-Python reference model (dict id -> float32 vector)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import dynembed as de
from dynembed.keys import hash_strings

DIM = 4
SEED = 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1
INT_POOL = [0, 1, -1, 2, 3, 5, 8, 13, 21, 1000, -1000, 2**32, -2**32,
            I64_MIN, I64_MAX, I64_MIN + 1, I64_MAX - 1]
STR_POOL = ["cat", "dog", "", "é", "日本", "a\x00b", "😀", "0", "1"]
MIN_CAPACITY = 1024  # the arena's smallest allocation

int_keys = st.lists(st.sampled_from(INT_POOL), max_size=8)
str_keys = st.lists(st.sampled_from(STR_POOL), max_size=6)
special = [0.0, -0.0, 1.0, -1.5, 3.4e38, -3.4e38, 1e-45]  # NaN and inf are refused


def make_table(seed: int = SEED) -> de.DynamicTable:
    return de.DynamicTable(de.TableConfig(dim=DIM, seed=seed))


def bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def same_bits(a, b) -> bool:
    a, b = bits(a), bits(b)
    return a.shape == b.shape and np.array_equal(a, b)


def ids_of(keys) -> list[int]:
    if isinstance(keys, torch.Tensor):
        return keys.tolist()
    if len(keys) and isinstance(keys[0], str):
        return hash_strings(keys).tolist()
    return list(keys)


def random_values(seed: int, n: int, use_special: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, DIM)).astype(np.float32) * 10
    if use_special and n:
        mask = rng.random((n, DIM)) < 0.3
        values[mask] = rng.choice(np.array(special, dtype=np.float32), size=int(mask.sum()))
    return values


class TableMachine(RuleBasedStateMachine):
    # Hundreds of small calls into parallel kernels: one numba thread keeps them cheap on
    # a busy 2-core box. test_large_batches_with_default_threads covers the parallel path.
    @initialize(initial_capacity=st.sampled_from([0, 0, 10, 2000]))
    def setup(self, initial_capacity):
        self._threads = numba.get_num_threads()
        numba.set_num_threads(1)
        self.table = de.DynamicTable(de.TableConfig(dim=DIM, seed=SEED,
                                                    initial_capacity=initial_capacity))
        self.oracle = make_table()  # same seed: its rows hold the initial vectors
        self.model: dict[int, np.ndarray] = {}
        self.next_bulk = 10**12  # bulk keys come from a range no pool key lies in

    def teardown(self):
        if hasattr(self, "_threads"):
            numba.set_num_threads(self._threads)

    # ------------------------------------------------------------------ helpers
    def initial(self, ids: list[int]) -> np.ndarray:
        return self.oracle.find_or_insert(torch.tensor(ids, dtype=torch.int64)).values.numpy()

    def expect_capacity(self, before_size: int, before_cap: int, new: int) -> None:
        # high-water = live + free rows, so the arena grows only when the live rows would no
        # longer fit: freed rows are reused before any growth.
        if before_size + new <= before_cap:
            assert self.table.capacity() == before_cap
        else:
            assert self.table.capacity() >= before_size + new

    def do_find_or_insert(self, keys) -> None:
        ids = ids_of(keys)
        new_ids = list(dict.fromkeys(i for i in ids if i not in self.model))
        size, cap = self.table.size(), self.table.capacity()
        result = self.table.find_or_insert(keys)
        assert result.values.shape == (len(keys), DIM)
        assert result.inserted.tolist() == [i in new_ids for i in ids]
        if new_ids:
            self.model.update(zip(new_ids, self.initial(new_ids)))
        expected = np.array([self.model[i] for i in ids], dtype=np.float32).reshape(-1, DIM)
        assert same_bits(result.values, expected)
        self.expect_capacity(size, cap, len(new_ids))

    def do_insert_or_assign(self, keys, values: np.ndarray, dtype) -> None:
        ids = ids_of(keys)
        new = len({i for i in ids if i not in self.model})
        size, cap = self.table.size(), self.table.capacity()
        self.table.insert_or_assign(keys, torch.from_numpy(values).to(dtype))
        for i, v in zip(ids, values):  # with duplicates, the last one wins
            self.model[i] = np.asarray(torch.from_numpy(v).to(dtype).to(torch.float32))
        self.expect_capacity(size, cap, new)

    def do_erase(self, keys) -> None:
        ids = ids_of(keys)
        present = {i for i in ids if i in self.model}
        assert self.table.erase(keys) == len(present)
        for i in present:
            del self.model[i]

    # ------------------------------------------------------------------ rules
    @rule(keys=int_keys)
    def find_or_insert(self, keys):
        self.do_find_or_insert(keys)

    @rule(keys=str_keys)
    def find_or_insert_str(self, keys):
        self.do_find_or_insert(keys)

    @rule(keys=int_keys, seed=st.integers(0, 2**32 - 1), use_special=st.booleans(),
          dtype=st.sampled_from([torch.float32, torch.float32, torch.float64]))
    def insert_or_assign(self, keys, seed, use_special, dtype):
        self.do_insert_or_assign(keys, random_values(seed, len(keys), use_special), dtype)

    @rule(keys=str_keys, seed=st.integers(0, 2**32 - 1))
    def insert_or_assign_str(self, keys, seed):
        self.do_insert_or_assign(keys, random_values(seed, len(keys), True), torch.float32)

    @rule(keys=int_keys, seed=st.integers(0, 2**32 - 1),
          bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    def insert_or_assign_nonfinite(self, keys, seed, bad):
        if not keys:
            return
        values = random_values(seed, len(keys), True)
        values[-1, 0] = bad
        size, cap = self.table.size(), self.table.capacity()
        with pytest.raises(ValueError, match="NaN or inf"):
            self.table.insert_or_assign(keys, torch.from_numpy(values))
        assert self.table.size() == size and self.table.capacity() == cap  # nothing written

    @rule(keys=st.lists(st.sampled_from(INT_POOL), max_size=8, unique=True),
          seed=st.integers(0, 2**32 - 1))
    def assign(self, keys, seed):
        values = random_values(seed, len(keys), True)
        size, cap = self.table.size(), self.table.capacity()
        found = self.table.assign(keys, torch.from_numpy(values))
        assert found.tolist() == [k in self.model for k in keys]
        for k, v in zip(keys, values):
            if k in self.model:
                self.model[k] = v
        assert self.table.size() == size and self.table.capacity() == cap

    @rule(keys=int_keys)
    def erase(self, keys):
        self.do_erase(keys)

    @rule(keys=str_keys)
    def erase_str(self, keys):
        self.do_erase(keys)

    @precondition(lambda self: len(self.model) > 0)
    @rule(fraction=st.floats(0.1, 1.0), seed=st.integers(0, 2**32 - 1))
    def erase_some(self, fraction, seed):
        live = list(self.model)
        rng = np.random.default_rng(seed)
        k = max(1, int(len(live) * fraction))
        picked = [live[i] for i in rng.choice(len(live), size=k, replace=False)]
        self.do_erase(torch.tensor(picked, dtype=torch.int64))

    @rule(count=st.integers(1, 1500), assign=st.booleans())
    def bulk_insert(self, count, assign):
        # Big enough to push capacity above the arena's minimum, so reuse of freed rows is
        # visible in capacity().
        keys = np.arange(self.next_bulk, self.next_bulk + count, dtype=np.int64)
        self.next_bulk += count
        if assign:
            self.do_insert_or_assign(torch.from_numpy(keys), random_values(count, count, False),
                                     torch.float32)
        else:
            self.do_find_or_insert(torch.from_numpy(keys))

    @precondition(lambda self: len(self.model) > 0)
    @rule(seed=st.integers(0, 2**32 - 1))
    def erase_then_insert_same_number(self, seed):
        live = list(self.model)
        k = int(np.random.default_rng(seed).integers(1, len(live) + 1))
        cap = self.table.capacity()
        self.do_erase(torch.tensor(live[:k], dtype=torch.int64))
        keys = np.arange(self.next_bulk, self.next_bulk + k, dtype=np.int64)
        self.next_bulk += k
        self.do_find_or_insert(torch.from_numpy(keys))
        assert self.table.capacity() == cap  # k rows freed, k rows reused

    @rule(keys=st.lists(st.sampled_from(INT_POOL + [7, 9, -7]), max_size=10))
    def find(self, keys):
        result = self.table.find(keys)
        assert result.found.dtype == torch.bool
        assert result.found.tolist() == [k in self.model for k in keys]
        zeros = np.zeros(DIM, dtype=np.float32)  # default_value=0.0
        expected = np.array([self.model.get(k, zeros) for k in keys],
                            dtype=np.float32).reshape(-1, DIM)
        assert same_bits(result.values, expected)

    @rule(keys=st.lists(st.one_of(st.sampled_from(INT_POOL), st.integers(I64_MIN, I64_MAX)),
                        max_size=10))
    def contains(self, keys):
        assert self.table.contains(keys).tolist() == [k in self.model for k in keys]

    @rule(keys=str_keys)
    def contains_str(self, keys):
        assert self.table.contains(keys).tolist() == [i in self.model for i in ids_of(keys)]

    @rule(rows=st.integers(0, 5000))
    def reserve(self, rows):
        before = self.table.capacity()
        self.table.reserve(rows)
        assert self.table.capacity() == max(before, rows)

    @rule()
    def export(self):
        exported = self.table.export()
        ids = exported.ids.tolist()
        assert len(ids) == len(set(ids)) == len(self.model)
        assert set(ids) == set(self.model)
        if ids:
            expected = np.stack([self.model[i] for i in ids])
            assert same_bits(exported.weights, expected)
        assert exported.weights.shape == (len(ids), DIM)
        # Only find_or_insert/insert_or_assign were used: no training metadata (rows
        # inserted between training steps count as seen at the next one).
        assert exported.counts.tolist() == [0] * len(ids)
        assert exported.last_step.tolist() == [self.table.step + 1] * len(ids)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def size_matches(self):
        assert self.table.size() == len(self.model) == len(self.table)
        assert self.table.capacity() >= self.table.size()

    @invariant()
    def every_model_row_is_found_bit_exact(self):
        if not self.model:
            return
        ids = np.fromiter(self.model.keys(), dtype=np.int64, count=len(self.model))
        result = self.table.find(torch.from_numpy(ids))
        assert bool(result.found.all())
        assert same_bits(result.values, np.stack(list(self.model.values())))


TableMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                          deadline=None)
TestTableMachine = TableMachine.TestCase


# ---------------------------------------------------------------------------- direct tests
def test_initial_vectors_are_deterministic_per_seed_and_key():
    a, b, c = make_table(), make_table(), make_table(seed=2)
    va = a.find_or_insert([5, 6, 7]).values
    vb = b.find_or_insert([7, 999, 6, 5]).values  # other order, other neighbours
    assert same_bits(va, vb[[3, 2, 0]])
    assert not torch.equal(va, c.find_or_insert([5, 6, 7]).values)
    bound = 1 / np.sqrt(DIM)
    assert bool(((va >= -bound) & (va < bound)).all())
    assert len({tuple(r) for r in va.tolist()}) == 3


def test_reinserted_key_gets_its_initial_vector_again():
    table = make_table()
    first = table.find_or_insert([42]).values.clone()
    table.insert_or_assign([42], torch.full((1, DIM), 9.0))
    table.erase([42])
    assert not table.contains([42]).item()
    again = table.find_or_insert([42])
    assert again.inserted.tolist() == [True]
    assert same_bits(again.values, first)


def test_freed_rows_are_reused_above_minimum_capacity():
    table = make_table()
    n = 3000
    table.find_or_insert(torch.arange(n))
    cap = table.capacity()
    assert cap > MIN_CAPACITY and table.size() == n
    for round_ in range(5):
        k = 400
        start = round_ * k
        assert table.erase(torch.arange(start, start + k)) == k
        fresh = torch.arange(10**9 + start, 10**9 + start + k)
        assert table.find_or_insert(fresh).inserted.all()
        assert table.capacity() == cap, round_
        assert table.size() == n
    # Still exactly one row per live key, every row distinct in the arena.
    exported = table.export()
    assert exported.ids.shape[0] == n == len(set(exported.ids.tolist()))
    # Growing past the freed rows does grow the arena.
    table.find_or_insert(torch.arange(-cap, 0))
    assert table.capacity() > cap


def test_insert_or_assign_duplicates_last_wins_small():
    table = make_table()
    values = torch.arange(5 * DIM, dtype=torch.float32).reshape(5, DIM)
    table.insert_or_assign([1, 2, 1, 1, 2], values)
    assert same_bits(table.find([1, 2]).values, values[[3, 4]])


def test_insert_or_assign_duplicates_last_wins_large_batch():
    # Documented: "With duplicates, the last one wins." It must hold for batches large
    # enough that torch's index_put_ runs in parallel, where duplicate indices are undefined.
    # Each duplicated key sits on both sides of where T threads would split the rows
    # (T = 2, 3, 4, 6, 8): its last occurrence is the first row of a later thread's chunk.
    n = 240_000
    keys = np.arange(10**9, 10**9 + n, dtype=np.int64)
    last_row = {}
    for key, threads in enumerate((2, 3, 4, 6, 8)):
        boundary = n // threads
        keys[boundary - 1] = keys[boundary] = key
        last_row[key] = boundary
    values = torch.arange(n * DIM, dtype=torch.float32).reshape(n, DIM)
    for trial in range(10):
        table = make_table()
        table.insert_or_assign(torch.from_numpy(keys), values)
        assert table.size() == n - len(last_row)
        got = table.find(list(last_row)).values
        assert same_bits(got, values[list(last_row.values())]), trial


def test_large_batches_with_default_threads():
    rng = np.random.default_rng(7)
    table, model = make_table(), {}
    oracle = make_table()
    for step in range(6):
        ids = rng.integers(-5000, 5000, size=20_000).astype(np.int64)
        if step % 2:
            ids[::50] = I64_MIN
        if step == 3:
            uniq = np.unique(ids)
            values = rng.standard_normal((uniq.shape[0], DIM)).astype(np.float32)
            table.insert_or_assign(torch.from_numpy(uniq), torch.from_numpy(values))
            model.update(zip(uniq.tolist(), values))
        else:
            result = table.find_or_insert(torch.from_numpy(ids))
            new = [i for i in dict.fromkeys(ids.tolist()) if i not in model]
            if new:
                model.update(zip(new, oracle.find_or_insert(new).values.numpy()))
            assert same_bits(result.values, np.stack([model[i] for i in ids.tolist()]))
        gone = rng.integers(-5000, 5000, size=3000).astype(np.int64)
        removed = {i for i in gone.tolist() if i in model}
        assert table.erase(torch.from_numpy(gone)) == len(removed)
        for i in removed:
            del model[i]
        assert table.size() == len(model)
        probe = np.concatenate([np.fromiter(model, dtype=np.int64), gone])
        found = table.find(torch.from_numpy(probe))
        assert found.found.tolist() == [i in model for i in probe.tolist()]
        hit = found.found.numpy()
        assert same_bits(found.values.numpy()[hit],
                         np.stack([model[i] for i in probe[hit].tolist()]))
        assert not found.values.numpy()[~hit].any()


@pytest.mark.parametrize("keys", [[], torch.empty(0, dtype=torch.int64), np.array([], dtype=str)],
                         ids=["list", "tensor", "numpy-str"])
def test_empty_batches(keys):
    table = make_table()
    table.find_or_insert([1])
    assert table.find(keys).values.shape == (0, DIM)
    assert table.find_or_insert(keys).values.shape == (0, DIM)
    assert table.contains(keys).shape == (0,)
    assert table.erase(keys) == 0
    table.insert_or_assign(keys, torch.empty(0, DIM))
    assert table.size() == 1
