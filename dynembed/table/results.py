"""Named results of the table verbs."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FindResult(NamedTuple):
    """Result of :meth:`DynamicTable.find`.

    Attributes:
        values: (n, dim) float32 rows; the default vector where not found.
        found: (n,) bool, whether each key had a row.
    """

    values: torch.Tensor
    found: torch.Tensor


class InsertResult(NamedTuple):
    """Result of :meth:`DynamicTable.find_or_insert`.

    Attributes:
        values: (n, dim) float32 rows (new rows hold their initial vectors).
        inserted: (n,) bool, whether each key's row was created by this call.
    """

    values: torch.Tensor
    inserted: torch.Tensor


class TableExport(NamedTuple):
    """Live rows of a table, in slot order (see :meth:`DynamicTable.export`).

    Attributes:
        ids: (r,) int64 ids.
        weights: (r, dim) float32 vectors.
        optimizer_state: (r, state_width) float32 optimizer state.
        counts: (r,) int64 times each key was looked up in training.
        last_step: (r,) int64 table step at which each key was last looked up in training
            (a row inserted without training: the step after its insert).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    optimizer_state: torch.Tensor
    counts: torch.Tensor
    last_step: torch.Tensor
