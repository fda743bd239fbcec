"""Run parallel kernels on one thread when their work is small.

Waking a thread team costs tens of microseconds on a quiet machine and milliseconds when the
cores are busy with other processes; for small batches a single thread is faster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numba as nb

SERIAL_BELOW = 1 << 14
"""Kernels whose work (array elements touched) is below this run single-threaded."""


def adaptive(work: Callable[..., int]):
    """Decorates a ``parallel=True`` kernel to run on one thread when ``work(*args)`` is small.

    Args:
        work: maps the kernel's arguments to its amount of work, in array elements.
    """

    def wrap(kernel):
        @functools.wraps(kernel)
        def call(*args):
            previous = nb.get_num_threads()
            if previous == 1 or work(*args) >= SERIAL_BELOW:
                return kernel(*args)
            nb.set_num_threads(1)
            try:
                return kernel(*args)
            finally:
                nb.set_num_threads(previous)

        call.kernel = kernel
        return call

    return wrap
