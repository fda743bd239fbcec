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


class MemoryBudgetError(TableError):
    """A lookup needs more rows at once than the table's memory budget can hold."""


class StoreError(DynembedError):
    """Base of the errors raised by a storage tier; the message names the store and cause."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store cannot be reached (server down, network error) after bounded retries."""


class StoreLockedError(StoreError):
    """The store is held by another process or object (e.g. a RocksDB directory's LOCK)."""


class StoreFullError(StoreError):
    """The store refused a write for lack of space (disk full, Redis maxmemory)."""


class StoreCorruptError(StoreError):
    """A stored row does not decode (bad magic, unknown version, the wrong size or dims), or
    the store's own files are damaged (e.g. a RocksDB block checksum mismatch)."""


class CheckpointError(DynembedError):
    """Base of the errors raised by checkpoints: nothing to load, a mismatched table, a
    delta without its base."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint is at the given path (or in the given directory)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is truncated or damaged (bad magic, version, size or checksum); the
    message names the file and the part that failed, and ``path`` is that file (or the
    checkpoint directory), where known: what a restart must set aside."""

    def __init__(self, message: str = "", *, path=None) -> None:
        super().__init__(message)
        self.path = path


class DistributedError(DynembedError):
    """A distributed job cannot go on: ranks disagree, or a collective failed or timed out."""


class ConfigMismatchError(DistributedError, ValueError):
    """Ranks of one job built different tables (dims, optimizers, ...) or were given
    different training settings (``every_steps``, ``total``)."""
