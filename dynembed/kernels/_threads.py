"""How many threads the compiled kernels use.

Kernels use numba's thread pool (all cores by default) for batches of at least
``SERIAL_BELOW`` elements of work, and run on the calling thread below that: waking a thread
team costs tens of microseconds on a quiet machine and milliseconds on a busy one, more than
a small batch takes. Measured on 2 cores, 65,536-key Adagrad steps on a 10M-row table: 5.5 ms
with 2 threads, 7.1 ms with 1.

In a process forked after numba started its thread pool (a ``DataLoader`` worker, a
``multiprocessing`` fork, a forked snapshot), kernels run as compiled serial copies: GNU
OpenMP cannot run in such a child, and numba's OpenMP layer kills it with SIGTERM
("Terminating: fork() called from a process already using GNU OpenMP").
"""

from __future__ import annotations

import functools
import numbers
import os
import threading
import types
from collections.abc import Callable

import numba as nb
import numpy as np

SERIAL_BELOW = 1 << 14
"""Kernels whose work (array elements touched) is below this always run single-threaded."""

_threads = nb.config.NUMBA_NUM_THREADS


def set_num_threads(threads: int) -> None:
    """Sets the threads dynembed's compiled kernels may use (default: numba's thread count,
    i.e. the cores; or the environment variable ``DYNEMBED_NUM_THREADS``).

    Raises:
        ValueError: ``threads`` is not between 1 and numba's thread count.
    """
    global _threads
    limit = nb.config.NUMBA_NUM_THREADS
    # any integer (numpy's too, as the config checks take them), never a bool
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral) \
            or not 1 <= threads <= limit:
        raise ValueError(f"threads must be an int in [1, {limit}], got {threads!r}")
    threads = int(threads)
    _threads = threads
    # numba's own count too: kernels restore it after running, and with numba's OpenMP
    # layer that count is libgomp's, which torch shares (restoring the default would give
    # torch every core again, e.g. 2 threads per rank of a 2-rank job on 2 cores)
    nb.set_num_threads(threads)


def get_num_threads() -> int:
    """Threads dynembed's compiled kernels may use."""
    return _threads


_one_at_a_time = threading.Lock()
_layer: str | None = None


def _serialised() -> bool:
    """Whether parallel kernels must run one at a time. numba's ``workqueue`` threading
    layer, what it falls back to where neither OpenMP (libgomp) nor TBB loads, aborts the
    process when two threads run parallel kernels at once (a model server runs several);
    and until a first kernel has run, the layer is not chosen yet."""
    global _layer
    if _layer is None:
        try:
            _layer = nb.threading_layer()
        except ValueError:  # no parallel kernel has run yet
            return True
    return _layer == "workqueue"


_forked_from_pool = False
"""Whether this process was forked from one whose numba thread pool had started."""


def _note_fork_in_child() -> None:
    global _forked_from_pool
    if not _forked_from_pool:
        try:
            nb.threading_layer()  # raises until the pool has started
        except ValueError:
            return
        _forked_from_pool = True


os.register_at_fork(after_in_child=_note_fork_in_child)

_serial_copies: dict = {}


def _serial_copy(kernel):
    """``kernel`` (a ``parallel=True`` numba dispatcher) compiled without threads: ``prange``
    runs as ``range``, and no thread pool is touched. Compiled on first use."""
    copy = _serial_copies.get(kernel)
    if copy is None:
        f = kernel.py_func
        twin = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__,
                                  f.__closure__)
        # numba's on-disk cache keys a kernel by module, name and line, not by its options:
        # under the same name the serial copy would replace the parallel one in the cache
        twin.__qualname__ = f"{f.__qualname__}_serial"
        twin.__module__ = f.__module__
        options = {**kernel.targetoptions, "parallel": False}
        options.pop("nopython", None)  # njit's own
        copy = _serial_copies[kernel] = nb.njit(cache=True, **options)(twin)
    return copy


def adaptive(work: Callable[..., int]):
    """Decorates a ``parallel=True`` kernel to run on ``get_num_threads()`` threads, or on one
    when ``work(*args)`` (array elements touched) is small; under numba's ``workqueue``
    layer, one kernel at a time in the process (see :func:`_serialised`); in a process
    forked after the pool started, as a serial copy (see the module's docs).
    """

    def wrap(kernel):
        def run(args):
            threads = _threads if _threads > 1 and work(*args) >= SERIAL_BELOW else 1
            previous = nb.get_num_threads()
            if threads == previous:
                return kernel(*args)
            nb.set_num_threads(threads)
            try:
                return kernel(*args)
            finally:
                nb.set_num_threads(previous)

        @functools.wraps(kernel)
        def call(*args):
            if _forked_from_pool:  # first: a lock held at the fork stays held in the child
                return _serial_copy(kernel)(*args)
            if _serialised():
                with _one_at_a_time:
                    return run(args)
            return run(args)

        return call

    return wrap


_ENV = "DYNEMBED_NUM_THREADS"
if _ENV in os.environ:
    try:
        set_num_threads(int(os.environ[_ENV]))
    except ValueError:
        # raised at import: the message must say which setting is wrong, as the traceback
        # only shows this module; from None hides int()'s "invalid literal" error
        raise ValueError(f"environment variable {_ENV} must be an int in [1, "
                         f"{nb.config.NUMBA_NUM_THREADS}] (numba's thread count), got "
                         f"{os.environ[_ENV]!r}; fix it or unset it") from None
