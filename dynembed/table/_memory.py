"""Host memory: large buffers backed by transparent huge pages where the kernel offers them,
and glibc's malloc kept from handing batch-sized buffers back to the kernel.

Rows are read and written at random all over tables of gigabytes, so each access also misses
the TLB; with 2 MiB pages the page walks mostly disappear (random reads of a 1 GiB array:
19.3 ms -> 16.3 ms per 2M reads on the development VM). Linux gives anonymous memory huge
pages only when asked (``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, a
common default), so large buffers are mapped here and advised. Elsewhere, or for small
buffers, this is plain ``numpy.empty``.

Every lookup and training step allocates and frees batch-sized buffers (a 65,536 x 64 output
is 16 MiB). By default glibc serves such sizes with ``mmap`` or trims them off the top of the
heap when freed, so the next step faults every page in again and the kernel zeroes it. On a
virtual machine such a fault costs several microseconds: interleaved with torch's own steps, a
16 MiB output took 4,096 faults and 30 ms instead of 6 ms. :func:`keep_freed_memory`, called
once at import, raises both thresholds so freed buffers are reused.

The price is memory held: blocks under ``MMAP_THRESHOLD`` now come from the heap, and a freed
one stays resident until it is reused, returned to the kernel only from the top of the heap
and only beyond ``TRIM_THRESHOLD`` free there. A freed block below a live one is never
returned, so a process can keep more resident memory than it uses, in each of glibc's arenas
(one per allocating thread, up to eight per core). Forked workers inherit the settings;
spawned ones get them when they import dynembed. With another allocator preloaded (jemalloc,
tcmalloc) the call changes nothing. Set the environment variable ``DYNEMBED_MALLOC_TUNING=0``
before importing dynembed to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os

import numpy as np

_HUGE_FROM_BYTES = 32 << 20
"""Buffers from this size up are mapped with MADV_HUGEPAGE (smaller ones gain nothing)."""


def host_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, huge-page backed when large.

    The mapping lives as long as the array (and any tensor made from it with
    ``torch.from_numpy``).

    Args:
        shape: array shape.
        dtype: numpy dtype.

    Raises:
        MemoryError: the memory cannot be had, or is more than the address space holds.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(map(int, shape)) * dtype.itemsize  # Python ints: no int64 wrap
    if nbytes >= 1 << 63:  # numpy and mmap each refuse it in their own words
        raise MemoryError(f"{nbytes:,} bytes is more than a process can address")
    if nbytes < _HUGE_FROM_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype=dtype)
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:  # ENOMEM: the same error np.empty gives
        raise MemoryError(f"cannot map {nbytes:,} bytes: {e}") from e
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # kernel without THP: a normal mapping is still fine
        pass
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


MMAP_THRESHOLD = 64 << 20
"""Allocations below this come from the heap, not from their own ``mmap``."""
TRIM_THRESHOLD = 512 << 20
"""Freed memory at the top of the heap is returned to the kernel only beyond this (256 MiB
still let a torch SparseAdam step trim buffers the next dynembed step faulted in again)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_OPT_OUT = ("0", "false", "no", "off")

malloc_tuned = False
"""Whether :func:`keep_freed_memory` changed malloc's thresholds in this process."""


def _glibc() -> bool:
    """Whether the C library this process runs on is glibc."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a GNU system
        return False


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds (see the module docs) unless the environment
    variable ``DYNEMBED_MALLOC_TUNING`` is ``0`` (or ``false``, ``no``, ``off``). Does
    nothing where the C library is not glibc.

    Returns:
        Whether both thresholds were set.
    """
    global malloc_tuned
    if os.environ.get("DYNEMBED_MALLOC_TUNING", "1").strip().lower() in _OPT_OUT:
        return False
    if not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, glibc's among them
    except (OSError, AttributeError):  # no usable libc: nothing to tune
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    malloc_tuned = malloc_tuned or mmap_set or trim_set
    return mmap_set and trim_set
