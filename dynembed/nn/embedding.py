"""DynamicEmbedding: one vector per key, for keys nobody enumerated in advance."""

from __future__ import annotations

import torch

from dynembed.kernels.hash_index import unique_inverse
from dynembed.nn._autograd import rows_for
from dynembed.nn._base import SingleTableModule, untraced
from dynembed.nn._padding import drop_padding, restore_padding
from dynembed.table.config import TableConfig
from dynembed.table.table import DynamicTable


class DynamicEmbedding(SingleTableModule):
    """Like ``torch.nn.Embedding``, with no vocabulary: new keys get rows as they arrive.

    Args:
        dim: row width; the other keyword arguments are :class:`TableConfig` fields
            (``optimizer``, ``initializer``, ``seed``, ``update_mode``, ...).
        config: a whole :class:`TableConfig` instead of ``dim`` and options.
        table: an existing :class:`DynamicTable` to share instead (see
            ``TableConfig.update_mode`` for how shared tables are updated).

    Example:
        >>> emb = de.DynamicEmbedding(dim=64, optimizer=de.optim.Adagrad(lr=0.05))
        >>> emb(["cat", "dog", "cat"]).shape
        torch.Size([3, 64])

    In training mode a lookup inserts missing keys and the output is differentiable;
    backward updates the touched rows with the table's sparse optimizer. In eval mode (or
    with ``read_only=True``) unseen keys get the default vector, are counted in
    ``stats().totals.defaults_served`` and are never inserted.
    """

    def __init__(self, dim: int | None = None, *, config: TableConfig | None = None,
                 table: DynamicTable | None = None, **options) -> None:
        super().__init__(dim, table, config, options)

    @untraced
    def forward(self, keys) -> torch.Tensor:
        """Looks keys up.

        Args:
            keys: int64 ids or str / bytes keys: a tensor or numpy array of any shape, a
                flat list, or a (B, L) list of equal-length lists. The table's
                ``padding_key`` looks up as zeros (see :class:`TableConfig`).

        Returns:
            (*keys.shape, dim) float32 on the CPU, or on the device and in the float dtype
            the module was moved to (``.to()``, ``.cuda()``, ``.half()``: the rows stay in
            host memory as float32).

        Raises:
            KeyInputError: keys of an unsupported type (float, bool, None, mixed, nested).
            KeyValueError: an int key outside the int64 range.
            MemoryBudgetError: a training lookup needs more distinct rows at once than
                ``memory_budget`` / ``max_rows`` hold.
            StoreError: the table's store failed; memory is unchanged.
        """
        batch = self.table.ids_of(keys)
        kept, keep = drop_padding(batch, self.table.padding_id)
        if (not self.training or self.table.read_only) and self.table.router is None:
            # Reads need no dedup: probe every key, then one gather.
            out = self.table.read(kept.ids)
        else:
            unique, inverse, counts = unique_inverse(kept.ids)
            out = rows_for(self.table, self._anchor, unique, counts, training=self.training,
                           inverse=inverse, strings=kept.strings, string_ids=kept.ids)
        out = restore_padding(out, keep)
        return self._deliver(out.reshape(*batch.shape, self.dim))

    def extra_repr(self) -> str:
        opt = type(self.table.optimizer).__name__ if self.table.optimizer else None
        return f"dim={self.dim}, rows={self.table.size()}, optimizer={opt}"
