"""HashIndex and its kernels against plain Python / numpy reference models."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dynembed.kernels._streaming import STREAM_FROM_BYTES, can_stream
from dynembed.kernels.gather import segment_sum
from dynembed.kernels.hash_index import _dedup, index_find_rows, unique_inverse
from dynembed.table.index import EMPTY, HashIndex

MASK64 = (1 << 64) - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1


def mix64(x: int) -> int:
    """MurmurHash3's finaliser, written independently of the kernel."""
    x &= MASK64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK64
    x ^= x >> 33
    return x


def home(key: int, buckets: int) -> int:
    return mix64(key) & (buckets - 1)


def keys_with_home(bucket: int, count: int, buckets: int = 16, start: int = 0) -> list[int]:
    out, k = [], start
    while len(out) < count:
        if home(k, buckets) == bucket:
            out.append(k)
        k += 1
    return out


def arr(ids) -> np.ndarray:
    return np.asarray(list(ids), dtype=np.int64).reshape(-1)


# A small pool forces duplicates, collisions and long probe chains: keys sharing home
# buckets 14 and 15 of a 16-bucket index (chains wrap around the end), 0 and -1, and the
# int64 extremes.
POOL = sorted(set(
    keys_with_home(14, 6) + keys_with_home(15, 4) + keys_with_home(0, 3)
    + [0, 1, -1, 2, 3, I64_MIN, I64_MAX, I64_MIN + 1, I64_MAX - 1, 2**32, -2**32]))
ids_lists = st.lists(st.sampled_from(POOL), max_size=10)


class Model:
    """Reference index: dict id -> slot, a free-slot stack and a high-water mark."""

    def __init__(self) -> None:
        self.slots: dict[int, int] = {}
        self.free: list[int] = []
        self.high_water = 0

    def insert(self, ids: list[int]) -> list[int]:
        out = []
        for key in ids:
            if key not in self.slots:
                if self.free:
                    self.slots[key] = self.free.pop()
                else:
                    self.slots[key] = self.high_water
                    self.high_water += 1
            out.append(self.slots[key])
        return out

    def erase(self, ids: list[int]) -> list[int]:
        out = []
        for key in ids:
            slot = self.slots.pop(key, EMPTY)
            out.append(slot)
        return out


class Harness:
    """Drives a HashIndex the way the table does: find, reserve, insert_missing, free list."""

    def __init__(self, entries: int = 0) -> None:
        self.index = HashIndex(entries)
        self.free = np.empty(0, dtype=np.int64)
        self.free_top = 0
        self.high_water = 0

    def insert(self, ids: np.ndarray, reserve: bool = True) -> tuple[int, np.ndarray]:
        slots = self.index.find(ids)
        missing = len(set(ids[slots == EMPTY].tolist()))
        if reserve:
            self.index.reserve(self.index.size + missing)
        inserted, self.free_top, self.high_water = self.index.insert_missing(
            ids, slots, self.free, self.free_top, self.high_water)
        assert inserted == missing
        return inserted, slots

    def erase(self, ids: np.ndarray) -> np.ndarray:
        freed = self.index.erase(ids)
        got = freed[freed != EMPTY]
        need = self.free_top + got.shape[0]
        if need > self.free.shape[0]:
            grown = np.empty(max(need, 2 * self.free.shape[0]), dtype=np.int64)
            grown[:self.free_top] = self.free[:self.free_top]
            self.free = grown
        self.free[self.free_top:need] = got
        self.free_top = need
        return freed


def check_against(harness: Harness, model: Model, probe: list[int]) -> None:
    index = harness.index
    assert index.size == len(model.slots)
    assert index.size <= 0.75 * index.buckets
    assert index.buckets & (index.buckets - 1) == 0
    queries = arr(list(model.slots) + probe)
    found = index.find(queries)
    expected = [model.slots.get(k, EMPTY) for k in queries.tolist()]
    assert found.tolist() == expected
    check_find_rows(index, queries, expected)
    ids, slots = index.items()
    assert dict(zip(ids.tolist(), slots.tolist())) == model.slots
    assert len(ids) == index.size


