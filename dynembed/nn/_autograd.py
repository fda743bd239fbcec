"""The bridge between a table and autograd: gather rows forward, update rows backward."""

from __future__ import annotations

import numpy as np
import torch

from dynembed.table.table import DynamicTable


class _GatherRows(torch.autograd.Function):
    """Rows of unique ids as a dense tensor; backward hands their gradient to the table.

    Rows are not ``nn.Parameter`` s (the table grows and reuses slots), so the output is tied
    into the graph through ``anchor``, a zero-size tensor that requires grad.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, table: DynamicTable, ids: np.ndarray,
                slots: np.ndarray) -> torch.Tensor:
        ctx.table, ctx.ids, ctx.slots = table, ids, slots
        return table.gather(slots)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # grad is (u, dim): duplicates were already combined by the op that used the rows.
        ctx.table.apply_gradients(ctx.ids, ctx.slots, grad)
        return None, None, None, None


def rows_for(table: DynamicTable, anchor: torch.Tensor, unique_ids: np.ndarray,
             counts: np.ndarray, *, training: bool, strings=None,
             string_ids: np.ndarray | None = None) -> torch.Tensor:
    """Looks up unique ids and returns their rows, differentiable when training.

    Args:
        table: the table.
        anchor: the module's zero-size grad anchor.
        unique_ids: (u,) int64 distinct ids.
        counts: (u,) int64 occurrences of each id.
        training: module is training: insert missing rows and track gradients.
        strings, string_ids: original string keys and their ids, for the key log.

    Returns:
        (u, dim) float32 rows; the default vector for ids without a row.
    """
    insert = training and not table.read_only
    slots = table.lookup_slots(unique_ids, counts, insert=insert, strings=strings,
                               string_ids=string_ids)
    if insert and table.trainable and torch.is_grad_enabled():
        return _GatherRows.apply(anchor, table, unique_ids, slots)
    return table.gather(slots)
