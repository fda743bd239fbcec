"""The rows file: layout, search, streaming order, and every kind of damage detected."""

from __future__ import annotations

import numpy as np
import pytest

from dynembed.checkpoint.rows_file import RowsFile, RowsFileWriter, hash_order
from dynembed.errors import CheckpointCorruptError
from dynembed.kernels import crc
from dynembed.storage.rows import RowBlock


def random_rows(n: int, dim: int, width: int, seed: int = 0) -> RowBlock:
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64))
    ids = ids[hash_order(ids)]
    n = ids.shape[0]
    return RowBlock(ids, rng.standard_normal((n, dim)).astype(np.float32),
                    rng.standard_normal((n, width)).astype(np.float32),
                    rng.integers(0, 1000, n), rng.integers(0, 1000, n))


def write(path, rows: RowBlock, deleted=None, chunk=7_000, buckets=256):
    deleted = np.empty(0, np.int64) if deleted is None else deleted
    writer = RowsFileWriter(str(path), dim=rows.weights.shape[1], width=rows.state.shape[1],
                            num_buckets=buckets, rows=len(rows), deleted=deleted.shape[0])
    for start in range(0, len(rows), chunk):
        writer.append(rows.take(slice(start, start + chunk)))
    writer.append_deleted(deleted[hash_order(deleted)])
    return writer.commit()


def crc32c_reference(data: bytes) -> int:
    """Bit-by-bit CRC-32C (Castagnoli, reflected), the textbook definition."""
    value = 0xFFFFFFFF
    for byte in data:
        value ^= byte
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
    return value ^ 0xFFFFFFFF


def test_crc32c_check_value():
    assert crc.crc32(np.frombuffer(b"123456789", np.uint8), 0, 9, crc.TABLES) == 0xE3069283


@pytest.mark.parametrize("start,end", [(0, 0), (0, 1), (3, 11), (0, 4096), (5, 5_001)])
@pytest.mark.parametrize("kernel", [crc.crc32c_software] + (
    [crc.crc32c_hardware] if crc.HARDWARE else []))
def test_crc32c_kernels_equal_the_reference(kernel, start, end):
    data = np.random.default_rng(1).integers(0, 256, 5_001, dtype=np.uint8)
    assert kernel(data, start, end, crc.TABLES) == crc32c_reference(data[start:end].tobytes())


@pytest.mark.parametrize("width", [0, 8])
def test_rows_round_trip_and_search(tmp_path, width):
    rows = random_rows(30_000, 8, width)
    deleted = np.array([1, 2, 3, -5], dtype=np.int64)
    size = write(tmp_path / "a.rows", rows, deleted)
    f = RowsFile(str(tmp_path / "a.rows"))
    assert (f.rows, f.deleted, f.dim, f.state_width) == (len(rows), 4, 8, width)
    assert size == (tmp_path / "a.rows").stat().st_size
    whole = f.read_rows(0, f.rows)
    for name in ("ids", "weights", "state", "counts", "last_step"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(rows, name))
    query = np.concatenate([rows.ids[::997], deleted, [12345]])
    pos = f.find(query)
    n = rows.ids[::997].shape[0]
    np.testing.assert_array_equal(pos[:n], np.arange(0, len(rows), 997))
    assert (pos[n:] == -1).all()
    np.testing.assert_array_equal(f.find_deleted(query), np.r_[np.zeros(n, bool),
                                                               np.ones(4, bool), False])
    np.testing.assert_array_equal(f.take(pos[:n]).weights, rows.weights[::997])
    first, stop = f.row_range(10, 20)  # bucket ranges are contiguous and complete
    assert sum(f.row_range(b, b + 1)[1] - f.row_range(b, b + 1)[0] for b in range(10, 20)) \
        == stop - first
    f.verify()


def test_rows_must_arrive_in_hash_order(tmp_path):
    rows = random_rows(100, 4, 0)
    writer = RowsFileWriter(str(tmp_path / "a.rows"), dim=4, width=0, num_buckets=16,
                            rows=100)
    with pytest.raises(ValueError, match="increasing bucket-hash order"):
        writer.append(rows.take(np.arange(100)[::-1]))
    writer.abort()
    assert not (tmp_path / "a.rows").exists()


def test_counts_announced_must_be_met(tmp_path):
    rows = random_rows(100, 4, 0)
    writer = RowsFileWriter(str(tmp_path / "a.rows"), dim=4, width=0, num_buckets=16,
                            rows=len(rows) + 1)
    writer.append(rows)
    with pytest.raises(ValueError, match="rows"):
        writer.commit()


