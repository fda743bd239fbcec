"""Kernels against independent references, and the inputs that reach them in other types:
int seeds, ids of other dtypes, strided buffers, int64 extremes.

Hashes, CRCs and seeded vectors are part of the on-disk and cross-process contract (ids,
checkpoint blocks, key buckets, initial rows), so they are pinned to reference
implementations written here or to the ``xxhash`` package.
"""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dynembed.kernels import crc
from dynembed.kernels import sketch as sk
from dynembed.kernels._hashing import bucket_mix, mix64, xxh64
from dynembed.kernels.hash_index import as_ids, unique_inverse
from dynembed.kernels.init_rows import UNIFORM, init_rows
from dynembed.kernels.records import (
    HEAD_WORDS,
    columns_of,
    pack_records,
    records_of,
    unpack_records,
)
from dynembed.kernels.strings import hash_bytes_by_lengths, hash_utf8_by_codepoints
from dynembed.table.index import EMPTY, HashIndex
from tests.kernels.test_hash_index import I64_MAX, I64_MIN, MASK64
from tests.kernels.test_hash_index import mix64 as ref_mix64

SEEDS = [0, 1, 7, 2**32 + 5, 2**63 - 1, 2**63, 2**64 - 1]


def ref_crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected), the textbook definition."""
    c = 0xFFFFFFFF
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------- hashes
def test_crc32c_reference_check_value():
    assert ref_crc32c(b"123456789") == 0xE3069283  # the published check value


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), seed=st.sampled_from(SEEDS), offset=st.integers(0, 9))
def test_xxh64_matches_xxhash_at_any_offset(data, seed, offset):
    buf = np.frombuffer(b"\xab" * offset + data + b"\xcd" * 3, dtype=np.uint8)
    got = int(xxh64(buf, offset, offset + len(data), np.uint64(seed)))
    assert got == xxhash.xxh64_intdigest(data, seed)


@pytest.mark.parametrize("seed", [5, np.int64(5), np.uint32(5), np.uint64(5)])
def test_string_hashes_read_any_integer_seed_as_uint64(seed):
    """A seed typed int64 (any Python int) was added to uint64 primes in float64: digests
    unlike XXH64's for the same seed."""
    keys = [b"abc", b"", b"x" * 40, b"\xff\x00\x01"]
    buf = np.frombuffer(b"".join(keys), dtype=np.uint8)
    lengths = np.array([len(k) for k in keys], dtype=np.int64)
    expected = [xxhash.xxh64_intdigest(k, 5) for k in keys]
    assert hash_bytes_by_lengths(buf, lengths, seed).tolist() == expected
    text = ["abc", "", "é日😀", "x" * 40]
    joined = np.frombuffer("\x1f".join(text).encode("utf-8"), dtype=np.uint8)
    got = hash_utf8_by_codepoints(joined, np.array([len(t) for t in text], np.int64), 1, seed)
    assert got.tolist() == [xxhash.xxh64_intdigest(t.encode("utf-8"), 5) for t in text]


@settings(max_examples=200, deadline=None)
@given(key=st.integers(I64_MIN, I64_MAX))
def test_mix64_and_bucket_hash_match_the_reference(key):
    """The bucket hash decides checkpoint file order and shard ownership: it must not move."""
    assert int(mix64(np.uint64(key & MASK64))) == ref_mix64(key)
    assert int(mix64(np.int64(key))) == ref_mix64(key)  # any integer type, same bits
    assert int(bucket_mix(np.int64(key))) == ref_mix64(key ^ 0x5BD1E9955BD1E995)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200), offset=st.integers(0, 8))
def test_crc32c_hardware_and_software_match_the_reference(data, offset):
    buf = np.frombuffer(b"\x5a" * offset + data, dtype=np.uint8)
    expected = ref_crc32c(data)
    for kernel in (crc.crc32, crc.crc32c_software):
        assert int(kernel(buf, offset, offset + len(data), crc.TABLES)) == expected


@pytest.mark.skipif(not crc.HARDWARE, reason="the CPU has no SSE4.2 crc32 instruction")
def test_hardware_crc32c_of_a_strided_buffer():
    """The uint64 view of the hardware CRC raised on a strided buffer, which the software
    CRC (the same function on another machine) takes."""
    base = np.random.default_rng(3).integers(0, 256, 203, dtype=np.uint8)
    strided = base[::2]
    for start, end in ((0, strided.shape[0]), (3, 90), (5, 5)):
        expected = ref_crc32c(bytes(strided[start:end]))
        assert int(crc.crc32c_hardware(strided, start, end, crc.TABLES)) == expected
        assert int(crc.crc32c_software(strided, start, end, crc.TABLES)) == expected


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096])
def test_block_crcs_of_every_block_including_a_short_last_one(size):
    buf = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    expected = [ref_crc32c(bytes(buf[i:i + 4096])) for i in range(0, size, 4096)]
    assert crc.block_crcs(buf, 4096, crc.TABLES).tolist() == expected
    assert crc.block_crcs_serial(buf, 4096, crc.TABLES).tolist() == expected


