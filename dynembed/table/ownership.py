"""Which keys a shard of a distributed table holds.

:class:`TableOwnership` is a mixin of :class:`~dynembed.table.table.DynamicTable`. In a
distributed job (:func:`dynembed.distributed.shard_model` sets ``table.router``) a sharded
table holds the rows of its rank's key buckets only: table-level writes of other keys would
make rows that never train, or, over a store the ranks share, change the owner's rows.
"""

from __future__ import annotations

import numpy as np
import torch


class TableOwnership:
    """The ownership checks of a table (mixin; see module doc)."""

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