@pytest.fixture
def good_file(tmp_path):
    rows = random_rows(20_000, 8, 8)
    write(tmp_path / "good.rows", rows, np.array([7, 8, 9], dtype=np.int64))
    return tmp_path / "good.rows", rows


@pytest.mark.parametrize("cut", [0, 10, 4096, -1, -4097])
def test_truncated_files_are_refused_at_open(good_file, tmp_path, cut):
    path, _ = good_file
    data = path.read_bytes()
    bad = tmp_path / "bad.rows"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointCorruptError, match="bad.rows"):
        RowsFile(str(bad))


@pytest.mark.parametrize("section", ["ids", "records", "deleted", "row_offsets", "crcs",
                                     "header"])
def test_a_flipped_bit_anywhere_is_detected_before_use(good_file, tmp_path, section):
    path, rows = good_file
    layout = RowsFile(str(path)).layout
    data = bytearray(path.read_bytes())
    offset = 20 if section == "header" else layout.offsets[section][0] + \
        layout.offsets[section][1] // 2
    data[offset] ^= 0x10
    bad = tmp_path / "bad.rows"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"bad\.rows"):
        f = RowsFile(str(bad))  # header and checksums are checked here, the rest when read
        f.verify()
    if section == "row_offsets":
        with pytest.raises(CheckpointCorruptError, match="row_offsets"):
            RowsFile(str(bad)).find(rows.ids)  # at open, or when lookups read them
    if section in ("ids", "records", "deleted"):
        f = RowsFile(str(bad))
        with pytest.raises(CheckpointCorruptError, match=section):
            if section == "deleted":
                f.read_deleted(0, f.deleted)
            else:
                f.read_rows(0, f.rows)


def test_lookups_check_the_blocks_they_read(good_file, tmp_path):
    path, rows = good_file
    layout = RowsFile(str(path)).layout
    data = bytearray(path.read_bytes())
    position = len(rows) // 2
    data[layout.offsets["records"][0] + position * 4 * layout.record_words + 20] ^= 1
    bad = tmp_path / "bad.rows"
    bad.write_bytes(bytes(data))
    f = RowsFile(str(bad))
    far = np.array([0, len(rows) - 1])
    f.take(f.find(rows.ids[far]))  # other blocks still read fine
    with pytest.raises(CheckpointCorruptError, match="records"):
        f.take(f.find(rows.ids[[position]]))


def test_bad_magic_and_version_are_named(good_file, tmp_path):
    path, _ = good_file
    data = bytearray(path.read_bytes())
    data[:8] = b"NOTROWS!"
    (tmp_path / "m.rows").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="bad magic"):
        RowsFile(str(tmp_path / "m.rows"))
    with pytest.raises(CheckpointCorruptError, match="missing"):
        RowsFile(str(tmp_path / "absent.rows"))


def test_unknown_versions_are_refused_with_the_version(good_file, tmp_path):
    from dynembed.checkpoint import rows_file

    path, _ = good_file
    data = bytearray(path.read_bytes())
    data[8:12] = (rows_file.VERSION + 1).to_bytes(4, "little")
    end = rows_file.HEADER_BYTES  # the header's own CRC is its last field
    data[end - 4:end] = crc32c_reference(bytes(data[:end - 8])).to_bytes(4, "little")
    (tmp_path / "v.rows").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="version 2 is not supported"):
        RowsFile(str(tmp_path / "v.rows"))


def test_big_files_index_rows_finely_and_open_checks_the_index(tmp_path):
    rows = random_rows(300_000, 2, 0)
    write(tmp_path / "big.rows", rows, chunk=50_000)
    f = RowsFile(str(tmp_path / "big.rows"))
    assert f.layout.slots >= len(rows) // 256  # about one index slot per 256 rows
    np.testing.assert_array_equal(f.find(rows.ids[::101]), np.arange(0, len(rows), 101))
    assert f._verified["records"].sum() == 0  # opening read the index, not the rows
    data = bytearray((tmp_path / "big.rows").read_bytes())
    middle = f.layout.offsets["row_offsets"][0] + f.layout.offsets["row_offsets"][1] // 2
    data[middle] ^= 0x01
    (tmp_path / "bad.rows").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="row_offsets: block"):
        RowsFile(str(tmp_path / "bad.rows"))
