"""The rows file: one table shard's rows (or a delta's changed rows and deletions) on disk.

Rows are sorted by bucket hash (:mod:`dynembed.keys.buckets`); ids are one column, the rest
of each row one fixed-size record (:mod:`dynembed.kernels.records`), each section starting on
a block boundary. A reader memory-maps the file, finds an id by binary search inside its
bucket and reads its record, touching a few pages and nothing else::

    offset 0      header (one block): magic b"DYNEMBRW", version, block size, dim, state
                  width, buckets, index slots, rows, deletions, (offset, bytes) of every
                  section, the CRC of ``crcs``, the CRC of the header itself
    sections      row_offsets (slots + 1) int64     rows of index slot i: [off[i], off[i + 1])
                  ids         (rows,) int64
                  records     (rows, 4 + dim + state width) uint32: count, last step,
                              weights, optimizer state
                  del_offsets (buckets + 1) int64   deletions of bucket b
                  deleted     (deletions,) int64    ids deleted (delta files only)
                  crcs        uint32 CRC-32C of every block of every section above, in order

Rows are indexed more finely than by bucket: ``slots`` (a power of two, at least the
buckets, about one per 256 rows) top-bit ranges of the hash, so an id's candidates fit in
one block whatever the file's size, and a lookup reads three pages (offsets, ids, record)
in a file of any size. A bucket is a contiguous run of slots.

Every byte a reader uses is checked: the header, the checksum table and the offsets when
the file opens (read whole, about 0.15% of the rows' bytes), other blocks the first time
they are read (a lookup checks the id blocks its binary search reads and its record's).
A truncated or damaged file raises :class:`CheckpointCorruptError` naming the file and the
section; nothing unverified is ever returned.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numba as nb
import numpy as np

from dynembed.checkpoint.manifest import mark_damaged
from dynembed.errors import CheckpointCorruptError
from dynembed.kernels import crc
from dynembed.kernels.records import HEAD_WORDS, columns_of, records_of
from dynembed.keys.buckets import (
    bucket_hash,
    bucket_of_hash,
    check_num_buckets,
    hash_of_id,
)
from dynembed.storage.rows import RowBlock

MAGIC = b"DYNEMBRW"
VERSION = 1
BLOCK = 4096
SECTIONS = ("row_offsets", "ids", "records", "del_offsets", "deleted", "crcs")
DATA = SECTIONS[:-1]
MAX_PENDING_WRITES = 2
_HEAD = struct.Struct("<8sIIIIIIQQ")  # magic, version, block, dim, width, buckets, slots,
#                                       rows, deletions
ROWS_PER_SLOT = 256
"""Rows per index slot the writer aims for (half a block of ids)."""
MAX_SLOTS = 1 << 26
_SECTION = struct.Struct("<QQ")
_TAIL = struct.Struct("<II")  # crc of the crcs section, crc of the header bytes before it
HEADER_BYTES = _HEAD.size + len(SECTIONS) * _SECTION.size + _TAIL.size


def _align(n: int, block: int) -> int:
    return -(-n // block) * block


@dataclass(frozen=True)
class Layout:
    """Where each section of a rows file lies."""

    block: int
    dim: int
    width: int
    buckets: int
    slots: int
    rows: int
    deleted: int
    offsets: dict[str, tuple[int, int]]  # section -> (offset, bytes)

    @staticmethod
    def plan(block: int, dim: int, width: int, buckets: int, rows: int, deleted: int,
             slots: int | None = None) -> Layout:
        if slots is None:
            slots = max(buckets, min(MAX_SLOTS, 1 << max(0, (rows // ROWS_PER_SLOT)
                                                          .bit_length())))
        sizes = {"row_offsets": 8 * (slots + 1), "ids": 8 * rows,
                 "records": 4 * (HEAD_WORDS + dim + width) * rows,
                 "del_offsets": 8 * (buckets + 1), "deleted": 8 * deleted}
        offsets, at = {}, block
        for name in DATA:
            offsets[name] = (at, sizes[name])
            at = _align(at + sizes[name], block)
        offsets["crcs"] = (at, 4 * sum(-(-size // block) for size in sizes.values()))
        return Layout(block, dim, width, buckets, slots, rows, deleted, offsets)

    @property
    def record_words(self) -> int:
        return HEAD_WORDS + self.dim + self.width

    @property
    def file_bytes(self) -> int:
        offset, size = self.offsets["crcs"]
        return offset + size

    def crc_slices(self) -> dict[str, slice]:
        """Which entries of the crcs section belong to each data section."""
        out, at = {}, 0
        for name in DATA:
            n = -(-self.offsets[name][1] // self.block)
            out[name] = slice(at, at + n)
            at += n
        return out

    def header(self, crcs_crc: int) -> bytes:
        head = _HEAD.pack(MAGIC, VERSION, self.block, self.dim, self.width, self.buckets,
                          self.slots, self.rows, self.deleted)
        head += b"".join(_SECTION.pack(*self.offsets[name]) for name in SECTIONS)
        head_crc = crc.crc32(np.frombuffer(head, np.uint8), 0, len(head), crc.TABLES)
        return head + _TAIL.pack(crcs_crc, int(head_crc))


class _Checksums:
    """CRCs of one section's blocks, computed from the bytes as they are written (the
    partial last block is kept until it fills), so the file is never read back."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.parts: list[np.ndarray] = []
        self.tail = b""

    def feed(self, data: np.ndarray) -> None:
        if self.tail:
            head = data[:self.block - len(self.tail)].tobytes()
            self.tail += head
            data = data[len(head):]
            if len(self.tail) < self.block:
                return
            self.parts.append(_crcs_of(np.frombuffer(self.tail, np.uint8), self.block))
            self.tail = b""
        full = data.shape[0] // self.block * self.block
        if full:
            self.parts.append(_crcs_of(data[:full], self.block))
        self.tail = data[full:].tobytes()

    def finish(self) -> np.ndarray:
        if self.tail:
            self.parts.append(_crcs_of(np.frombuffer(self.tail, np.uint8), self.block))
            self.tail = b""
        return np.concatenate(self.parts) if self.parts else np.empty(0, np.uint32)