# ----------------------------------------------------------------------------- seeded rows
def ref_uniform_row(seed: int, key: int, dim: int, low: float, high: float) -> np.ndarray:
    """The UNIFORM initialiser in plain Python: SplitMix64 at counter j of the stream
    mix64(seed ^ mix64(key)), 53 bits to [0, 1), scaled, rounded to float32."""
    base = ref_mix64(seed ^ ref_mix64(key))
    out = []
    for j in range(dim):
        z = ref_mix64((base + (j + 1) * 0x9E3779B97F4A7C15) & MASK64)
        out.append(low + (high - low) * ((z >> 11) / 2.0**53))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("seed", [3, np.int64(3), np.uint64(3)])
def test_init_rows_reads_any_integer_seed_as_uint64(seed):
    """An int64 seed was xor-ed with uint64 hashes in another type: other initial vectors
    than the same seed as uint64, so a key's row depended on how the seed was typed."""
    ids = np.array([0, 1, -1, I64_MIN, I64_MAX, 123456789], dtype=np.int64)
    weights = np.zeros((ids.shape[0], 9), dtype=np.float32)
    low, high = -0.5, 0.5
    init_rows(weights, np.arange(ids.shape[0]), ids, seed, UNIFORM, low, high,
              float(np.float32(low)), float(np.nextafter(np.float32(high), np.float32(0))))
    for row, key in zip(weights, ids.tolist()):
        np.testing.assert_array_equal(row, ref_uniform_row(3, key, 9, low, high))


# ----------------------------------------------------------------------------- admission
def ref_columns(key: int, seeds: list[int], width: int) -> list[int]:
    return [ref_mix64((key & MASK64) ^ s) & (width - 1) for s in seeds]


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_sketch_and_bloom_read_int64_seeds_as_uint64(dtype):
    """``uint64 ^ int64`` is another type in numba: int64 seeds picked other counters and
    bits than the same seeds as uint64."""
    seeds = [3, 7, 2**62 + 1]
    ids = np.array([1, -5, I64_MIN, I64_MAX], dtype=np.int64)
    sketch = np.zeros((3, 64), dtype=np.int32)
    sk.cms_add(sketch, ids, np.array([1, 2, 3, 4]), np.array(seeds, dtype=dtype))
    expected = np.zeros_like(sketch)
    for key, count in zip(ids.tolist(), [1, 2, 3, 4]):
        cols = ref_columns(key, seeds, 64)
        target = min(expected[d, c] for d, c in enumerate(cols)) + count
        for d, c in enumerate(cols):
            expected[d, c] = max(expected[d, c], target)
    np.testing.assert_array_equal(sketch, expected)
    bits = np.zeros(2, dtype=np.uint64)
    sk.bloom_test_and_set(bits, ids, np.array(seeds, dtype=dtype), True)
    want = [0, 0]
    for key in ids.tolist():
        for b in ref_columns(key, seeds, 128):
            want[b >> 6] |= 1 << (b & 63)
    assert bits.tolist() == want


def test_coin_flips_read_an_int_seed_as_uint64():
    ids = np.arange(-50, 50, dtype=np.int64)
    half = np.full(ids.shape[0], 2**63, dtype=np.uint64)
    as_uint = sk.coin_flips(ids, 4, np.uint64(99), half)
    assert sk.coin_flips(ids, 4, 99, half).tolist() == as_uint.tolist()
    salt = ref_mix64(4 ^ 99)
    assert as_uint.tolist() == [ref_mix64((k & MASK64) ^ salt) < 2**63 for k in ids.tolist()]


# ----------------------------------------------------------------------------- id dtypes
def test_hash_index_reads_uint64_ids_by_their_bits():
    """numba compared the int64 keys with uint64 ids in float64: ids at or above 2**63 (as
    uint64) were never found, and neighbours above 2**53 could match each other."""
    ids = np.array([I64_MAX, -1, I64_MIN, 0, 2**53 + 1, -(2**53) - 1], dtype=np.int64)
    index = HashIndex(len(ids))
    slots = np.full(len(ids), EMPTY, dtype=np.int64)
    index.insert_missing(ids.view(np.uint64), slots, np.empty(0, np.int64), 0, 0)
    assert slots.tolist() == list(range(len(ids)))
    for query in (ids, ids.view(np.uint64)):
        assert index.find(query).tolist() == slots.tolist()
        rows = np.arange(len(ids) * 2, dtype=np.float32).reshape(-1, 2)
        out = np.zeros_like(rows)
        found, absent = index.find_rows(query, rows, out)
        assert found.tolist() == slots.tolist() and absent == 0
        np.testing.assert_array_equal(out, rows)
    near = np.array([2**53, 2**53 + 2], dtype=np.uint64)  # equal to 2**53 + 1 in float64
    assert index.find(near).tolist() == [EMPTY, EMPTY]
    assert index.erase(ids.view(np.uint64)).tolist() == slots.tolist()
    assert index.size == 0


