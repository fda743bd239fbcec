"""The rows file: one table shard's rows (or a delta's changed rows and deletions) on disk.

Rows are sorted by bucket hash (:mod:`dynembed.keys.buckets`) and stored column by column,
each section starting on a block boundary, so a reader memory-maps the file and finds an id
by binary search inside its bucket without reading anything else::

    offset 0      header (one block): magic b"DYNEMBRW", version, block size, dim, state
                  width, buckets, rows, deletions, (offset, bytes) of every section,
                  the CRC of the checksum section, the CRC of the header itself
    sections      row_offsets (buckets + 1) int64   rows of bucket b: [off[b], off[b + 1])
                  ids         (rows,) int64
                  weights     (rows, dim) float32
                  state       (rows, state width) float32
                  counts      (rows,) int64
                  last_step   (rows,) int64
                  del_offsets (buckets + 1) int64   deletions of bucket b
                  deleted     (deletions,) int64    ids deleted (delta files only)
                  crcs        uint32 CRC-32 of every block of every section above, in order

Every byte a reader uses is checked: the header and the offsets when the file opens, other
blocks the first time they are read (a lookup checks the blocks its binary search touches).
A truncated or damaged file raises :class:`CheckpointCorruptError` naming the file and the
section; nothing unverified is ever returned.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numba as nb
import numpy as np

from dynembed.errors import CheckpointCorruptError
from dynembed.kernels import crc
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
SECTIONS = ("row_offsets", "ids", "weights", "state", "counts", "last_step",
            "del_offsets", "deleted", "crcs")
_HEAD = struct.Struct("<8sIIIIIIQQ")  # magic, version, block, dim, width, buckets, 0, rows, del
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
    rows: int
    deleted: int
    offsets: dict[str, tuple[int, int]]  # section -> (offset, bytes)

    @staticmethod
    def plan(block: int, dim: int, width: int, buckets: int, rows: int,
             deleted: int) -> Layout:
        sizes = {"row_offsets": 8 * (buckets + 1), "ids": 8 * rows, "weights": 4 * dim * rows,
                 "state": 4 * width * rows, "counts": 8 * rows, "last_step": 8 * rows,
                 "del_offsets": 8 * (buckets + 1), "deleted": 8 * deleted}
        offsets, at = {}, block
        for name in SECTIONS[:-1]:
            offsets[name] = (at, sizes[name])
            at = _align(at + sizes[name], block)
        crcs = sum(-(-size // block) for size in sizes.values())
        offsets["crcs"] = (at, 4 * crcs)
        return Layout(block, dim, width, buckets, rows, deleted, offsets)

    @property
    def file_bytes(self) -> int:
        offset, size = self.offsets["crcs"]
        return offset + size

    def crc_slices(self) -> dict[str, slice]:
        """Which entries of the crcs section belong to each data section."""
        out, at = {}, 0
        for name in SECTIONS[:-1]:
            n = -(-self.offsets[name][1] // self.block)
            out[name] = slice(at, at + n)
            at += n
        return out

    def header(self, crcs_crc: int) -> bytes:
        head = _HEAD.pack(MAGIC, VERSION, self.block, self.dim, self.width, self.buckets, 0,
                          self.rows, self.deleted)
        head += b"".join(_SECTION.pack(*self.offsets[name]) for name in SECTIONS)
        head_crc = crc.crc32(np.frombuffer(head, np.uint8), 0, len(head), crc.TABLES)
        return head + _TAIL.pack(crcs_crc, int(head_crc))


class RowsFileWriter:
    """Writes one rows file in a single pass; rows arrive in chunks, in bucket-hash order.

    The number of rows and deletions is fixed up front, so every column is written straight
    to its final place and memory holds one chunk at a time. ``commit`` adds the offsets and
    checksums, then the header, and syncs the file.

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
        self._rows_done = 0
        self._deleted_done = 0
        self._row_counts = np.zeros(num_buckets, dtype=np.int64)
        self._del_counts = np.zeros(num_buckets, dtype=np.int64)
        self._last_hash = {"rows": None, "deleted": None}

    def _put(self, section: str, index: int, item_bytes: int, array: np.ndarray) -> None:
        offset = self.layout.offsets[section][0] + index * item_bytes
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def _ordered(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """Hashes of ids, checked to continue the strictly increasing hash order."""
        hashes = bucket_hash(ids)
        last = self._last_hash[kind]
        if hashes.shape[0] and ((hashes[1:] <= hashes[:-1]).any()
                                or (last is not None and hashes[0] <= last)):
            raise ValueError(f"{self.path}: {kind} must be appended in increasing bucket-hash "
                             "order without duplicates")
        if hashes.shape[0]:
            self._last_hash[kind] = hashes[-1]
        return hashes

    def append(self, rows: RowBlock) -> None:
        """Appends rows (in bucket-hash order, after those appended before)."""
        n, at, lay = len(rows), self._rows_done, self.layout
        if at + n > lay.rows:
            raise ValueError(f"{self.path}: more rows than the {lay.rows} announced")
        hashes = self._ordered("rows", rows.ids)
        self._row_counts += np.bincount(bucket_of_hash(hashes, lay.buckets),
                                        minlength=lay.buckets)
        self._put("ids", at, 8, rows.ids.astype(np.int64, copy=False))
        self._put("weights", at, 4 * lay.dim, rows.weights.astype(np.float32, copy=False))
        if lay.width:
            self._put("state", at, 4 * lay.width, rows.state.astype(np.float32, copy=False))
        self._put("counts", at, 8, rows.counts.astype(np.int64, copy=False))
        self._put("last_step", at, 8, rows.last_step.astype(np.int64, copy=False))
        self._rows_done += n

    def append_deleted(self, ids: np.ndarray) -> None:
        """Appends deleted ids (in bucket-hash order, after those appended before)."""
        at, lay = self._deleted_done, self.layout
        if at + ids.shape[0] > lay.deleted:
            raise ValueError(f"{self.path}: more deletions than the {lay.deleted} announced")
        hashes = self._ordered("deleted", ids)
        self._del_counts += np.bincount(bucket_of_hash(hashes, lay.buckets),
                                        minlength=lay.buckets)
        self._put("deleted", at, 8, ids.astype(np.int64, copy=False))
        self._deleted_done += ids.shape[0]

    def commit(self) -> int:
        """Writes offsets, checksums and header, syncs and closes; returns the file's bytes.

        Raises:
            ValueError: fewer rows or deletions were appended than announced.
        """
        lay = self.layout
        if self._rows_done != lay.rows or self._deleted_done != lay.deleted:
            raise ValueError(f"{self.path}: {self._rows_done}/{lay.rows} rows and "
                             f"{self._deleted_done}/{lay.deleted} deletions were appended")
        for section, counts in (("row_offsets", self._row_counts),
                                ("del_offsets", self._del_counts)):
            self._put(section, 0, 8, np.concatenate([[0], np.cumsum(counts)]))
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            data = np.frombuffer(m, dtype=np.uint8)
            parts = [crc.block_crcs(data[off:off + size], lay.block, crc.TABLES)
                     for off, size in (lay.offsets[s] for s in SECTIONS[:-1])]
            crcs = np.concatenate(parts).astype(np.uint32)
            del data
        self._put("crcs", 0, 4, crcs)
        crcs_crc = int(crc.crc32(crcs.view(np.uint8), 0, crcs.nbytes, crc.TABLES))
        os.pwrite(self._fd, lay.header(crcs_crc), 0)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return lay.file_bytes

    def abort(self) -> None:
        """Closes and removes the unfinished file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if os.path.exists(self.path):
            os.unlink(self.path)


@nb.njit(cache=True)
def _search(ids_col, id_bytes, offsets, shift, queries, block, crcs, verified, tables, out):
    """Position of each query id in a hash-sorted ids column (-1 if absent), checking every
    block the search reads. Returns the first bad block of the ids section, or -1."""
    for q in range(queries.shape[0]):
        key = queries[q]
        h = hash_of_id(key)
        b = 0 if shift >= 64 else np.int64(h >> np.uint64(shift))
        lo, hi = offsets[b], offsets[b + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if not crc.verify_block(id_bytes, block, crcs, verified, (mid * 8) // block, tables):
                return (mid * 8) // block
            if hash_of_id(ids_col[mid]) < h:
                lo = mid + 1
            else:
                hi = mid
        out[q] = -1
        if lo < offsets[b + 1]:
            if not crc.verify_block(id_bytes, block, crcs, verified, (lo * 8) // block, tables):
                return (lo * 8) // block
            if ids_col[lo] == key:
                out[q] = lo
    return -1


class RowsFile:
    """A rows file opened for reading: memory-mapped, checked as it is read.

    Opening reads only the header and the bucket offsets, so it takes the same time for any
    number of rows.

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
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path}: the file is missing") from None
        self.layout = self._parse(head, size)
        lay = self.layout
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._slices = lay.crc_slices()
        off, nbytes = lay.offsets["crcs"]
        self._crcs = self._bytes[off:off + nbytes].view(np.uint32)
        if int(crc.crc32(self._crcs.view(np.uint8), 0, nbytes, crc.TABLES)) != self._crcs_crc:
            self._corrupt("crcs", "its checksum does not match")
        self._verified = {s: np.zeros(self._slices[s].stop - self._slices[s].start, np.uint8)
                          for s in SECTIONS[:-1]}
        self.row_offsets = self._column("row_offsets", np.int64)
        self.del_offsets = self._column("del_offsets", np.int64)
        for name in ("row_offsets", "del_offsets"):
            self._check_span(name, 0, lay.offsets[name][1])
            offsets = getattr(self, name)
            total = lay.rows if name == "row_offsets" else lay.deleted
            if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
                self._corrupt(name, "the offsets are not increasing from 0 to the count")
        self.ids = self._column("ids", np.int64)
        self.deleted_ids = self._column("deleted", np.int64)
        self._shift = 64 - (lay.buckets.bit_length() - 1)

    def _parse(self, head: bytes, size: int) -> Layout:
        if len(head) < HEADER_BYTES:
            self._corrupt("header", f"the file has {size} bytes, too short for a header")
        magic, version, block, dim, width, buckets, _, rows, deleted = _HEAD.unpack_from(head)
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
        lay = Layout.plan(block, dim, width, buckets, rows, deleted)
        stored = [_SECTION.unpack_from(head, _HEAD.size + i * _SECTION.size)
                  for i in range(len(SECTIONS))]
        if stored != [lay.offsets[s] for s in SECTIONS]:
            self._corrupt("header", "the section table does not match the counts")
        if size != lay.file_bytes:
            self._corrupt("size", f"the file has {size} bytes, expected {lay.file_bytes} "
                          "(truncated or extended)")
        return lay

    def _corrupt(self, part: str, why: str):
        raise CheckpointCorruptError(f"{self.path}: {part}: {why}; the checkpoint file is "
                                     "damaged, load an earlier checkpoint")

    def _column(self, name: str, dtype, width: int = 0) -> np.ndarray:
        off, nbytes = self.layout.offsets[name]
        array = self._bytes[off:off + nbytes].view(dtype)
        return array.reshape(-1, width) if width else array

    def _section_bytes(self, name: str) -> np.ndarray:
        off, nbytes = self.layout.offsets[name]
        return self._bytes[off:off + nbytes]

    def _check_span(self, name: str, start: int, end: int) -> None:
        bad = crc.verify_span(self._section_bytes(name), self.layout.block,
                              self._crcs[self._slices[name]], self._verified[name], start, end,
                              crc.TABLES)
        if bad >= 0:
            self._corrupt(name, f"block {bad} fails its checksum")

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

    def row_range(self, first_bucket: int, stop_bucket: int) -> tuple[int, int]:
        """[start, stop) positions of the rows of buckets [first_bucket, stop_bucket)."""
        return int(self.row_offsets[first_bucket]), int(self.row_offsets[stop_bucket])

    def _row_columns(self):
        lay = self.layout
        return (("ids", 8, np.int64, 0), ("weights", 4 * lay.dim, np.float32, lay.dim),
                ("state", 4 * lay.width, np.float32, lay.width),
                ("counts", 8, np.int64, 0), ("last_step", 8, np.int64, 0))

    def read_rows(self, start: int, stop: int) -> RowBlock:
        """Copies of rows [start, stop), checked.

        Raises:
            CheckpointCorruptError: a block they lie in fails its checksum.
        """
        out = []
        for name, item, dtype, width in self._row_columns():
            if item == 0:  # no optimizer state
                out.append(np.empty((stop - start, 0), np.float32))
                continue
            self._check_span(name, start * item, stop * item)
            out.append(np.array(self._column(name, dtype, width)[start:stop]))
        return RowBlock(*out)

    def read_ids(self, start: int, stop: int) -> RowBlock:
        """Rows [start, stop) with only their ids filled in (other columns empty), checked."""
        self._check_span("ids", start * 8, stop * 8)
        n = stop - start
        return RowBlock(np.array(self.ids[start:stop]), np.empty((n, 0), np.float32),
                        np.empty((n, 0), np.float32), np.empty(n, np.int64),
                        np.empty(n, np.int64))

    def read_deleted(self, start: int, stop: int) -> np.ndarray:
        """Copies of deleted ids [start, stop), checked."""
        self._check_span("deleted", start * 8, stop * 8)
        return np.array(self.deleted_ids[start:stop])

    def find(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 position of each id's row, -1 where the file has none.

        Raises:
            CheckpointCorruptError: a block the search reads fails its checksum.
        """
        return self._search("ids", self.ids, self.row_offsets, ids)

    def find_deleted(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool, whether the file lists each id as deleted."""
        return self._search("deleted", self.deleted_ids, self.del_offsets, ids) >= 0

    def _search(self, name: str, column: np.ndarray, offsets: np.ndarray,
                ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.full(ids.shape[0], -1, dtype=np.int64)
        if column.shape[0] == 0 or ids.shape[0] == 0:
            return out
        bad = _search(column, self._section_bytes(name), offsets, self._shift, ids,
                      self.layout.block, self._crcs[self._slices[name]], self._verified[name],
                      crc.TABLES, out)
        if bad >= 0:
            self._corrupt(name, f"block {bad} fails its checksum")
        return out

    def take(self, positions: np.ndarray) -> RowBlock:
        """Copies of the rows at ``positions`` (found by :meth:`find`), checked."""
        out = []
        for name, item, dtype, width in self._row_columns():
            if item == 0:
                out.append(np.empty((positions.shape[0], 0), np.float32))
                continue
            bad = crc.verify_rows(self._section_bytes(name), self.layout.block,
                                  self._crcs[self._slices[name]], self._verified[name],
                                  positions, item, crc.TABLES)
            if bad >= 0:
                self._corrupt(name, f"block {bad} fails its checksum")
            out.append(self._column(name, dtype, width)[positions])
        return RowBlock(*out)

    def verify_buckets(self, first: int, stop: int) -> None:
        """Checks every block holding rows or deletions of buckets [first, stop).

        Raises:
            CheckpointCorruptError: a block fails its checksum.
        """
        start, end = self.row_range(first, stop)
        for name, item, _, _ in self._row_columns():
            self._check_span(name, start * item, end * item)
        self._check_span("deleted", 8 * int(self.del_offsets[first]),
                         8 * int(self.del_offsets[stop]))

    def verify(self) -> None:
        """Checks every block of the file.

        Raises:
            CheckpointCorruptError: a block fails its checksum.
        """
        for name in SECTIONS[:-1]:
            self._check_span(name, 0, self.layout.offsets[name][1])


def hash_order(ids: np.ndarray) -> np.ndarray:
    """Positions that sort ``ids`` in bucket-hash order (the order rows files use)."""
    return np.argsort(bucket_hash(ids), kind="stable")
