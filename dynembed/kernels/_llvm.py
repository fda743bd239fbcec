"""Shared code generation for the kernels' numba intrinsics."""

from __future__ import annotations

from numba import types
from numba.core import cgutils


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
