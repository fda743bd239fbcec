"""Streaming (non-temporal) stores for compiled loops that write large outputs once.

A lookup copies rows scattered over gigabytes into a fresh output of one row per key (16 MiB
for 65,536 keys of dim 64). An ordinary store first reads the output's cache line from memory
(to own it), so each key costs a second miss that competes with the row's own miss for the
core's few outstanding-miss slots. A streaming store writes the whole line without reading
it. On the development VM (10M-row table, 65,536 Zipf keys) a read went from 1.37 to 0.99 ms
per batch, and from 1.55 to 1.39 ms when each pass followed a cache-thrashing one; with a
consumer that reads the output at once (``nn.Linear(64, 16)``) from 2.54 to 2.42 ms, so the
consumer loses nothing: an output this large has mostly left the caches anyway. A training
step's expansion of its distinct rows to one row per key (``take_rows``) streams too: the
16 MiB it writes no longer evicts what the step's later stages read. That gain is small
(65,536-key SGD steps on a 10M-row table after a cache-thrashing torch step: whole steps
0.96-1.00x the time in three A/B runs; the stages timed inside the step 3.61-4.01 ->
3.61-3.83 ms, and 5.57 -> 5.37 ms with an ``nn.Linear`` reading the output), but it never
measured slower.

Streaming needs every row of the output aligned to :data:`STREAM_ALIGN` bytes and a whole
number of 32-byte stores long; callers check with :func:`can_stream`.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from dynembed.kernels._llvm import element_pointer

STREAM_ALIGN = 32
"""Bytes per streamed store (one AVX register; two SSE stores without AVX), and the alignment
every streamed row needs."""
STREAM_FROM_BYTES = 8 << 20
"""Outputs from this size up are streamed (a quarter of a 32 MiB L3); smaller ones are more
likely to be still cached when the next layer reads them."""
STREAM_DTYPES = (np.float32, np.float64, np.int32, np.int64)
"""Row dtypes the streaming copy handles."""


@intrinsic
def _stream_store(typingctx, dst, src, at):
    """``dst[at:at + k] = src[at:at + k]``, ``k`` elements making :data:`STREAM_ALIGN` bytes,
    with a non-temporal store (``dst + at`` aligned)."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)
            and dst.ndim == 1 and src.ndim == 1 and dst.dtype == src.dtype
            and isinstance(dst.dtype, (types.Float, types.Integer))
            and STREAM_ALIGN % (dst.dtype.bitwidth // 8) == 0
            and isinstance(at, types.Integer)):
        return None
    lanes = STREAM_ALIGN // (dst.dtype.bitwidth // 8)

    def codegen(context, builder, signature, args):
        element = context.get_value_type(signature.args[0].dtype)
        vector = ir.VectorType(element, lanes).as_pointer()
        source = element_pointer(context, builder, signature.args[1], args[1], args[2],
                                  signature.args[2])
        target = element_pointer(context, builder, signature.args[0], args[0], args[2],
                                  signature.args[2])
        value = builder.load(builder.bitcast(source, vector),
                             align=signature.args[1].dtype.bitwidth // 8)
        store = builder.store(value, builder.bitcast(target, vector), align=STREAM_ALIGN)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(dst, src, at), codegen


@intrinsic
def store_fence(typingctx):
    """Orders this thread's streaming stores before its later stores (a full fence): call it
    once after a loop of :func:`copy_row_streaming`, before other threads read the output."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _lanes(typingctx, dst):
    """Elements of ``dst``'s dtype per streamed store, as a compile-time constant.

    ``STREAM_ALIGN // dst.itemsize`` reads the item size from the array at run time, so the
    copy loop below got a run-time step (and a division per row) that LLVM could not unroll:
    10% of a 65,536-key read of a 10M-row table (A/B in one process).
    """
    if not (isinstance(dst, types.Array) and isinstance(dst.dtype, (types.Float, types.Integer))
            and STREAM_ALIGN % (dst.dtype.bitwidth // 8) == 0):
        return None
    lanes = STREAM_ALIGN // (dst.dtype.bitwidth // 8)

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, lanes)

    return types.intp(dst), codegen


@nb.njit(inline="always", cache=True)
def copy_row_streaming(dst, src):
    """``dst[:] = src`` (1-D, one of :data:`STREAM_DTYPES`, a whole number of
    :data:`STREAM_ALIGN`-byte stores long) with streaming stores; ``dst`` aligned to
    :data:`STREAM_ALIGN` bytes."""
    for at in range(0, dst.shape[0], _lanes(dst)):
        _stream_store(dst, src, at)


@nb.njit(inline="always", cache=True)
def copy_row(dst, src, stream):
    """``dst[:] = src``, with streaming stores when ``stream`` (see
    :func:`copy_row_streaming` for what that needs)."""
    if stream:
        copy_row_streaming(dst, src)
    else:
        for j in range(dst.shape[0]):
            dst[j] = src[j]


def can_stream(out: np.ndarray, rows: np.ndarray) -> bool:
    """Whether a kernel copying rows of ``rows`` into ``out`` should write ``out`` with
    streaming stores: ``out`` large enough, both of one dtype in :data:`STREAM_DTYPES`,
    C-contiguous and of one row length (a whole number of :data:`STREAM_ALIGN`-byte stores),
    every output row aligned to :data:`STREAM_ALIGN` bytes."""
    return (out.nbytes >= STREAM_FROM_BYTES and out.dtype == rows.dtype
            and out.dtype in STREAM_DTYPES
            and out.ndim == rows.ndim == 2 and out.shape[1] == rows.shape[1]
            and out.shape[1] * out.itemsize % STREAM_ALIGN == 0
            and out.flags.c_contiguous and rows.flags.c_contiguous
            and out.ctypes.data % STREAM_ALIGN == 0)
