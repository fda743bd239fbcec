"""EmbeddingStore: the protocol every storage tier implements.

A store keeps rows (weights, optimizer state, metadata) of one table by id, in the binary
layout of :mod:`dynembed.storage.rows`, plus one description record (layout, dims) and one
clock record (the table's step counters at its last flush, see :meth:`EmbeddingStore.
write_clock`), both kept apart from the rows so that every int64 id is a valid key. The
public verbs take and return :class:`RowBlock` batches; a backend implements a few
byte-level primitives (``_get``, ``_put``, ``_delete``, ``_scan``, ``_count``,
``_get_meta``, ``_put_meta``, ``_get_clock``, ``_put_clock``, ``_delete_clock``,
``_flush``, ``_close``) on ids and encoded records. Each primitive must apply a batch whole
or not at all and raise a :class:`~dynembed.errors.StoreError` naming the store and the
cause.
"""

from __future__ import annotations

import base64
import json
import numbers
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping

import numpy as np
from typing_extensions import Self

from dynembed.errors import StoreCorruptError, StoreError
from dynembed.storage.rows import LAYOUT_VERSION, RowBlock, RowCodec


def _as_ids(ids, arg: str = "ids") -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise ValueError(f"{arg} must be a 1-D int64 array, got shape {ids.shape} and dtype "
                         f"{ids.dtype}; convert keys with table.ids_of(keys).ids")
    return np.ascontiguousarray(ids)