def check_find_rows(index: HashIndex, queries: np.ndarray, expected: list[int]) -> None:
    """find_rows gives find's slots, copies each present key's row and leaves the output
    rows of absent keys untouched."""
    slots = np.asarray(expected, dtype=np.int64)
    rows = np.arange((max(slots.max(initial=0), 0) + 1) * 3, dtype=np.float32).reshape(-1, 3)
    out = np.full((queries.shape[0], 3), -7.0, dtype=np.float32)
    found, absent = index.find_rows(queries, rows, out)
    assert found.tolist() == expected
    present = slots != EMPTY
    assert absent == np.count_nonzero(~present)
    np.testing.assert_array_equal(out[present], rows[slots[present]])
    assert (out[~present] == -7.0).all()


class HashIndexMachine(RuleBasedStateMachine):
    # Thousands of tiny kernel calls: run them on one numba thread, because a parallel
    # launch on an oversubscribed CI box can cost milliseconds each. The multi-threaded
    # paths are covered by the other tests of this file.
    @initialize(entries=st.sampled_from([0, 0, 1, 12, 13, 100]))
    def setup(self, entries):
        self._threads = numba.get_num_threads()
        numba.set_num_threads(1)
        self.h = Harness(entries)
        self.model = Model()

    def teardown(self):
        if hasattr(self, "_threads"):
            numba.set_num_threads(self._threads)

    @rule(ids=ids_lists)
    def insert(self, ids):
        before_hw, before_free = self.h.high_water, self.h.free_top
        expected = self.model.insert(ids)
        _, slots = self.h.insert(arr(ids))
        assert slots.tolist() == expected
        assert self.h.high_water == self.model.high_water
        assert self.h.free_top == len(self.model.free)
        assert self.h.free[:self.h.free_top].tolist() == self.model.free
        # Freed slots are used before the high-water mark moves.
        if self.h.high_water > before_hw:
            assert self.h.free_top == 0 or before_free == 0

    @rule(ids=ids_lists)
    def find(self, ids):
        assert self.h.index.find(arr(ids)).tolist() == [self.model.slots.get(k, EMPTY)
                                                        for k in ids]

    @rule(ids=ids_lists)
    def erase(self, ids):
        expected = self.model.erase(ids)
        freed = self.h.erase(arr(ids))
        assert freed.tolist() == expected
        self.model.free.extend(s for s in expected if s != EMPTY)

    @rule(entries=st.integers(min_value=0, max_value=200))
    def reserve(self, entries):
        before = self.h.index.buckets
        self.h.index.reserve(entries)
        after = self.h.index.buckets
        assert after >= before
        if entries:
            assert after * 0.75 >= entries
        if after > before:
            assert after // 2 * 0.75 < entries  # the smallest power of two that fits

    @precondition(lambda self: self.h.index.size > 0)
    @rule()
    def erase_everything(self):
        ids = list(self.model.slots)
        expected = self.model.erase(ids)
        assert self.h.erase(arr(ids)).tolist() == expected
        self.model.free.extend(expected)
        assert self.h.index.size == 0
        assert (self.h.index.rows == EMPTY).all()

    @invariant()
    def agrees_with_model(self):
        check_against(self.h, self.model, POOL)


HashIndexMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50,
                                              deadline=None)
TestHashIndexMachine = HashIndexMachine.TestCase


