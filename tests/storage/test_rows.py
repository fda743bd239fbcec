"""The stored row layout: versioned, fixed-size, validated on read."""

from __future__ import annotations

import numpy as np
import pytest

from dynembed.errors import StoreCorruptError
from dynembed.storage.rows import (
    HEADER_BYTES,
    LAYOUT_VERSION,
    RowBlock,
    RowCodec,
    decode_ids,
    encode_ids,
)


def block(n=3, dim=4, width=2):
    ids = np.arange(n, dtype=np.int64) * 11 - 7
    return RowBlock(ids, np.arange(n * dim, dtype=np.float32).reshape(n, dim),
                    -np.arange(n * width, dtype=np.float32).reshape(n, width),
                    ids * 3, ids * 5)


def test_record_size_and_header():
    codec = RowCodec(4, 2)
    assert codec.itemsize == HEADER_BYTES + 4 * (4 + 2)
    record = codec.encode(block(1))[0]
    assert record[:2] == b"DE" and record[2] == LAYOUT_VERSION
    assert int.from_bytes(record[4:8], "little") == 4
    assert int.from_bytes(record[8:12], "little") == 2


def test_ids_encode_in_numeric_byte_order_and_round_trip():
    ids = np.array([5, -(2**63), 2**63 - 1, -1, 0], dtype=np.int64)
    keys = encode_ids(ids, b"ns:")
    assert all(k.startswith(b"ns:") and len(k) == 11 for k in keys)
    assert sorted(keys) == [keys[i] for i in np.argsort(ids)]
    assert np.array_equal(decode_ids(keys, 3), ids)


def test_state_width_zero_round_trips():
    codec = RowCodec(3, 0)
    rows = block(2, dim=3, width=0)
    found, got = codec.decode(rows.ids, codec.encode(rows))
    assert found.all() and got.state.shape == (2, 0)
    assert np.array_equal(got.weights, rows.weights)


@pytest.mark.parametrize("damage, match", [
    (lambda r: r[:-1], "bytes"),
    (lambda r: b"XX" + r[2:], "magic"),
    (lambda r: r[:2] + bytes([LAYOUT_VERSION + 1]) + r[3:], "version"),
    (lambda r: r[:4] + (8).to_bytes(4, "little") + r[8:], "dim"),
])
def test_damaged_records_raise_naming_the_store_and_id(damage, match):
    codec = RowCodec(4, 2, store="RocksDBStore('/x')")
    rows = block(3)
    records = codec.encode(rows)
    records[1] = damage(records[1])
    with pytest.raises(StoreCorruptError, match=match) as info:
        codec.decode(rows.ids, records)
    assert "RocksDBStore('/x')" in str(info.value) and str(rows.ids[1]) in str(info.value)