def test_hash_index_takes_narrow_ints_by_value_and_refuses_floats():
    index = HashIndex(4)
    slots = np.full(2, EMPTY, dtype=np.int64)
    index.insert_missing(np.array([-1, 7], dtype=np.int32), slots, np.empty(0, np.int64), 0, 0)
    assert index.find(np.array([-1, 7], dtype=np.int64)).tolist() == [0, 1]
    assert index.find(np.array([7], dtype=np.uint8)).tolist() == [1]
    for bad in (np.array([1.0]), np.array([True])):
        with pytest.raises(TypeError, match="integer"):
            index.find(bad)


def test_unique_inverse_of_other_integer_dtypes_and_refuses_floats():
    """Floats deduplicated 1.0 and 1.5 as two copies of id 1."""
    unique, inverse, counts = unique_inverse(np.array([2**63, 5, 2**63], dtype=np.uint64))
    assert unique.tolist() == [I64_MIN, 5] and inverse.tolist() == [0, 1, 0]
    assert counts.tolist() == [2, 1]
    unique, inverse, _ = unique_inverse(np.array([-3, 4, -3], dtype=np.int16))
    assert unique.dtype == np.int64 and unique.tolist() == [-3, 4] and inverse.tolist() == [0, 1, 0]
    with pytest.raises(TypeError, match="integer"):
        unique_inverse(np.array([1.0, 1.5, 1.0]))
    strided = np.arange(20, dtype=np.int64)[::-3]
    assert as_ids(strided) is strided
    assert unique_inverse(strided)[0].tolist() == strided.tolist()


# ----------------------------------------------------------------------------- records
@settings(max_examples=60, deadline=None)
@given(data=st.data(), dim=st.integers(1, 5), width=st.integers(0, 3))
def test_records_round_trip_int64_extremes_and_float_bits(data, dim, width):
    """Every int64 count and step and every float32 bit pattern (NaNs, -0.0) survives a
    pack and an unpack, and the compiled packing equals the numpy one."""
    cap = data.draw(st.integers(1, 6))
    meta_vals = st.integers(I64_MIN, I64_MAX)
    meta = np.array([[i, data.draw(meta_vals), data.draw(meta_vals)] for i in range(cap)],
                    dtype=np.int64)
    bits = st.integers(0, 2**32 - 1)
    weights = np.array([[data.draw(bits) for _ in range(dim)] for _ in range(cap)],
                       dtype=np.uint32).reshape(cap, dim)
    state = np.array([[data.draw(bits) for _ in range(width)] for _ in range(cap)],
                     dtype=np.uint32).reshape(cap, width)
    slots = np.array(data.draw(st.permutations(range(cap))), dtype=np.int64)
    out = np.empty((cap, HEAD_WORDS + dim + width), dtype=np.uint32)
    pack_records(weights, state, meta, slots, out)
    np.testing.assert_array_equal(out, records_of(meta[slots, 1], meta[slots, 2],
                                                  weights[slots].view(np.float32),
                                                  state[slots].view(np.float32)))
    counts, last, w, s = columns_of(out, dim)
    assert counts.tolist() == meta[slots, 1].tolist() and last.tolist() == meta[slots, 2].tolist()
    np.testing.assert_array_equal(w.view(np.uint32), weights[slots])
    np.testing.assert_array_equal(s.view(np.uint32), state[slots])
    back_w, back_s = np.zeros_like(weights), np.zeros_like(state)
    back_meta = np.zeros_like(meta)
    unpack_records(out, slots, back_w, back_s, back_meta)
    np.testing.assert_array_equal(back_w, weights)
    np.testing.assert_array_equal(back_s, state)
    np.testing.assert_array_equal(back_meta[:, 1:], meta[:, 1:])


# ----------------------------------------------------------------------------- load limit
@pytest.mark.parametrize("count", [13, 1_000])
def test_insert_without_reserve_keeps_the_load_limit(count):
    """insert_missing without a reserve filled the index past 75% (and one id more than its
    buckets made the probe loop forever); now the index grows itself."""
    index = HashIndex(0)
    assert index.buckets == 16
    ids = np.arange(count, dtype=np.int64) * -7919
    ids = np.concatenate([ids, ids[::3]])  # duplicates share a slot
    slots = np.full(ids.shape[0], EMPTY, dtype=np.int64)
    free = np.array([900_001, 900_000], dtype=np.int64)  # freed slots go first, top last
    inserted, free_top, high_water = index.insert_missing(ids, slots, free, 2, 0)
    assert inserted == index.size == count
    assert index.size <= 0.75 * index.buckets
    assert free_top == 0 and high_water == count - 2
    assert slots[:2].tolist() == [900_000, 900_001] and slots[2:count].tolist() == list(
        range(count - 2))
    assert slots[count:].tolist() == slots[:count:3].tolist()
    assert index.find(ids).tolist() == slots.tolist()
    assert index.find(np.array([1], dtype=np.int64)).tolist() == [EMPTY]
