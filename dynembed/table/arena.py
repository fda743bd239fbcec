"""RowArena: the storage of rows (weights, optimizer state, per-row metadata).

Rows live in torch tensors addressed by slot, so the arena can be placed on any device;
CPU kernels see them through zero-copy numpy views. The arena only stores and grows; which
slot belongs to which key is the index's business.
"""

from __future__ import annotations

import numpy as np
import torch

from dynembed.kernels._streaming import can_stream
from dynembed.kernels._threads import get_num_threads
from dynembed.kernels.gather import gather_rows
from dynembed.kernels.records import HEAD_WORDS, pack_records, unpack_records
from dynembed.storage.rows import RowBlock
from dynembed.table._memory import host_empty

_MIN_CAPACITY = 1024
_GROWTH = 1.5  # amortised O(1) appends; 1.5 rather than 2 keeps slack (and copies) small


ID, COUNT, LAST_STEP = 0, 1, 2
"""Columns of ``RowArena.meta``."""


class RowArena:
    """Per-slot rows: ``weights`` (capacity, dim), ``state`` (capacity, state_width) and
    ``meta`` (capacity, 3) int64 holding each row's id, count and last-seen step.

    The three metadata fields share one row of ``meta`` so a lookup that touches them costs
    one cache miss, not three; ``ids``, ``counts`` and ``last_step`` are column views.

    Args:
        dim: row width.
        state_width: optimizer floats per row (0 for plain SGD).
        device: torch device of the tensors.
    """

    def __init__(self, dim: int, state_width: int, device: str = "cpu") -> None:
        self.dim = dim
        self.state_width = state_width
        self.device = torch.device(device)
        self.limit: int | None = None
        """Capacity the arena never grows past (a table's row budget), None for no limit."""
        self.weights, self.state, self.meta = self._alloc(0)

    def _alloc(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New (weights, state, meta) of ``capacity`` rows, all or none.

        Raises:
            MemoryError: one of them could not be allocated (the arena is unchanged).
        """
        try:
            return (self._empty((capacity, self.dim), torch.float32),
                    self._empty((capacity, self.state_width), torch.float32),
                    self._empty((capacity, 3), torch.int64))
        except (MemoryError, OSError, RuntimeError) as e:  # mmap's ENOMEM, torch's OOM
            need = capacity * self.bytes_per_row()
            raise MemoryError(
                f"cannot allocate a table arena of {capacity:,} rows ({need / 2**30:.2f} GiB "
                f"at {self.bytes_per_row()} bytes per row): {e}. The table is unchanged; "
                "free memory, set a memory_budget / max_rows, or give the table a store= "
                "for the rows that do not fit") from e

    def _empty(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":  # huge-page backed host memory for big arenas
            np_dtype = np.float32 if dtype == torch.float32 else np.int64
            return torch.from_numpy(host_empty(shape, np_dtype))
        return torch.empty(shape, dtype=dtype, device=self.device)

    @property
    def capacity(self) -> int:
        """Rows the arena holds before it must grow."""
        return self.weights.shape[0]

    @property
    def ids(self) -> torch.Tensor:
        """(capacity,) id of each slot (a view)."""
        return self.meta[:, ID]

    @property
    def counts(self) -> torch.Tensor:
        """(capacity,) training lookups of each slot's key (a view)."""
        return self.meta[:, COUNT]

    @property
    def last_step(self) -> torch.Tensor:
        """(capacity,) table step of each slot's last training lookup (a view)."""
        return self.meta[:, LAST_STEP]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arena's storage tensors by name."""
        return {"weights": self.weights, "state": self.state, "meta": self.meta}

    def bytes_per_row(self) -> int:
        """Bytes one slot takes across all tensors."""
        return 4 * (self.dim + self.state_width) + 3 * 8

    def ensure(self, rows: int) -> None:
        """Grows (by at least 1.5x, keeping contents) until ``rows`` slots fit."""
        if rows <= self.capacity:
            return
        new_capacity = max(rows, int(self.capacity * _GROWTH), _MIN_CAPACITY)
        if self.limit is not None:
            new_capacity = max(rows, min(new_capacity, self.limit))
        self.reserve(new_capacity)

    def reserve(self, capacity: int) -> None:
        """Grows to exactly ``capacity`` slots if that is more than now."""
        if capacity <= self.capacity:
            return
        grown = self._alloc(capacity)  # all three first: a failure leaves the arena whole
        used = self.capacity
        for new, old in zip(grown, (self.weights, self.state, self.meta)):
            new[:used].copy_(old)
        self.weights, self.state, self.meta = grown

    def rows(self, slots: np.ndarray) -> RowBlock:
        """Copies of the rows at ``slots`` with their optimizer state and metadata."""
        meta = self.np("meta")[slots]
        return RowBlock(meta[:, ID].copy(), self.np("weights")[slots],
                        self.np("state")[slots], meta[:, COUNT].copy(),
                        meta[:, LAST_STEP].copy())

    def write_rows(self, slots: np.ndarray, rows: RowBlock) -> None:
        """Writes ``rows`` (weights, state, count, last step) into ``slots``; ids are the
        caller's business (the slots are already allocated to them)."""
        self.np("weights")[slots] = rows.weights
        if self.state_width:
            self.np("state")[slots] = rows.state
        meta = self.np("meta")
        meta[slots, COUNT] = rows.counts
        meta[slots, LAST_STEP] = rows.last_step

    def pack(self, slots: np.ndarray) -> np.ndarray:
        """(n, 4 + dim + state_width) uint32 records of the rows at ``slots`` (the layout of
        :mod:`dynembed.kernels.records`)."""
        out = np.empty((slots.shape[0], HEAD_WORDS + self.dim + self.state_width), np.uint32)
        pack_records(self.np("weights").view(np.uint32), self.np("state").view(np.uint32),
                     self.np("meta"), slots, out)
        return out

    def unpack(self, slots: np.ndarray, records: np.ndarray) -> None:
        """Writes records (see :meth:`pack`) into the rows at ``slots``; ids are the
        caller's business."""
        unpack_records(records, slots, self.np("weights").view(np.uint32),
                       self.np("state").view(np.uint32), self.np("meta"))

    def np(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of a CPU tensor (or metadata column), for the kernels."""
        return getattr(self, name).numpy()


_GATHERED_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)
"""Dtypes :func:`take_rows` copies with the compiled gather (others: ``index_select``)."""


def take_rows(source: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``source[index]`` (rows) as a new tensor.

    On the CPU a compiled gather copies the rows (:func:`~dynembed.kernels.gather.gather_rows`,
    prefetching, on the calling thread for small gathers, with streaming stores for large
    outputs: see :mod:`dynembed.kernels._streaming`). It keeps a training step on numba's
    threads: torch's OpenMP threads spin after each parallel op and take cores from whatever
    runs next (a loopback Redis server measured 34% more rows/s with them quiet).

    Args:
        source: (n, d) tensor.
        index: (u,) int64 row numbers.

    Raises:
        IndexError: an index outside [0, n).
    """
    # one index for both paths: torch.from_numpy refuses negative strides, and index_select
    # refuses uint64 indices that the compiled gather takes
    index = np.ascontiguousarray(index, dtype=np.int64)
    if source.device.type != "cpu" or source.dim() != 2 or source.dtype not in _GATHERED_DTYPES:
        return source.index_select(0, torch.from_numpy(index).to(source.device))
    source = source.detach().contiguous()
    out = torch.empty((index.shape[0], source.shape[1]), dtype=source.dtype)
    rows, written = source.numpy(), out.numpy()
    bad = gather_rows(rows, index, written, get_num_threads(), can_stream(written, rows))
    if bad:
        raise IndexError(f"take_rows: {bad} of {index.shape[0]} indices outside "
                         f"[0, {source.shape[0]})")
    return out