def _crcs_of(data: np.ndarray, block: int) -> np.ndarray:
    return crc.block_crcs(data, block, crc.TABLES)


class RowsFileWriter:
    """Writes one rows file in a single pass; rows arrive in chunks, in bucket-hash order.

    The number of rows and deletions is fixed up front, so every section is written
    straight to its final place and memory holds about one chunk at a time. Checksums are
    computed as the bytes go out; the writes themselves run on a background thread (at most
    ``MAX_PENDING_WRITES`` chunks in flight) while the caller prepares the next chunk.
    ``commit`` adds the offsets, checksums and header, and syncs the file.

    Args:
        path: the file to create (it must not exist).
        dim, width: row width and optimizer state width.
        num_buckets: buckets of the hash order (a power of two).
        rows, deleted: how many rows and deleted ids will be appended.

    Raises:
        FileExistsError: ``path`` exists.
    """

    def __init__(self, path: str, *, dim: int, width: int, num_buckets: int, rows: int,
                 deleted: int = 0, block: int = BLOCK) -> None:
        self.path = path
        self.layout = Layout.plan(block, dim, width, check_num_buckets(num_buckets), rows,
                                  deleted)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(self._fd, self.layout.file_bytes)
        self._done = {"rows": 0, "deleted": 0}
        self._counts = {"rows": np.zeros(self.layout.slots, np.int64),
                        "deleted": np.zeros(num_buckets, np.int64)}
        self._last_hash = {"rows": None, "deleted": None}
        self._checksums = {name: _Checksums(block) for name in ("ids", "records", "deleted")}
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynembed-ckpt")
        self._writes: deque[Future] = deque()

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def _put(self, section: str, index: int, item_bytes: int, array: np.ndarray) -> None:
        """Writes ``array`` as items ``index...`` of ``section`` (in the background)."""
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if section in self._checksums:
            self._checksums[section].feed(data)
        while len(self._writes) >= MAX_PENDING_WRITES:
            self._writes.popleft().result()
        offset = self.layout.offsets[section][0] + index * item_bytes
        self._writes.append(self._io.submit(self._pwrite, memoryview(data), offset))

    def _ordered(self, kind: str, ids: np.ndarray) -> None:
        """Checks that ids continue the strictly increasing hash order; counts buckets."""
        lay = self.layout
        if self._done[kind] + ids.shape[0] > (lay.rows if kind == "rows" else lay.deleted):
            raise ValueError(f"{self.path}: more {kind} than the "
                             f"{lay.rows if kind == 'rows' else lay.deleted} announced")
        hashes = bucket_hash(ids)
        last = self._last_hash[kind]
        if hashes.shape[0] and ((hashes[1:] <= hashes[:-1]).any()
                                or (last is not None and hashes[0] <= last)):
            raise ValueError(f"{self.path}: {kind} must be appended in increasing bucket-hash "
                             "order without duplicates")
        if hashes.shape[0]:
            self._last_hash[kind] = hashes[-1]
        slots = lay.slots if kind == "rows" else lay.buckets
        self._counts[kind] += np.bincount(bucket_of_hash(hashes, slots), minlength=slots)

    def append_records(self, ids: np.ndarray, records: np.ndarray) -> None:
        """Appends rows as ids and packed records (see :mod:`dynembed.kernels.records`), in
        bucket-hash order after those appended before. The arrays are written from a
        background thread: do not change them until :meth:`commit`."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if records.shape != (ids.shape[0], self.layout.record_words):
            raise ValueError(f"records must have shape ({ids.shape[0]}, "
                             f"{self.layout.record_words}), got {records.shape}")
        self._ordered("rows", ids)
        at = self._done["rows"]
        self._put("ids", at, 8, ids)
        self._put("records", at, 4 * self.layout.record_words, records.astype(np.uint32,
                                                                             copy=False))
        self._done["rows"] += ids.shape[0]

    def append(self, rows: RowBlock) -> None:
        """Appends rows (in bucket-hash order, after those appended before)."""
        self.append_records(rows.ids, records_of(rows.counts, rows.last_step, rows.weights,
                                                 rows.state))

    def append_deleted(self, ids: np.ndarray) -> None:
        """Appends deleted ids (in bucket-hash order, after those appended before)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._ordered("deleted", ids)
        self._put("deleted", self._done["deleted"], 8, ids)
        self._done["deleted"] += ids.shape[0]

    def commit(self) -> int:
        """Writes offsets, checksums and header, syncs and closes; returns the file's bytes.

        Raises:
            ValueError: fewer rows or deletions were appended than announced.
        """
        lay = self.layout
        if self._done["rows"] != lay.rows or self._done["deleted"] != lay.deleted:
            raise ValueError(f"{self.path}: {self._done['rows']}/{lay.rows} rows and "
                             f"{self._done['deleted']}/{lay.deleted} deletions were appended")
        crcs = {}
        for section, kind in (("row_offsets", "rows"), ("del_offsets", "deleted")):
            offsets = np.concatenate([[0], np.cumsum(self._counts[kind])]).astype(np.int64)
            self._put(section, 0, 8, offsets)
            crcs[section] = _crcs_of(offsets.view(np.uint8), lay.block)
        crcs.update({name: c.finish() for name, c in self._checksums.items()})
        crcs = np.concatenate([crcs[s] for s in DATA]).astype(np.uint32)
        self._put("crcs", 0, 4, crcs)
        crcs_crc = int(crc.crc32(crcs.view(np.uint8), 0, crcs.nbytes, crc.TABLES))
        self._drain()
        os.pwrite(self._fd, lay.header(crcs_crc), 0)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return lay.file_bytes

    def _drain(self) -> None:
        try:
            while self._writes:
                self._writes.popleft().result()
        finally:
            self._io.shutdown(wait=True)

    def abort(self) -> None:
        """Closes and removes the unfinished file."""
        if self._fd >= 0:
            self._writes.clear()
            self._io.shutdown(wait=True)
            os.close(self._fd)
            self._fd = -1
        if os.path.exists(self.path):
            os.unlink(self.path)