@pytest.fixture
def one_numba_thread():
    """Many tiny kernel calls: one thread avoids a parallel launch per call, which can cost
    milliseconds on an oversubscribed box. Parallel paths are tested on large batches."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(threads)


def test_heavy_collisions_in_a_tiny_index(one_numba_thread):
    # 16 buckets, never grown: up to 12 live keys, most of them sharing home buckets 14/15
    # (so chains wrap past the end to 0, 1, ...) and 0. Many erases and re-inserts exercise
    # backward-shift deletion in every cyclic position.
    pool = keys_with_home(14, 8) + keys_with_home(15, 6) + keys_with_home(0, 4) + \
        keys_with_home(7, 3) + [I64_MIN, I64_MAX, -1]
    h, model = Harness(0), Model()
    assert h.index.buckets == 16
    rng = np.random.default_rng(1234)
    for step in range(3000):
        live = list(model.slots)
        if len(live) < 12 and (not live or rng.random() < 0.55):
            absent = [k for k in pool if k not in model.slots]
            k = int(rng.integers(1, min(12 - len(live), len(absent)) + 1))
            ids = [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
            expected = model.insert(ids)
            _, slots = h.insert(arr(ids), reserve=False)
            assert slots.tolist() == expected, step
        else:
            k = int(rng.integers(1, len(live) + 1))
            ids = [live[i] for i in rng.choice(len(live), size=k, replace=False)]
            ids.append(pool[int(rng.integers(len(pool)))])  # maybe absent, maybe a duplicate
            expected = model.erase(ids)
            assert h.erase(arr(ids)).tolist() == expected, step
            model.free.extend(s for s in expected if s != EMPTY)
        assert h.index.buckets == 16
        check_against(h, model, pool)


@pytest.mark.parametrize("bucket", [0, 7, 13, 15])
def test_erase_each_position_of_one_full_chain(bucket, one_numba_thread):
    # 12 keys with the same home bucket fill one contiguous (possibly wrapping) chain.
    chain = keys_with_home(bucket, 12)
    for victim in range(12):
        for order in (chain, chain[::-1]):
            h, model = Harness(0), Model()
            model.insert(order)
            h.insert(arr(order), reserve=False)
            expected = model.erase([order[victim]])
            assert h.erase(arr([order[victim]])).tolist() == expected
            model.free.extend(expected)
            check_against(h, model, chain)
            # Re-inserting takes the freed slot back; the chain stays consistent.
            expected = model.insert([order[victim]])
            _, slots = h.insert(arr([order[victim]]), reserve=False)
            assert slots.tolist() == expected
            check_against(h, model, chain)
            assert sorted(model.slots.values()) == list(range(12))


def test_reserve_keeps_entries_and_rehashes():
    h, model = Harness(0), Model()
    keys = POOL + list(range(100, 160))
    model.insert(keys)
    h.insert(arr(keys))
    for entries in (0, 10, 1000, 5000):
        h.index.reserve(entries)
        check_against(h, model, [7, 8, 9])
    assert h.index.buckets == 8192


def test_large_batches_with_default_threads():
    rng = np.random.default_rng(11)
    h, model = Harness(0), Model()
    for _ in range(4):
        ids = rng.integers(-30_000, 30_000, size=50_000)
        ids[::101] = I64_MIN
        ids[::103] = I64_MAX
        expected = model.insert(ids.tolist())
        _, slots = h.insert(arr(ids))
        assert slots.tolist() == expected
        gone = rng.integers(-30_000, 30_000, size=20_000)
        expected = model.erase(gone.tolist())
        assert h.erase(arr(gone)).tolist() == expected
        model.free.extend(s for s in expected if s != EMPTY)
        check_against(h, model, [I64_MIN, I64_MAX, 0])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dim", [8, 64])
def test_find_rows_streamed_matches_plain(threads, dim):
    """The kernel's streaming-store copy gives what the plain copy gives, rows of absent keys
    untouched, in every thread share (share ends that are not multiples of the block)."""
    rng = np.random.default_rng(5)
    h = Harness(0)
    keys = rng.choice(1 << 40, size=3_000, replace=False).astype(np.int64)
    h.insert(keys)
    index = h.index
    rows = rng.standard_normal((3_000, dim)).astype(np.float32)
    queries = np.concatenate([rng.choice(keys, 4_001), rng.integers(1 << 41, 1 << 42, 999)])
    rng.shuffle(queries)
    results = []
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for stream in (False, True):
            out = torch.full((queries.shape[0], dim), -7.0).numpy()  # 64-byte aligned
            found = np.empty(queries.shape[0], dtype=np.int64)
            index_find_rows(index.table, queries, rows, out, found, threads, stream)
            results.append((out, found))
    finally:
        numba.set_num_threads(previous)
    (plain, plain_slots), (streamed, streamed_slots) = results
    np.testing.assert_array_equal(streamed_slots, plain_slots)
    np.testing.assert_array_equal(streamed, plain)
    present = plain_slots != EMPTY
    assert 0 < present.sum() < queries.shape[0]
    np.testing.assert_array_equal(streamed[present], rows[plain_slots[present]])
    assert (streamed[~present] == -7.0).all()


def test_can_stream_only_large_aligned_outputs_of_the_rows_width():
    rows = STREAM_FROM_BYTES // (64 * 4)
    source = np.zeros((10, 64), dtype=np.float32)
    assert can_stream(torch.empty(rows, 64).numpy(), source)
    assert not can_stream(torch.empty(rows - 1, 64).numpy(), source)  # small: may be cached
    assert not can_stream(torch.empty(rows * 6, 12).numpy(), source[:, :12].copy())  # 48 B rows
    assert can_stream(torch.empty(rows + 1, 64).numpy()[1:], source)  # 256 B rows stay aligned
    misaligned = torch.empty(rows * 64 + 1).numpy()[1:].reshape(rows, 64)
    assert not can_stream(misaligned, source)
    assert not can_stream(torch.empty(rows, 128).numpy()[:, :64], source)  # not C-contiguous
    assert not can_stream(torch.empty(rows, 64, dtype=torch.float64).numpy(), source)  # dtypes
    assert can_stream(torch.empty(rows, 64, dtype=torch.float64).numpy(), source.astype(np.float64))
    many = rows * 16  # rows of 4 elements: 32 B of int64 stream, 16 B of int32 do not
    assert can_stream(torch.empty(many, 4, dtype=torch.int64).numpy(), np.zeros((9, 4), np.int64))
    assert not can_stream(torch.empty(many * 2, 4, dtype=torch.int32).numpy(),
                          np.zeros((9, 4), np.int32))
    assert not can_stream(torch.empty(rows * 2, 64, dtype=torch.float16).numpy(),
                          np.zeros((9, 64), np.float16))  # no streaming copy for this dtype
    # one long row: numpy calls it C-contiguous whatever its stride, so the length decides
    wide = torch.empty(2, rows * 64 + 8).numpy()[:1, :rows * 64 + 3]
    assert not can_stream(wide, np.zeros((1, wide.shape[1]), dtype=np.float32))
    # the source rows must have the output's width and be contiguous (the copy reads whole
    # output rows from them)
    assert not can_stream(torch.empty(rows, 64).numpy(), np.zeros((10, 32), np.float32))
    assert not can_stream(torch.empty(rows, 64).numpy(), np.zeros((10, 128), np.float32)[:, :64])


def test_find_rows_streams_a_large_output_correctly():
    """HashIndex.find_rows on an output large enough to stream."""
    rng = np.random.default_rng(6)
    h, model = Harness(0), Model()
    keys = rng.integers(-2**62, 2**62, size=40_000)
    model.insert(keys.tolist())
    h.insert(arr(keys))
    queries = np.concatenate([rng.choice(keys, 30_000), rng.integers(0, 10, 3_000)])
    rows = rng.standard_normal((h.high_water, 64)).astype(np.float32)
    out = torch.full((queries.shape[0], 64), -7.0).numpy()
    assert can_stream(out, rows)
    expected = np.array([model.slots.get(k, EMPTY) for k in queries.tolist()])
    found, absent = h.index.find_rows(queries, rows, out)
    np.testing.assert_array_equal(found, expected)
    present = expected != EMPTY
    assert absent == np.count_nonzero(~present)
    np.testing.assert_array_equal(out[present], rows[expected[present]])
    assert (out[~present] == -7.0).all()


def test_insert_missing_gives_duplicates_one_slot():
    h = Harness(0)
    ids = arr([5, 5, I64_MIN, 5, I64_MIN])
    inserted, slots = h.insert(ids)
    assert inserted == 2 and slots.tolist() == [0, 0, 1, 0, 1]


# ----------------------------------------------------------------------------- unique_inverse
def numpy_unique_first_order(ids: np.ndarray):
    uniq, first, inverse, counts = np.unique(ids, return_index=True, return_inverse=True,
                                             return_counts=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return uniq[order], rank[inverse.reshape(-1)], counts[order]


int64s = st.one_of(st.sampled_from(POOL), st.integers(min_value=I64_MIN, max_value=I64_MAX))


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(int64s, max_size=80))
def test_unique_inverse_matches_numpy(ids):
    ids = arr(ids)
    unique, inverse, counts = unique_inverse(ids)
    exp_unique, exp_inverse, exp_counts = numpy_unique_first_order(ids)
    assert unique.dtype == inverse.dtype == counts.dtype == np.int64
    assert unique.tolist() == exp_unique.tolist()
    assert inverse.tolist() == exp_inverse.tolist()
    assert counts.tolist() == exp_counts.tolist()
    assert unique[inverse].tolist() == ids.tolist()
    # First-occurrence order, independently of numpy.
    assert unique.tolist() == list(dict.fromkeys(ids.tolist()))


def test_unique_inverse_large_and_empty():
    rng = np.random.default_rng(0)
    ids = rng.integers(-50, 50, size=20_000).astype(np.int64)
    ids[::97] = I64_MIN
    ids[::89] = I64_MAX
    unique, inverse, counts = unique_inverse(ids)
    exp = numpy_unique_first_order(ids)
    assert unique.tolist() == exp[0].tolist()
    assert np.array_equal(inverse, exp[1]) and np.array_equal(counts, exp[2])
    unique, inverse, counts = unique_inverse(np.empty(0, dtype=np.int64))
    assert unique.shape == inverse.shape == counts.shape == (0,)


def test_dedup_with_a_wide_position_table():
    """Batches of 2**31 keys or more get an int64 position table; the kernel must give the
    same answer with it (too large to build here, so the kernel is called directly)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(-300, 300, size=5_000).astype(np.int64)
    wide = _dedup(ids, np.full(16_384, EMPTY, dtype=np.int64))
    for got, expected in zip(wide, unique_inverse(ids)):
        assert got.dtype == np.int64 and np.array_equal(got, expected)


