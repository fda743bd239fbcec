"""What a fresh start (no checkpoint to restore) does with stores that already hold rows.

A restore empties the tables' stores and loads the checkpoint's rows. With no checkpoint,
a store that holds rows (from an earlier job, or from an attempt of this job that stopped
before its first checkpoint) would be trained on silently: the rows the failed attempt
evicted, with its lookup counts and admission, as if they were this run's. Both
:meth:`CheckpointManager.restore <dynembed.checkpoint.CheckpointManager.restore>` and
:class:`dynembed.train.Runtime` apply one of :data:`USED_STORES` instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from dynembed.table.table import DynamicTable

USED_STORES = ("refuse", "clear", "keep")
"""What a fresh start may do with stores that hold rows: ``"refuse"`` (raise, naming the
tables), ``"clear"`` (empty them, as a restore does) or ``"keep"`` (start from them)."""


def check_used_stores(used_stores, arg: str = "used_stores") -> str:
    """Returns ``used_stores`` if it is one of :data:`USED_STORES`.

    Raises:
        ValueError: it is not (named as ``arg``).
    """
    if not isinstance(used_stores, str) or used_stores not in USED_STORES:
        raise ValueError(f"{arg} must be one of {USED_STORES}, got {used_stores!r}")
    return used_stores


def tables_with_stores(tables: Mapping[str, DynamicTable]) -> dict[str, DynamicTable]:
    """The tables whose stores a fresh start concerns: writable ones with a store (a
    read-only table's store holds the rows it reads, e.g. frozen pretrained ones)."""
    return {name: table for name, table in tables.items()
            if table.tier is not None and not table.read_only}


def used_store_names(tables: Mapping[str, DynamicTable]) -> list[str]:
    """Sorted names of ``tables`` (from :func:`tables_with_stores`) whose stores hold rows.

    Raises:
        StoreError: a store failed.
    """
    return sorted(name for name, table in tables.items() if table.holds_stored_rows())


def used_stores_error(where: str, used: list[str] | str, fix: str) -> RuntimeError:
    """The error of a fresh start refused over stores that hold rows.

    Args:
        where: who found no checkpoint, e.g. ``"no checkpoint in runs/ckpt"``.
        used: the tables whose stores hold rows (or a phrase for them).
        fix: the call that chooses another mode, with ``{mode}`` for it, e.g.
            ``"restore(used_stores='{mode}')"``.
    """
    return RuntimeError(
        f"{where}, but the stores of tables {used} hold rows, from an earlier run or a run "
        "that stopped before its first checkpoint; starting over them would train on those "
        f"rows. Pass {fix.format(mode='clear')} to empty them, or "
        f"{fix.format(mode='keep')} to start from them on purpose")
