"""Who may change a table: not a read-only one, nor, unnoticed, a DataLoader worker's
copy; in a distributed job, only the keys of this rank's shard.

:class:`TableOwnership` is a mixin of :class:`~dynembed.table.table.DynamicTable`. In a
distributed job (:func:`dynembed.distributed.shard_model` sets ``table.router``) a sharded
table holds the rows of its rank's key buckets only: table-level writes of other keys would
make rows that never train, or, over a store the ranks share, change the owner's rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.data

from dynembed._caller import warn_at_caller
from dynembed.errors import ReadOnlyTableError


class TableOwnership:
    """The ownership checks of a table (mixin; see module doc)."""

    _warned_in_worker = False
    """Whether a change in a DataLoader worker was warned about (set on the instance)."""

    def _check_writable(self, verb: str) -> None:
        if self.read_only:
            raise ReadOnlyTableError(f"{verb}: the table is read-only (read_only=True, for "
                                     "serving); make a writable table to change rows")
        self._warn_if_in_data_worker(verb)
        self._warn_pending_store()

    def _warn_if_in_data_worker(self, verb: str) -> None:
        """Warns (once per table and process) when a DataLoader worker changes the table:
        it changes the worker's copy (forked or unpickled), which the training process
        never sees, so rows, counts and key-log entries made there vanish silently."""
        if self._warned_in_worker or torch.utils.data.get_worker_info() is None:
            return
        self._warned_in_worker = True
        warn_at_caller(
            f"{verb} in a DataLoader worker: it changes the worker's copy of "
            f"{self.name or 'the table'}, and the training process never sees the rows, "
            "counts or logged keys it makes. Look keys up in the training loop (or in eval "
            "mode, or on a read_only table, in the worker); to move only the string hashing "
            "into workers, convert keys there with table.ids_of(keys).ids or "
            "de.hash_strings and look the int ids up in the training process.")

    @property
    def is_shard(self) -> bool:
        """Whether the table is one rank's shard of a sharded distributed table."""
        return self.router is not None and self.config.placement != "replicated"

    def owned(self, keys) -> torch.Tensor:
        """(n,) bool, whether this process holds the rows of each key: in a distributed job
        the keys of this rank's shard of a sharded table; otherwise every key. Table-level
        writes (find_or_insert, insert_or_assign, assign, erase) take only owned keys."""
        ids = self.ids_of(keys).ids
        return torch.from_numpy(self._owned_ids(ids))

    def _owned_ids(self, ids: np.ndarray) -> np.ndarray:
        if not self.is_shard:
            return np.ones(ids.shape[0], dtype=bool)
        return self.router.owners(ids) == self.router.exchange.rank

    def _refuse_foreign(self, ids: np.ndarray, verb: str) -> None:
        """Raises for keys of other ranks' shards: a row written here would never train (its
        lookups go to the owner) and the next checkpoint would refuse the table.

        Raises:
            ValueError: some ids belong to other ranks' shards.
        """
        if not self.is_shard or not ids.shape[0]:
            return
        foreign = np.flatnonzero(~self._owned_ids(ids))
        if foreign.shape[0]:
            raise ValueError(
                f"{verb}: {foreign.shape[0]} of {ids.shape[0]} keys belong to other ranks' "
                f"shards of this distributed table (e.g. id {int(ids[foreign[0]])}); nothing "
                "was written. Write each key on the rank that owns it: keys[table.owned(keys)]")
