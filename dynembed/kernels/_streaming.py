"""Streaming (non-temporal) stores for compiled loops that write large outputs once.

A lookup copies rows scattered over gigabytes into a fresh output of one row per key (16 MiB
for 65,536 keys of dim 64). An ordinary store first reads the output's cache line from memory
(to own it), so each key costs a second miss that competes with the row's own miss for the
core's few outstanding-miss slots. A streaming store writes the whole line without reading
it. On the development VM (10M-row table, 65,536 Zipf keys) a read went from 1.37 to 0.99 ms
per batch, and from 1.55 to 1.39 ms when each pass followed a cache-thrashing one; with a
consumer that reads the output at once (``nn.Linear(64, 16)``) from 2.54 to 2.42 ms, so the
consumer loses nothing: an output this large has mostly left the caches anyway. Where the
source rows are already cached (expanding distinct rows to keys), streaming measured slower
(0.93 against 0.85 ms), so only arena reads use it.

Streaming needs every row of the output aligned to :data:`STREAM_ALIGN` bytes; callers check
with :func:`can_stream`.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from dynembed.kernels._llvm import element_pointer

_LANES = 8
"""float32 lanes per streamed store: 32 bytes, one AVX register (two SSE stores without AVX)."""
STREAM_ALIGN = _LANES * 4
"""Bytes every streamed row must be aligned to."""
STREAM_FROM_BYTES = 8 << 20
"""Outputs from this size up are streamed (a quarter of a 32 MiB L3); smaller ones are more
likely to be still cached when the next layer reads them."""


@intrinsic
def _stream_lanes(typingctx, dst, src, at):
    """``dst[at:at + 8] = src[at:at + 8]`` with a non-temporal store (``dst + at`` aligned)."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)
            and dst.ndim == 1 and src.ndim == 1 and dst.dtype == types.float32
            and src.dtype == types.float32 and isinstance(at, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        vector = ir.VectorType(ir.FloatType(), _LANES).as_pointer()
        source = element_pointer(context, builder, signature.args[1], args[1], args[2],
                                  signature.args[2])
        target = element_pointer(context, builder, signature.args[0], args[0], args[2],
                                  signature.args[2])
        value = builder.load(builder.bitcast(source, vector), align=4)
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


@nb.njit(inline="always", cache=True)
def copy_row_streaming(dst, src):
    """``dst[:] = src`` (1-D float32, length a multiple of 8) with streaming stores; ``dst``
    aligned to :data:`STREAM_ALIGN` bytes."""
    for at in range(0, dst.shape[0], _LANES):
        _stream_lanes(dst, src, at)


def can_stream(out: np.ndarray, rows: np.ndarray) -> bool:
    """Whether a kernel copying rows of ``rows`` into ``out`` should write ``out`` with
    streaming stores: ``out`` large enough, both float32, C-contiguous and of one row length
    (a multiple of 8), every output row aligned to :data:`STREAM_ALIGN` bytes."""
    return (out.nbytes >= STREAM_FROM_BYTES and out.dtype == rows.dtype == np.float32
            and out.ndim == rows.ndim == 2 and out.shape[1] == rows.shape[1]
            and out.shape[1] % _LANES == 0
            and out.flags.c_contiguous and rows.flags.c_contiguous
            and out.ctypes.data % STREAM_ALIGN == 0)
