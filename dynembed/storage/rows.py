"""RowBlock and the versioned binary layout of one stored row.

A stored row is a fixed-size little-endian record, so a batch decodes with one
``np.frombuffer`` and no per-row Python work::

    offset  size  field
    0       2     magic  b"DE"
    2       1     layout version (1)
    3       1     flags (0; reserved)
    4       4     dim          uint32
    8       4     state width  uint32
    12      8     count        int64   (training lookups)
    20      8     last step    int64   (table step of the last training lookup)
    28      4*dim         weights        float32
    28+4*dim 4*width      optimizer state float32

A row written and read back is bit-exact, optimizer state and metadata included, so training
continues where it stopped. Store keys are a namespace prefix plus the id as 8 big-endian
bytes with the sign bit flipped, so byte order equals numeric order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import compress, repeat

import numpy as np

from dynembed.errors import StoreCorruptError

MAGIC = 0x4544  # b"DE" read as little-endian uint16
LAYOUT_VERSION = 1
HEADER_BYTES = 28
_SIGN = np.uint64(1 << 63)


@dataclass
class RowBlock:
    """Rows with everything needed to continue training them.

    Attributes:
        ids: (n,) int64.
        weights: (n, dim) float32.
        state: (n, width) float32 optimizer state.
        counts: (n,) int64 training lookups.
        last_step: (n,) int64 step of the last training lookup.
    """

    ids: np.ndarray
    weights: np.ndarray
    state: np.ndarray
    counts: np.ndarray
    last_step: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    def take(self, index: np.ndarray) -> RowBlock:
        """The rows at ``index`` (a bool mask or int positions), as a new block."""
        return RowBlock(self.ids[index], self.weights[index], self.state[index],
                        self.counts[index], self.last_step[index])

    @staticmethod
    def concat(blocks: list[RowBlock], dim: int, width: int) -> RowBlock:
        """One block holding the rows of ``blocks`` in order (an empty one if none)."""
        if not blocks:
            return RowBlock(np.empty(0, np.int64), np.empty((0, dim), np.float32),
                            np.empty((0, width), np.float32), np.empty(0, np.int64),
                            np.empty(0, np.int64))
        return RowBlock(*(np.concatenate([getattr(b, f) for b in blocks])
                          for f in ("ids", "weights", "state", "counts", "last_step")))


def record_dtype(dim: int, width: int) -> np.dtype:
    """The packed numpy dtype of one stored row (see the module docstring)."""
    return np.dtype([("magic", "<u2"), ("version", "u1"), ("flags", "u1"),
                     ("dim", "<u4"), ("width", "<u4"), ("count", "<i8"),
                     ("last_step", "<i8"), ("weights", "<f4", (dim,)),
                     ("state", "<f4", (width,))])


def encode_ids(ids: np.ndarray, prefix: bytes = b"") -> list[bytes]:
    """Store keys of ids: ``prefix`` + 8 big-endian bytes of ``id ^ 2**63``.

    Args:
        ids: (n,) int64.
        prefix: namespace bytes put before every key.

    Returns:
        n bytes objects (built in C: a void-dtype view's ``tolist``).
    """
    n, p = ids.shape[0], len(prefix)
    raw = np.empty((n, p + 8), dtype=np.uint8)
    if p:
        raw[:, :p] = np.frombuffer(prefix, dtype=np.uint8)
    raw[:, p:] = (ids.view(np.uint64) ^ _SIGN).astype(">u8").view(np.uint8).reshape(n, 8)
    return raw.view(f"V{p + 8}").ravel().tolist()


def decode_ids(keys: list[bytes], prefix_len: int = 0) -> np.ndarray:
    """Inverse of :func:`encode_ids` for keys that all have a ``prefix_len``-byte prefix."""
    width = prefix_len + 8
    raw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), width)
    return (np.ascontiguousarray(raw[:, prefix_len:]).view(">u8").ravel()
            .astype(np.uint64) ^ _SIGN).view(np.int64)


class RowCodec:
    """Encodes and decodes :class:`RowBlock` rows of one (dim, state width).

    Args:
        dim: row width.
        width: optimizer floats per row.
        store: the store's description, named in errors.
    """

    def __init__(self, dim: int, width: int, store: str = "store") -> None:
        self.dim, self.width, self.store = dim, width, store
        self.dtype = record_dtype(dim, width)
        self.itemsize = self.dtype.itemsize

    def encode(self, rows: RowBlock) -> list[bytes]:
        """One ``bytes`` record per row.

        Raises:
            ValueError: a column of the wrong shape or dtype (numpy would broadcast or
                cast it, and the rows would not read back as written).
        """
        n = len(rows)
        for name, shape, dtype in (("weights", (n, self.dim), np.float32),
                                   ("state", (n, self.width), np.float32),
                                   ("counts", (n,), np.int64), ("last_step", (n,), np.int64)):
            column = getattr(rows, name)
            if column.shape != shape or column.dtype != dtype:
                raise ValueError(f"rows.{name} must be {np.dtype(dtype).name} of shape {shape} "
                                 f"for {self.store}, got {column.dtype} of shape "
                                 f"{column.shape}")
        rec = np.empty(n, dtype=self.dtype)
        rec["magic"], rec["version"], rec["flags"] = MAGIC, LAYOUT_VERSION, 0
        rec["dim"], rec["width"] = self.dim, self.width
        rec["count"], rec["last_step"] = rows.counts, rows.last_step
        rec["weights"] = rows.weights
        if self.width:
            rec["state"] = rows.state
        return rec.view(f"V{self.itemsize}").tolist()

    def decode(self, ids: np.ndarray, values: list) -> tuple[np.ndarray, RowBlock]:
        """Decodes a batch answer where absent keys are None.

        Args:
            ids: (n,) int64 ids the values belong to.
            values: n items, ``bytes`` or None.

        Returns:
            ((n,) bool found mask, RowBlock of the found rows in order).

        Raises:
            StoreCorruptError: a record has the wrong size, magic, version or dims.
        """
        n = ids.shape[0]
        found = np.fromiter(map(operator.is_not, values, repeat(None)), dtype=bool, count=n)
        present = list(compress(values, found))
        return found, self.decode_present(ids[found], present)

    def decode_present(self, ids: np.ndarray, values: list[bytes]) -> RowBlock:
        """Decodes records that are all present (see :meth:`decode`)."""
        sizes = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        bad = np.flatnonzero(sizes != self.itemsize)
        if bad.size:
            i = bad[0]
            raise StoreCorruptError(
                f"{self.store}: the row of id {ids[i]} has {sizes[i]} bytes, expected "
                f"{self.itemsize} (dim={self.dim}, optimizer state width={self.width}); it "
                "was written by a table with other dims or optimizer, or is corrupted")
        rec = np.frombuffer(b"".join(values), dtype=self.dtype)
        ok = ((rec["magic"] == MAGIC) & (rec["version"] == LAYOUT_VERSION)
              & (rec["dim"] == self.dim) & (rec["width"] == self.width))
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise StoreCorruptError(
                f"{self.store}: the row of id {ids[i]} has magic {rec['magic'][i]:#x}, layout "
                f"version {rec['version'][i]}, dim {rec['dim'][i]}, width {rec['width'][i]}; "
                f"expected magic {MAGIC:#x}, version {LAYOUT_VERSION}, dim {self.dim}, width "
                f"{self.width}")
        return RowBlock(ids.astype(np.int64, copy=True), rec["weights"].copy(),
                        rec["state"].copy().reshape(len(values), self.width),
                        rec["count"].astype(np.int64), rec["last_step"].astype(np.int64))