def _as_size(arg: str, value, minimum: int) -> int:
    """``value`` as a Python int: numpy integers count (JSON cannot write them into the
    description record), bools and other numbers do not."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


CLOCK_FIELDS = ("step", "update_step")
"""What a table records of its clock in its store: its training lookups (the clock of the
rows' ``last_step``, which eviction and TTL compare with) and its optimizer steps (Adam's
bias correction, Adagrad's lr decay). The record may also hold the table's initializer
``seed`` (an int in [0, 2**64)), so new keys after a reopen get the rows they would have
got without it, its admission policy's state (``admission``: bytes, stored as base64),
so keys counted before the flush are admitted when they would have been without it, and
how many strings its key log held (``logged_keys``), which the store does not keep."""


def _encode_clock(clock: Mapping) -> bytes:
    """The clock record of a table's ``{"step": s, "update_step": u}``.

    Raises:
        TypeError: ``clock`` is not a mapping.
        ValueError: a field of :data:`CLOCK_FIELDS` is missing or not an int >= 0.
    """
    if not isinstance(clock, Mapping):
        raise TypeError(f"clock must be a mapping of {CLOCK_FIELDS}, got {type(clock).__name__}")
    missing = [name for name in CLOCK_FIELDS if name not in clock]
    if missing:
        raise ValueError(f"clock lacks {missing}; give every one of {CLOCK_FIELDS}")
    record = {name: _as_size(name, clock[name], 0) for name in CLOCK_FIELDS}
    if clock.get("seed") is not None:
        record["seed"] = _as_size("seed", clock["seed"], 0)
        if record["seed"] >= 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {record['seed']}")
    if clock.get("logged_keys") is not None:
        record["logged_keys"] = _as_size("logged_keys", clock["logged_keys"], 0)
    if clock.get("admission") is not None:
        if not isinstance(clock["admission"], bytes):
            raise TypeError(f"clock's admission must be bytes, got "
                            f"{type(clock['admission']).__name__}")
        record["admission"] = base64.b64encode(clock["admission"]).decode()
    return json.dumps(record, sort_keys=True).encode()


def _decode_clock(name: str, raw) -> dict:
    """A clock record read back; a step field it lacks counts as 0, a ``seed`` it lacks is
    left out (records from before stores kept it), a field this version does not know is
    ignored (a later version may record more).

    Raises:
        StoreCorruptError: the record is not a JSON object of ints >= 0.
    """
    try:
        have = json.loads(bytes(raw))
    except ValueError:
        have = None
    clock = {}
    recorded = CLOCK_FIELDS + ((tuple(f for f in ("seed", "logged_keys") if f in have))
                               if isinstance(have, dict) else ())
    for field in recorded:
        value = have.get(field, 0) if isinstance(have, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 \
                or (field == "seed" and value >= 2**64):
            raise StoreCorruptError(
                f"{name}: its clock record is not a dynembed table's (a JSON object of step "
                f"counters, got {bytes(raw)[:80]!r}); the store is corrupted, or another "
                "program wrote it. Remove it with store.drop_clock() to reopen the table "
                "from step 0")
        clock[field] = value
    if isinstance(have, dict) and "admission" in have:
        try:
            clock["admission"] = base64.b64decode(have["admission"], validate=True)
        except (TypeError, ValueError):
            raise StoreCorruptError(f"{name}: its clock record's admission state is not "
                                    "base64; the store is corrupted, or another program "
                                    "wrote it. Remove it with store.drop_clock() to reopen "
                                    "the table from step 0") from None
    return clock


class EmbeddingStore(ABC):
    """Rows of one table kept outside memory (or in a plain dict, for tests and small jobs).

    A table binds its store with :meth:`bind` before use, which checks that rows already in
    the store have the table's dim and optimizer state width.
    """

    name: str = "store"
    """How errors refer to this store (backend and location)."""
    background_io: bool = False
    """Whether a table writes evicted rows on its background thread (write-behind) rather
    than in the lookup that evicts them. Worth it only where the client releases the GIL
    while it works (RocksDB) and a core is free; a client that works in Python (redis-py
    packs every argument in Python) would hold the GIL and stall the training thread.
    Off by default; a store's constructor or attribute turns it on."""

    shared: bool = False
    """Whether processes on several machines may use this very store at once (a Redis
    namespace): the shards of a distributed table then see each other's rows in it, and
    each one scans and clears only the rows of the key buckets it owns."""

    def __init__(self) -> None:
        self.codec: RowCodec | None = None
        self.closed = False
        self._bound: tuple[int, int, dict | None] | None = None
        """The arguments of the last :meth:`bind`."""
        self._bound_meta: bytes | None = None
        """The description record the store had when it was bound."""

    # ------------------------------------------------------------------ protocol
    def bind(self, dim: int, width: int, meaning: dict | None = None) -> None:
        """Fixes the row layout; checks it against what the store already holds.

        Args:
            dim: row width.
            width: optimizer state floats per row.
            meaning: more that rows of the same layout must share to mean the same (a
                table gives its optimizer and string hash seed: Adam's moments read as
                FTRL's state, or keys hashed with another seed, would be silently wrong).

        Raises:
            StoreCorruptError: the store holds rows of another dim, optimizer width or
                meaning.
            ValueError: dim is not an int >= 1, or width not an int >= 0.
        """
        self._check_open()
        dim, width = _as_size("dim", dim, 1), _as_size("width", width, 0)
        want = {"layout": LAYOUT_VERSION, "dim": dim, "width": width, **self._layout(),
                **(meaning or {})}
        meta = self._get_meta()
        if meta is None:  # a new store: describe it, unless another process just did
            # a clock without a description (a Redis server that evicted or lost the latter)
            # describes rows no longer here: a table must not adopt it
            self._delete_clock()
            # the token tells this description from one written again after the store lost
            # its data (see RedisStore), whose layout would be the same
            record = {**want, "incarnation": uuid.uuid4().hex}
            self._put_meta(json.dumps(record).encode())
            meta = self._get_meta()
        try:
            have = json.loads(bytes(meta))
        except ValueError:
            have = None
        if not isinstance(have, dict) or "dim" not in have:
            raise StoreCorruptError(f"{self.name}: its description record is not a dynembed "
                                    "store's (not a JSON object with the row layout); the "
                                    "store is corrupted, or another program wrote it")
        # a record from before a field existed (e.g. Redis shards) leaves it unchecked
        if any(have.get(key, value) != value for key, value in want.items()):
            raise StoreCorruptError(
                f"{self.name} holds rows with {have}, but the table needs {want}; use "
                "another path/namespace or a table (and store options) that match")
        self.codec = RowCodec(dim, width, self.name)
        self._bound, self._bound_meta = (dim, width, meaning), bytes(meta)

    def get(self, ids) -> tuple[np.ndarray, RowBlock]:
        """Reads rows of ids in one batched call.

        Args:
            ids: (n,) int64.

        Returns:
            ((n,) bool found mask, RowBlock of the found rows, in the order of ``ids``).
        """
        ids = _as_ids(ids)
        codec = self._codec()
        if ids.shape[0] == 0:
            return np.zeros(0, bool), RowBlock.concat([], codec.dim, codec.width)
        return codec.decode(ids, self._get(ids))

    def put(self, rows: RowBlock) -> None:
        """Writes rows (insert or overwrite), all or none."""
        codec = self._codec()  # a closed or unbound store refuses even an empty batch
        if len(rows):
            self._put(_as_ids(rows.ids, "rows.ids"), codec.encode(rows))

    def delete(self, ids) -> None:
        """Removes ids (absent ids are ignored), all or none."""
        ids = _as_ids(ids)
        self._check_open()
        if ids.shape[0]:
            self._delete(ids)

    def scan(self, batch_size: int = 65536) -> Iterator[RowBlock]:
        """Every stored row, in blocks of at most ``batch_size`` (order is the backend's)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size <= 0:
            raise ValueError(f"batch_size must be an int > 0, got {batch_size!r}")
        batch_size = int(batch_size)
        codec = self._codec()
        for ids, values in self._scan(batch_size):
            # a backend may answer more at once (Redis's HSCAN COUNT is only a hint)
            for start in range(0, ids.shape[0], batch_size):
                self._check_open()  # closed between two blocks: stop, even mid-answer
                yield codec.decode_present(ids[start:start + batch_size],
                                           values[start:start + batch_size])
        self._check_open()  # a store closed mid-scan ends it with an error, not early

    def scan_from(self, cursor: object | None,
                  batch_size: int = 4096) -> tuple[RowBlock, object | None]:
        """One block of a scan spread over many calls (a table's scheduled sweeps): up to
        ``batch_size`` rows (a backend may answer a few more) after ``cursor``.

        Pass None to start, then each returned cursor; a None cursor ends the pass. Rows
        written or deleted meanwhile may be seen or not, and a row's copy may be older
        than the store's by the time it is returned (read it again before acting on it).
        RocksDB holds nothing open between calls; other backends continue one
        :meth:`scan` held by the cursor, one block ahead, so that the last block comes with
        a None cursor (drop the cursor to end the scan early).

        Returns:
            (rows, cursor).

        Raises:
            ValueError: ``batch_size`` is not an int > 0.
            StoreError: the store failed or was closed.
        """
        _as_size("batch_size", batch_size, 1)
        self._check_open()
        ids, values, cursor = self._scan_from(cursor, int(batch_size))
        return self._codec().decode_present(ids, values), cursor

    def _scan_from(self, cursor, batch_size: int) -> tuple[np.ndarray, list, object | None]:
        """(ids, records, cursor) of :meth:`scan_from`; this default continues one
        :meth:`_scan` generator, which the cursor holds with the block after the one it
        returns (read ahead, so the block that ends the pass comes with a None cursor)."""
        if cursor is None:
            scan = self._scan(batch_size)
            block = next(scan, None)
        else:
            scan, block = cursor
        if block is None:
            return np.empty(0, dtype=np.int64), [], None
        following = next(scan, None)
        return block[0], block[1], None if following is None else (scan, following)

    def size(self) -> int:
        """Rows stored (exact; may cost a scan on some backends, see each backend)."""
        self._check_open()
        return self._count()

    def clear(self) -> None:
        """Removes every row and the clock record (the layout description stays)."""
        self.drop_clock()  # first: rows without a clock are safe, a clock without them not
        for block in self.scan():
            self.delete(block.ids)

    def read_clock(self) -> dict | None:
        """The clock the table recorded with :meth:`write_clock` at its last flush.

        Returns:
            ``{"step": s, "update_step": u}`` plus ``"seed"`` and ``"admission"`` (bytes) if
            they were recorded, or None if the store holds no clock record (a new store, one emptied since, or one written
            before stores kept a clock).

        Raises:
            StoreCorruptError: the record is not a clock record.
        """
        self._check_open()
        raw = self._get_clock()
        return None if raw is None else _decode_clock(self.name, raw)

    def write_clock(self, clock: Mapping) -> None:
        """Records the clock of the table whose rows the store holds (one small record,
        overwritten). Call it after the rows it describes are written, never before: a
        process that dies between the two then leaves a clock behind the rows, which a
        reopened table treats as recent (kept longer, never expired early), never one ahead
        of them.

        Args:
            clock: ``{"step": s, "update_step": u}``, ints >= 0, and optionally ``"seed"``,
                an int in [0, 2**64), and ``"admission"``, bytes (None: not recorded).

        Raises:
            ValueError, TypeError: ``clock`` lacks a field or holds a bad value.
            StoreError: the store is closed, unbound, or failed.
        """
        self._codec()  # a closed or unbound store refuses it, as a put
        self._put_clock(_encode_clock(clock))

    def drop_clock(self) -> None:
        """Removes the clock record (absent is fine): for a table about to replace the rows
        with an older state (a checkpoint), whose clock then goes back."""
        self._check_open()
        self._delete_clock()

    def flush(self) -> None:
        """Makes every write so far durable as far as the backend allows."""
        self._check_open()
        self._flush()

    def close(self) -> None:
        """Flushes and releases the backend (idempotent)."""
        if not self.closed:
            try:
                self._flush()
            finally:
                self.closed = True
                self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self.closed:
            raise StoreError(f"{self.name} is closed; open a new store object")

    def _codec(self) -> RowCodec:
        self._check_open()
        if self.codec is None:
            raise StoreError(f"{self.name} is not bound to a table; pass it as store= to a "
                             "table, or call bind(dim, width) first")
        return self.codec

    def _layout(self) -> dict:
        """Backend options that decide where rows live, recorded and checked by bind."""
        return {}

    # ------------------------------------------------------------------ backend primitives
    @abstractmethod
    def _get(self, ids: np.ndarray) -> list:
        """Records of ids (``bytes``-like, or None where absent), in order."""

    @abstractmethod
    def _put(self, ids: np.ndarray, values: list[bytes]) -> None:
        """Writes records atomically."""

    @abstractmethod
    def _delete(self, ids: np.ndarray) -> None:
        """Deletes ids atomically."""

    @abstractmethod
    def _scan(self, batch_size: int) -> Iterator[tuple[np.ndarray, list]]:
        """Yields (ids, records) of every row (not the description record)."""

    @abstractmethod
    def _count(self) -> int:
        """Rows stored (not the description record)."""

    @abstractmethod
    def _get_meta(self) -> bytes | None:
        """The description record, None if absent."""

    @abstractmethod
    def _put_meta(self, value: bytes) -> None:
        """Writes the description record if there is none (a shared store keeps the first)."""

    # A backend written before stores kept a clock keeps none (tables over it start from
    # step 0, as they always did): these three are not abstract.
    def _get_clock(self) -> bytes | None:
        """The clock record, None if absent (or if the backend keeps none)."""
        return None

    def _put_clock(self, value: bytes) -> None:
        """Writes (overwrites) the clock record, after every write made before it."""

    def _delete_clock(self) -> None:
        """Removes the clock record if there is one."""

    def _flush(self) -> None:
        """Makes writes durable (no-op by default)."""

    def _close(self) -> None:
        """Releases resources (no-op by default)."""