# ----------------------------------------------------------------------------- segment_sum
@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(0, 60), dim=st.integers(1, 9),
       segments=st.integers(1, 12))
def test_segment_sum_matches_add_at(data, n, dim, segments):
    segment = arr(data.draw(st.lists(st.integers(0, segments - 1), min_size=n, max_size=n)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) * 100
    expected = np.zeros((segments, dim), dtype=np.float32)
    np.add.at(expected, segment, values)
    got = segment_sum(values, segment, segments)
    assert got.dtype == np.float32 and got.shape == (segments, dim)
    # Both add the rows of a segment in input order in float32: bit-exact.
    assert np.array_equal(got, expected)


def test_segment_sum_wide_rows():
    rng = np.random.default_rng(5)
    values = rng.standard_normal((500, 130)).astype(np.float32)
    segment = rng.integers(0, 40, size=500).astype(np.int64)
    expected = np.zeros((41, 130), dtype=np.float32)
    np.add.at(expected, segment, values)
    got = segment_sum(values, segment, 41)
    assert np.array_equal(got, expected)
    assert not got[40].any()  # a segment with no rows sums to zero


def test_a_growing_index_keeps_answering_until_its_new_buckets_are_filled(monkeypatch):
    """reserve() put the new, empty buckets in place before filling them: a read from
    another thread meanwhile found present keys absent."""
    import dynembed.table.index as index_module

    index = HashIndex(8)
    ids = np.arange(8, dtype=np.int64) * 7919
    slots = np.full(8, EMPTY, dtype=np.int64)
    index.insert_missing(ids, slots, np.empty(0, dtype=np.int64), 0, 0)
    seen_during = []
    rehash = index_module.k.index_rehash

    def rehash_and_read(old, new):
        seen_during.append(index.find(ids))  # what a concurrent reader gets meanwhile
        rehash(old, new)

    monkeypatch.setattr(index_module.k, "index_rehash", rehash_and_read)
    index.reserve(1000)
    assert len(seen_during) == 1 and (seen_during[0] == slots).all()
    assert (index.find(ids) == slots).all()
