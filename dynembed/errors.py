"""The error tree of dynembed.

Every error dynembed raises on purpose derives from :class:`DynembedError`, with one subclass
per layer. Bad arguments raise the built-in :class:`TypeError` or :class:`ValueError` (or a
subclass that also derives from them), so ordinary ``except ValueError`` handlers keep working.
Messages say what was wrong and how to fix it.
"""

from __future__ import annotations


class DynembedError(Exception):
    """Root of every error raised on purpose by dynembed."""


class KeyInputError(DynembedError, TypeError):
    """Keys given to a table or module are of a type or shape dynembed cannot use."""


class KeyValueError(DynembedError, ValueError):
    """Keys have an acceptable type but an unusable value (out of int64 range, bad offsets)."""


class TableError(DynembedError):
    """Base of the errors raised by the table layer."""


class ReadOnlyTableError(TableError):
    """A mutating verb was called on a table opened read-only (serving)."""


class StateDictError(TableError, ValueError):
    """A state dict does not fit the table it is loaded into (wrong dim, missing tensors)."""


class NonFiniteGradientError(TableError, FloatingPointError):
    """A gradient row holds NaN or inf and the table's policy is ``nonfinite_grads="raise"``."""
