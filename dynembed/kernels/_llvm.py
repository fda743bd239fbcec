"""Shared code generation for the kernels' numba intrinsics."""

from __future__ import annotations

from numba import types
from numba.core import cgutils

FAST = {"contract", "nsz", "reassoc", "arcp"}
"""The fast-math flags of the float loops: enough for LLVM to vectorise them, without those
that assume no NaN or inf ("nnan", "ninf") or allow approximate functions ("afn"). With
``fastmath=True``, a finite gradient whose square overflows (|g| > 1.8e19) made Adagrad and
Adam rows NaN where torch leaves them as they were. The same speed was measured."""


def element_pointer(context, builder, array_type, array, first, first_type):
    """LLVM pointer to ``array[first, 0, ...]`` (the first element of row ``first``).

    Args:
        context, builder: the intrinsic's codegen arguments.
        array_type: the numba type of ``array``.
        array: the LLVM value of the array argument.
        first, first_type: the LLVM value and numba type of the index along the first axis.
    """
    ary = context.make_array(array_type)(context, builder, array)
    at = context.cast(builder, first, first_type, types.intp)
    zero = context.get_constant(types.intp, 0)
    return cgutils.get_item_pointer2(context, builder, ary.data,
                                     cgutils.unpack_tuple(builder, ary.shape),
                                     cgutils.unpack_tuple(builder, ary.strides),
                                     array_type.layout, [at] + [zero] * (array_type.ndim - 1))
