"""RocksDBStore: rows in an embedded RocksDB directory (the default storage tier).

Uses the rocksdict package in raw mode (bytes keys and values, no pickling). A batch put or
delete is one RocksDB WriteBatch, applied atomically and logged to the write-ahead log before
it returns, so a process killed at any moment reopens with every completed batch intact;
:meth:`flush` also syncs the log to disk, which survives a machine crash. The description
and clock records live under keys of other lengths than a row's 8 bytes.

A write that fails on an I/O error (a full disk, a file system gone read-only) leaves
RocksDB refusing every later write with the same error until the database is reopened
(rocksdict has no ``Resume``), even once the cause is fixed. The store therefore reopens
the directory at the next write after such a failure: the batches written before it are
in the log and come back, the failed one was never applied (a torn log record is dropped
at recovery), and reads go on meanwhile.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from itertools import islice

import numpy as np
import rocksdict

from dynembed.errors import (
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
)
from dynembed.storage.base import EmbeddingStore
from dynembed.storage.rows import decode_ids, encode_ids

_META_KEY = b"dynembed:meta"  # not 8 bytes long, so never a row's key
_CLOCK_KEY = b"dynembed:clock"  # nor this
_ROW_KEY_BYTES = 8


def _translate(name: str, action: str, exc: Exception) -> StoreError:
    text = str(exc)
    # RocksDB's own words: "While lock file: <dir>/LOCK: ..." (a bare "lock" would also
    # match "block checksum mismatch", which is corruption).
    if "lock file" in text or "/LOCK" in text:
        return StoreLockedError(
            f"{name}: cannot {action}: the directory is locked by another process or another "
            f"open store in this one ({text}); close the other user or pick another path")
    if "No space left" in text or "ENOSPC" in text:
        return StoreFullError(f"{name}: cannot {action}: the disk is full ({text}); free "
                              "space or move the store to a larger volume")
    if text.startswith("Corruption") or "Corruption:" in text:
        return StoreCorruptError(
            f"{name}: cannot {action}: RocksDB found damaged files ({text}); restore the "
            "directory from a backup, or load the table's last checkpoint over a new store")
    return StoreError(f"{name}: cannot {action}: {text}")


_ROCKSDB_FILES = ("LOCK", "LOG", "IDENTITY", "CURRENT", "rocksdict-config.json")
_ROCKSDB_PREFIXES = ("LOG.old.", "MANIFEST-", "OPTIONS-")
_ROCKSDB_SUFFIXES = (".log", ".sst", ".blob", ".dbtmp")
_MOUNT_ENTRIES = ("lost+found",)


def _foreign_files(path: str) -> list[str]:
    """Entries of an existing directory without a database that RocksDB did not make (a
    checkpoint or data directory given as the store's by mistake); empty if it has one."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "CURRENT")):
        return []
    return sorted(name for name in os.listdir(path)
                  if name not in _ROCKSDB_FILES and not name.startswith(_ROCKSDB_PREFIXES)
                  and not name.endswith(_ROCKSDB_SUFFIXES)
                  # a mounted volume's root (ext4's lost+found, NFS's .snapshot) is fine
                  and name not in _MOUNT_ENTRIES and not name.startswith("."))


def rocksdb_options(*, create: bool = True, cache_bytes: int = 256 << 20) -> rocksdict.Options:
    """The options a :class:`RocksDBStore` opens its directory with (raw bytes mode).

    Args:
        create: make a new store (the directory too) if there is none; False opens an
            existing store only.
        cache_bytes: block cache size.
    """
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(create)
    options.increase_parallelism(max(1, min(4, os.cpu_count() or 1)))
    # Most misses of a cache over a store are keys the store never saw: Bloom filters
    # (SST files and memtable) answer those without reading blocks (measured on 1M
    # rows: 15 us -> 0.7 us per absent key; present keys 1.6 -> 0.9 us).
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(rocksdict.Cache(cache_bytes))
    table.set_cache_index_and_filter_blocks(True)
    options.set_block_based_table_factory(table)
    # Trained float32 rows do not compress (snappy saved nothing: 304 B on disk for a
    # 292 B record either way) but decompression slowed reads (3.1 -> 2.0 us per key).
    options.set_compression_type(rocksdict.DBCompressionType.none())
    options.set_memtable_prefix_bloom_ratio(0.1)
    options.set_memtable_whole_key_filtering(True)
    return options


class RocksDBStore(EmbeddingStore):
    """Rows in a local RocksDB directory; no server.

    Args:
        path: directory of the database (created if missing). One table per directory; a
            directory is open in one store object of one process at a time, and a store
            object serves the table built over it last (an older one then fails on its
            next store call).
        create: make a new store (the directory too) if there is none; False opens an
            existing store only.
        cache_bytes: RocksDB block cache for reads of rows not in the memtable.
        background_io: let tables write evicted rows on a background thread (rocksdict
            releases the GIL inside RocksDB). Off by default: on 2 cores it measured no
            faster, since training and writer then compete for the cores; try it with more
            cores or longer steps.

    Raises:
        StoreLockedError: another process (or store object) has the directory open.
        StoreError: the directory cannot be opened (not a database, permissions), or holds
            other files and no database.
        TypeError, ValueError: a bad argument (named).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True,
                 cache_bytes: int = 256 << 20, background_io: bool = False) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path (str or os.PathLike), got "
                            f"{type(path).__name__}")
        if not isinstance(os.fspath(path), str) or not os.fspath(path):
            # rocksdict writes its rocksdict-config.json into the current directory for ""
            # before RocksDB refuses it with "While mkdir if missing: No such file"
            raise ValueError(f"path must be a non-empty directory path (str), got {path!r}; "
                             "give the directory the store keeps its files in, e.g. "
                             "'tables/query'")
        for arg, value in (("create", create), ("background_io", background_io)):
            if not isinstance(value, bool):  # "no" would be true
                raise TypeError(f"{arg} must be True or False, got {value!r}")
        self.path = os.fspath(path)
        self.background_io = background_io
        self.name = f"RocksDBStore({self.path!r})"
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StoreError(f"{self.name}: path is a file, not a directory; give a "
                             "directory for the store (RocksDB keeps several files in it)")
        if not create and not os.path.isdir(self.path):
            raise StoreError(f"{self.name}: the directory does not exist; pass create=True "
                             "to make a new store")
        if not create and not os.path.exists(os.path.join(self.path, "CURRENT")):
            # RocksDB said only "CURRENT: does not exist (create_if_missing is false)", after
            # leaving its lock, log and rocksdict's config file in the directory
            raise StoreError(f"{self.name}: the directory holds no store (no RocksDB "
                             "database); pass create=True to make a new store there, or give "
                             "the directory of an existing one")
        foreign = _foreign_files(self.path)
        if foreign:
            raise StoreError(
                f"{self.name}: the directory holds files that are not a RocksDB database's "
                f"(e.g. {foreign[0]!r}) and no database; RocksDB would add its files among "
                "them. Give the store an empty or new directory of its own")
        if isinstance(cache_bytes, (bool, np.bool_)) \
                or not isinstance(cache_bytes, numbers.Integral) or cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be an int > 0 (bytes), got {cache_bytes!r}")
        cache_bytes = int(cache_bytes)  # rocksdict takes Python ints only
        self._options = rocksdb_options(create=create, cache_bytes=cache_bytes)
        self._scans: weakref.WeakSet = weakref.WeakSet()
        self._failed: type[StoreError] | None = None
        """The kind of error of a failed write or flush, until a reopen clears RocksDB's
        failed state (see the module docstring); None while writes work. (Not the error
        itself: its traceback would keep the failed batch alive.)"""
        self._recovering = threading.Lock()  # a background writer and a retry may both try
        try:
            self._db = rocksdict.Rdict(self.path, self._options)
        except Exception as exc:  # rocksdict raises plain Exception with RocksDB's message
            raise _translate(self.name, "open", exc) from exc

    def _write(self, action: str, fill) -> None:
        self._check_open()
        self._recover()
        batch = rocksdict.WriteBatch(raw_mode=True)
        fill(batch)
        try:
            self._db.write(batch)
        except Exception as exc:
            error = _translate(self.name, action, exc)
            self._failed = type(error)
            raise error from exc

    def _recover(self) -> None:
        """Reopens the database after a write or flush failed, so that writes work again
        once the cause is gone (RocksDB keeps failing them until a reopen).

        Raises:
            StoreError: a scan is open (it holds the database), or the reopen failed (e.g.
                the disk is still full); reads then go on from a read-only handle, and the
                next write tries again.
        """
        if self._failed is None:
            return
        with self._recovering:
            if self._failed is not None:
                self._reopen()

    def _reopen(self) -> None:
        """The body of :meth:`_recover`, under its lock."""
        if any(scan.gi_frame is not None for scan in self._scans):
            # closing the scan's snapshot would cut it short, and while it lives the
            # directory stays locked
            raise self._failed(f"{self.name}: cannot recover from the failed write before "
                               "this one: the store reopens its directory for that, but a "
                               "scan of it is still open; finish or close the scan first")
        with contextlib.suppress(Exception):  # it repeats the failed write's error, and closes
            self._db.close()
        try:
            self._db = rocksdict.Rdict(self.path, self._options)
        except Exception as exc:
            error = _translate(self.name, "reopen after a failed write", exc)
            if not isinstance(error, StoreLockedError):  # else the old handle still serves
                with contextlib.suppress(Exception):  # else reads fail too, naming the store
                    self._db = rocksdict.Rdict(
                        self.path, self._options,
                        access_type=rocksdict.AccessType.read_only(False))
            raise error from exc
        self._failed = None

    def _get(self, ids: np.ndarray) -> list:
        self._check_open()
        try:
            return self._db.get(encode_ids(ids))
        except Exception as exc:
            raise _translate(self.name, "read", exc) from exc

    def _put(self, ids: np.ndarray, values: list[bytes]) -> None:
        keys = encode_ids(ids)
        self._write("write", lambda b: deque(map(b.put, keys, values), maxlen=0))

    def _delete(self, ids: np.ndarray) -> None:
        keys = encode_ids(ids)
        self._write("delete", lambda b: deque(map(b.delete, keys), maxlen=0))

    def _scan(self, batch_size: int) -> Iterator[tuple[np.ndarray, list]]:
        self._check_open()
        scan = self._scan_snapshot(batch_size)
        self._scans.add(scan)  # close() ends it: its snapshot would keep the directory open
        return scan

    def _scan_snapshot(self, batch_size: int) -> Iterator[tuple[np.ndarray, list]]:
        snapshot = self._db.snapshot()  # a consistent view while the table keeps writing
        try:
            items = snapshot.items()
            while chunk := list(islice(items, batch_size)):
                keys, values = zip(*chunk)
                if max(map(len, keys)) != _ROW_KEY_BYTES:  # the description record is here
                    chunk = [kv for kv in chunk if len(kv[0]) == _ROW_KEY_BYTES]
                    if not chunk:
                        continue
                    keys, values = zip(*chunk)
                yield decode_ids(list(keys)), list(values)
        finally:
            del snapshot

    def _scan_from(self, cursor, batch_size: int) -> tuple[np.ndarray, list, bytes | None]:
        # a short-lived iterator from the cursor's key on, without a snapshot: a sweep
        # spread over many steps never holds the database (nor old versions of its rows)
        rows, key = [], cursor
        try:
            while True:  # the description records are skipped, not counted
                window = list(islice(self._db.items(from_key=key), batch_size + 1))
                fresh = [kv for kv in window if kv[0] != key]
                rows += [kv for kv in fresh if len(kv[0]) == _ROW_KEY_BYTES]
                if len(window) <= batch_size or not fresh:
                    key = None  # the last key: the pass ends with these rows
                    break
                key = fresh[-1][0]
                if len(rows) >= batch_size:
                    break
        except Exception as exc:
            raise _translate(self.name, "scan", exc) from exc
        if not rows:
            return np.empty(0, dtype=np.int64), [], None
        keys, values = zip(*rows)
        return decode_ids(list(keys)), list(values), key

    def _count(self) -> int:
        self._check_open()
        keys, total = self._db.keys(), 0
        while chunk := list(islice(keys, 1 << 16)):
            total += Counter(map(len, chunk))[_ROW_KEY_BYTES]
        return total

    def _get_record(self, key: bytes) -> bytes | None:
        self._check_open()
        try:
            return self._db.get(key)
        except Exception as exc:
            raise _translate(self.name, "read", exc) from exc

    def _get_meta(self) -> bytes | None:
        return self._get_record(_META_KEY)

    def _put_meta(self, value: bytes) -> None:
        self._write("write", lambda b: b.put(_META_KEY, value))

    def _get_clock(self) -> bytes | None:
        return self._get_record(_CLOCK_KEY)

    def _put_clock(self, value: bytes) -> None:
        # the write-ahead log keeps writes in order and recovery replays a prefix of it, so
        # a clock written after rows never survives a crash without them
        self._write("write", lambda b: b.put(_CLOCK_KEY, value))

    def _delete_clock(self) -> None:
        self._write("write", lambda b: b.delete(_CLOCK_KEY))

    def _flush(self) -> None:
        self._recover()
        try:
            self._db.flush_wal(True)
        except Exception as exc:
            error = _translate(self.name, "flush", exc)
            self._failed = type(error)
            raise error from exc

    def _close(self) -> None:
        for scan in list(self._scans):
            scan.close()
        try:
            self._db.close()
        except Exception as exc:
            # after a failed write, rocksdict closes the handle but raises RocksDB's
            # "Writer has previous error": the error already reported, not a new one
            if self._failed is None:
                raise _translate(self.name, "close", exc) from exc

    def disk_bytes(self) -> int:
        """Bytes of the directory's files (SST, log, manifest) on disk."""
        total = 0
        for entry in os.scandir(self.path):
            if entry.is_file():
                total += entry.stat().st_size
        return total
