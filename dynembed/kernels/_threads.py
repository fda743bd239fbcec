"""How many threads the compiled kernels use.

Numba's OpenMP runtime is not torch's: when both keep worker threads on the same cores, each
waits for the other's spinning workers, and a step gets several times slower (measured on 2
cores: a training step 7.3 ms with both parallel, 5.5 ms with kernels on one thread; under load
from another process 42 ms against 5.9 ms). So kernels run on the calling thread by default,
next to torch's own thread pool; ``set_num_threads`` opts into parallel kernels for large
batches (useful for pure lookups and bulk inserts with no torch work in between).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numba as nb

SERIAL_BELOW = 1 << 14
"""Kernels whose work (array elements touched) is below this always run single-threaded."""

_threads = 1


def set_num_threads(threads: int) -> None:
    """Sets the threads dynembed's compiled kernels may use (default 1, or the environment
    variable ``DYNEMBED_NUM_THREADS``).

    Raises:
        ValueError: ``threads`` is not between 1 and numba's thread count.
    """
    global _threads
    limit = nb.config.NUMBA_NUM_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise ValueError(f"threads must be an int in [1, {limit}], got {threads!r}")
    _threads = threads


def get_num_threads() -> int:
    """Threads dynembed's compiled kernels may use."""
    return _threads


def adaptive(work: Callable[..., int]):
    """Decorates a ``parallel=True`` kernel to run on ``get_num_threads()`` threads, or on one
    when ``work(*args)`` (array elements touched) is small.
    """

    def wrap(kernel):
        @functools.wraps(kernel)
        def call(*args):
            threads = _threads if _threads > 1 and work(*args) >= SERIAL_BELOW else 1
            previous = nb.get_num_threads()
            if threads == previous:
                return kernel(*args)
            nb.set_num_threads(threads)
            try:
                return kernel(*args)
            finally:
                nb.set_num_threads(previous)

        call.kernel = kernel
        return call

    return wrap


if "DYNEMBED_NUM_THREADS" in os.environ:
    set_num_threads(int(os.environ["DYNEMBED_NUM_THREADS"]))