@nb.njit(cache=True, nogil=True)
def _checked_offset(offsets, off_bytes, off_check, i, block, tables):
    """offsets[i] after checking its block; -1 - block if the block is bad."""
    b = (i * 8) // block
    if not crc.verify_block(off_bytes, block, off_check, b, tables):
        return -1 - b
    return offsets[i]


@nb.njit(cache=True, nogil=True)
def _search(ids_col, id_bytes, id_check, offsets, off_bytes, off_check, shift, queries,
            block, tables, out):
    """Position of each query id in a hash-sorted ids column (-1 if absent), checking every
    block the search reads: its index slot's offsets, then the ids it compares.

    Returns:
        -1 if all went well; 2 * block for a bad ids block, 2 * block + 1 for a bad offsets
        block; -2 for offsets out of range.
    """
    n = ids_col.shape[0]
    for q in range(queries.shape[0]):
        key = queries[q]
        h = hash_of_id(key)
        slot = 0 if shift >= 64 else np.int64(h >> np.uint64(shift))
        lo = _checked_offset(offsets, off_bytes, off_check, slot, block, tables)
        end = _checked_offset(offsets, off_bytes, off_check, slot + 1, block, tables)
        if lo < 0:
            return 2 * (-1 - lo) + 1
        if end < 0:
            return 2 * (-1 - end) + 1
        if lo > end or end > n:
            return -2
        hi = end
        while lo < hi:
            mid = (lo + hi) // 2
            if not crc.verify_block(id_bytes, block, id_check, (mid * 8) // block, tables):
                return 2 * ((mid * 8) // block)
            if hash_of_id(ids_col[mid]) < h:
                lo = mid + 1
            else:
                hi = mid
        out[q] = -1
        if lo < end:
            if not crc.verify_block(id_bytes, block, id_check, (lo * 8) // block, tables):
                return 2 * ((lo * 8) // block)
            if ids_col[lo] == key:
                out[q] = lo
    return -1


class RowsFile:
    """A rows file opened for reading: memory-mapped, checked as it is read.

    Opening reads the header and the file's index (checksums and row offsets, about 0.15%
    of the rows' bytes) sequentially into memory; rows are read as they are needed. Lookups read through a memory map marked for random access (a page
    fault reads that page, not megabytes around it); bulk reads use ``pread`` instead, so
    they stream with the kernel's readahead.

    Args:
        path: the file.

    Raises:
        CheckpointCorruptError: missing, truncated, or a bad header or offsets.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(HEADER_BYTES)
                self.layout = self._parse(head, size)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._fd = os.dup(f.fileno())
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path}: the file is missing", path=path) from None
        if hasattr(mmap, "MADV_RANDOM"):
            self._map.madvise(mmap.MADV_RANDOM)
        lay = self.layout
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._slices = lay.crc_slices()
        # The index of the file is read into memory now, sequentially: the checksum table
        # (4 bytes per 4 KiB of rows) and the row offsets (8 bytes per 256 rows), a few MiB
        # for gigabytes of rows, so a lookup then faults in two pages (ids, record).
        crc_bytes = self._pread("crcs")
        if int(crc.crc32(crc_bytes, 0, crc_bytes.shape[0], crc.TABLES)) != self._crcs_crc:
            self._corrupt("crcs", "its checksum does not match")
        self._crcs = crc_bytes.view(np.uint32)
        self._check = {
            s: (self._crcs[self._slices[s]],
                np.zeros(self._slices[s].stop - self._slices[s].start, np.uint8))
            for s in DATA}
        self._verified = {s: check[1] for s, check in self._check.items()}
        self._index_bytes = {name: self._read(name, 0, lay.offsets[name][1])
                             for name in ("row_offsets", "del_offsets")}
        self._row_offsets = self._index_bytes["row_offsets"].view(np.int64)
        self._del_offsets = self._index_bytes["del_offsets"].view(np.int64)
        for name, total in (("row_offsets", lay.rows), ("del_offsets", lay.deleted)):
            offsets = self._index_bytes[name].view(np.int64)
            if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
                self._corrupt(name, "the offsets are not increasing from 0 to the count")
        self.ids = self._column("ids", np.int64)
        self.records = self._column("records", np.uint32, lay.record_words)
        self.deleted_ids = self._column("deleted", np.int64)
        self._per_bucket = lay.slots // lay.buckets

    def _parse(self, head: bytes, size: int) -> Layout:
        if len(head) < HEADER_BYTES:
            self._corrupt("header", f"the file has {size} bytes, too short for a header")
        magic, version, block, dim, width, buckets, slots, rows, deleted = \
            _HEAD.unpack_from(head)
        if magic != MAGIC:
            self._corrupt("header", f"bad magic {magic!r} (expected {MAGIC!r}); not a "
                          "dynembed rows file")
        body = HEADER_BYTES - _TAIL.size
        self._crcs_crc, head_crc = _TAIL.unpack_from(head, body)
        if int(crc.crc32(np.frombuffer(head, np.uint8), 0, body, crc.TABLES)) != head_crc:
            self._corrupt("header", "its checksum does not match")
        if version != VERSION:
            self._corrupt("header", f"format version {version} is not supported (this "
                          f"dynembed reads version {VERSION}); upgrade dynembed")
        if buckets < 1 or buckets & (buckets - 1) or slots < buckets or slots & (slots - 1):
            self._corrupt("header", f"bad bucket or index counts {buckets}, {slots}")
        lay = Layout.plan(block, dim, width, buckets, rows, deleted, slots)
        stored = [_SECTION.unpack_from(head, _HEAD.size + i * _SECTION.size)
                  for i in range(len(SECTIONS))]
        if stored != [lay.offsets[s] for s in SECTIONS]:
            self._corrupt("header", "the section table does not match the counts")
        if size != lay.file_bytes:
            self._corrupt("size", f"the file has {size} bytes, expected {lay.file_bytes} "
                          "(truncated or extended)")
        return lay

    def _corrupt(self, part: str, why: str):
        """Raises the damage found, remembered beside the file first (see
        :func:`~dynembed.checkpoint.manifest.mark_damaged`)."""
        message = f"{part}: {why}"
        mark_damaged(self.path, message)
        raise CheckpointCorruptError(f"{self.path}: {message}; the checkpoint file is "
                                     "damaged, load an earlier checkpoint", path=self.path)

    def _column(self, name: str, dtype, width: int = 0) -> np.ndarray:
        off, nbytes = self.layout.offsets[name]
        array = self._bytes[off:off + nbytes].view(dtype)
        return array.reshape(-1, width) if width else array

    def _section_bytes(self, name: str) -> np.ndarray:
        off, nbytes = self.layout.offsets[name]
        return self._bytes[off:off + nbytes]

    def _read(self, name: str, start: int, end: int) -> np.ndarray:
        """Bytes [start, end) of a section read with ``pread`` (sequential, with the
        kernel's readahead) and checked block by block; a new array."""
        block = self.layout.block
        section, size = self.layout.offsets[name]
        if end <= start:
            return np.empty(0, np.uint8)
        first, last = start // block, (end - 1) // block
        lo, hi = first * block, min((last + 1) * block, size)
        buf = np.empty(hi - lo, np.uint8)
        view, at = memoryview(buf), section + lo
        while view:
            got = os.preadv(self._fd, [view], at)
            if got == 0:
                self._corrupt(name, "the file ends early")
            view, at = view[got:], at + got
        if not self._verified[name][first:last + 1].all():
            crcs = self._crcs[self._slices[name]][first:last + 1]
            bad = np.flatnonzero(crc.block_crcs_serial(buf, block, crc.TABLES) != crcs)
            if bad.shape[0]:
                self._corrupt(name, f"block {first + int(bad[0])} fails its checksum")
            self._verified[name][first:last + 1] = 1
        return buf[start - lo:end - lo]

    def _pread(self, name: str) -> np.ndarray:
        """A whole section read into memory (unchecked: the caller checks it)."""
        section, size = self.layout.offsets[name]
        buf = np.empty(size, np.uint8)
        view, at = memoryview(buf), section
        while view:
            got = os.preadv(self._fd, [view], at)
            if got == 0:
                self._corrupt(name, "the file ends early")
            view, at = view[got:], at + got
        return buf

    def _check_span(self, name: str, start: int, end: int) -> None:
        """Checks the blocks of bytes [start, end) of a section (reading them if needed)."""
        if end - start >= 1 << 20:  # bulk: sequential reads, not page faults
            for at in range(start, end, 64 << 20):
                self._read(name, at, min(end, at + (64 << 20)))
            return
        bad = crc.verify_span(self._section_bytes(name), self.layout.block, self._check[name],
                              start, end, crc.TABLES)
        if bad >= 0:
            self._corrupt(name, f"block {bad} fails its checksum")

    def close(self) -> None:
        """Releases the file descriptor (the mapping goes with the last array using it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    # ------------------------------------------------------------------ reading
    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def state_width(self) -> int:
        return self.layout.width

    @property
    def num_buckets(self) -> int:
        return self.layout.buckets

    @property
    def rows(self) -> int:
        return self.layout.rows

    @property
    def deleted(self) -> int:
        return self.layout.deleted

    def _offset(self, name: str, i: int) -> int:
        """Checked entry ``i`` of an offsets section."""
        self._check_span(name, 8 * i, 8 * i + 8)
        value = int((self._row_offsets if name == "row_offsets" else self._del_offsets)[i])
        if not 0 <= value <= (self.rows if name == "row_offsets" else self.deleted):
            self._corrupt(name, f"offset {i} is out of range")
        return value

    def row_range(self, first_bucket: int, stop_bucket: int) -> tuple[int, int]:
        """[start, stop) positions of the rows of buckets [first_bucket, stop_bucket)."""
        return (self._offset("row_offsets", first_bucket * self._per_bucket),
                self._offset("row_offsets", stop_bucket * self._per_bucket))

    def deleted_range(self, first_bucket: int, stop_bucket: int) -> tuple[int, int]:
        """[start, stop) positions of the deletions of buckets [first_bucket, stop_bucket)."""
        return (self._offset("del_offsets", first_bucket),
                self._offset("del_offsets", stop_bucket))

    def _block(self, ids: np.ndarray, records: np.ndarray) -> RowBlock:
        counts, last, weights, state = columns_of(records, self.layout.dim)
        return RowBlock(ids, weights, state, counts, last)

    def read_records(self, start: int, stop: int, *,
                     ids_only: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked copies of the ids and packed records of rows [start, stop), read
        sequentially; ``ids_only`` reads no records (None).

        Raises:
            CheckpointCorruptError: a block they lie in fails its checksum.
        """
        ids = self._read("ids", 8 * start, 8 * stop).view(np.int64)
        if ids_only:
            return ids, None
        record = 4 * self.layout.record_words
        records = self._read("records", start * record, stop * record).view(np.uint32)
        return ids, records.reshape(stop - start, self.layout.record_words)

    def read_rows(self, start: int, stop: int) -> RowBlock:
        """Checked copies of rows [start, stop).

        Raises:
            CheckpointCorruptError: a block they lie in fails its checksum.
        """
        return self._block(*self.read_records(start, stop))

    def read_deleted(self, start: int, stop: int) -> np.ndarray:
        """Checked copies of deleted ids [start, stop)."""
        return self._read("deleted", 8 * start, 8 * stop).view(np.int64)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 position of each id's row, -1 where the file has none.

        Raises:
            CheckpointCorruptError: a block the search reads fails its checksum.
        """
        return self._search("ids", "row_offsets", self.ids, self._row_offsets, ids)

    def find_deleted(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool, whether the file lists each id as deleted."""
        return self._search("deleted", "del_offsets", self.deleted_ids, self._del_offsets,
                            ids) >= 0

    def _search(self, name: str, offsets_name: str, column: np.ndarray, offsets: np.ndarray,
                ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.full(ids.shape[0], -1, dtype=np.int64)
        if column.shape[0] == 0 or ids.shape[0] == 0:
            return out
        shift = 64 - (offsets.shape[0] - 1).bit_length() + 1
        bad = _search(column, self._section_bytes(name), self._check[name], offsets,
                      self._index_bytes[offsets_name], self._check[offsets_name], shift,
                      ids, self.layout.block, crc.TABLES, out)
        if bad == -2:
            self._corrupt(offsets_name, "an offset is out of range")
        if bad >= 0:
            where = name if bad % 2 == 0 else offsets_name
            self._corrupt(where, f"block {bad // 2} fails its checksum")
        return out

    def take(self, positions: np.ndarray) -> RowBlock:
        """Checked copies of the rows at ``positions`` (found by :meth:`find`)."""
        bad = crc.verify_rows(self._section_bytes("records"), self.layout.block,
                              self._check["records"], positions,
                              4 * self.layout.record_words, crc.TABLES)
        if bad >= 0:
            self._corrupt("records", f"block {bad} fails its checksum")
        return self._block(self.ids[positions], self.records[positions])

    def verify_buckets(self, first: int, stop: int) -> None:
        """Checks every block holding rows or deletions of buckets [first, stop).

        Raises:
            CheckpointCorruptError: a block fails its checksum.
        """
        start, end = self.row_range(first, stop)
        self._check_span("ids", start * 8, end * 8)
        record = 4 * self.layout.record_words
        self._check_span("records", start * record, end * record)
        lo, hi = self.deleted_range(first, stop)
        self._check_span("deleted", 8 * lo, 8 * hi)

    def verify(self) -> None:
        """Checks every block of the file.

        Raises:
            CheckpointCorruptError: a block fails its checksum.
        """
        for name in DATA:
            self._check_span(name, 0, self.layout.offsets[name][1])


def hash_order(ids: np.ndarray) -> np.ndarray:
    """Positions that sort ``ids`` in bucket-hash order (the order rows files use)."""
    return np.argsort(bucket_hash(ids), kind="stable")
