"""DynamicEmbeddingBag: pooled bags of keys (sum, mean or max), like nn.EmbeddingBag."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dynembed.kernels.hash_index import unique_inverse
from dynembed.keys.convert import KeyBatch, to_jagged
from dynembed.nn._autograd import rows_for
from dynembed.nn._base import SingleTableModule
from dynembed.table.config import TableConfig
from dynembed.table.table import DynamicTable

POOLING_MODES = ("sum", "mean", "max")


def check_mode(mode: str, arg: str = "mode") -> None:
    """Raises ValueError unless ``mode`` is a pooling mode."""
    if mode not in POOLING_MODES:
        raise ValueError(f"{arg} must be one of {POOLING_MODES}, got {mode!r}")


def pool(rows: torch.Tensor, inverse: np.ndarray, bounds: np.ndarray, mode: str,
         per_sample_weights=None, arg: str = "per_sample_weights") -> torch.Tensor:
    """Pools rows per bag with torch's fused kernel.

    Args:
        rows: (u, dim) rows of the distinct ids.
        inverse: (n,) int64 index into ``rows`` of each value.
        bounds: (B + 1,) int64 bag boundaries.
        mode: "sum", "mean" or "max".
        per_sample_weights: optional (n,) float weights (mode "sum" only).
        arg: the weights' name in error messages.

    Returns:
        (B, dim); empty bags give zeros.

    Raises:
        ValueError: per_sample_weights with the wrong shape or a mode other than "sum".
    """
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"{arg} needs mode='sum', got mode={mode!r}")
        per_sample_weights = torch.as_tensor(per_sample_weights)
        if not per_sample_weights.dtype.is_floating_point:
            raise TypeError(f"{arg} must be floating point, got {per_sample_weights.dtype}")
        if tuple(per_sample_weights.shape) != (inverse.shape[0],):
            raise ValueError(f"{arg} must have shape ({inverse.shape[0]},), one weight per "
                             f"value, got {tuple(per_sample_weights.shape)}")
        per_sample_weights = per_sample_weights.to(rows.dtype)
    if rows.shape[0] == 0:  # only empty bags: embedding_bag needs a non-empty weight
        # + rows.sum() (a zero) keeps the result in the graph, so backward() still works
        return rows.new_zeros((bounds.shape[0] - 1, rows.shape[1])) + rows.sum()
    return F.embedding_bag(torch.from_numpy(inverse), rows, torch.from_numpy(bounds),
                           mode=mode, per_sample_weights=per_sample_weights,
                           include_last_offset=True)


class DynamicEmbeddingBag(SingleTableModule):
    """Like ``torch.nn.EmbeddingBag`` with no vocabulary.

    Args:
        dim: row width; other keywords are :class:`TableConfig` fields.
        mode: "sum", "mean" or "max".
        config: a whole :class:`TableConfig` instead of ``dim`` and options.
        table: an existing :class:`DynamicTable` to share instead.

    Example:
        >>> bag = de.DynamicEmbeddingBag(dim=16, mode="sum")
        >>> bag([["red", "shoe"], ["shoe"], []]).shape
        torch.Size([3, 16])
    """

    def __init__(self, dim: int | None = None, *, mode: str = "mean",
                 config: TableConfig | None = None, table: DynamicTable | None = None,
                 **options) -> None:
        check_mode(mode)
        super().__init__(dim, table, config, options)
        self.mode = mode

    def forward(self, values, offsets=None, per_sample_weights=None, *,
                include_last_offset: bool = False) -> torch.Tensor:
        """Pools each bag's rows.

        Args:
            values: (n,) flat keys with ``offsets``; a list of lists of keys; or a (B, L)
                integer tensor of fixed-size bags.
            offsets: (B,) start of each bag in ``values`` (or (B + 1,) with
                ``include_last_offset``).
            per_sample_weights: optional (n,) float weights, mode "sum" only.
            include_last_offset: as in ``torch.nn.EmbeddingBag``.

        Returns:
            (B, dim) float32.

        Raises:
            KeyInputError, KeyValueError: bad keys, nesting deeper than bags of keys, or
                offsets that do not match the values.
        """
        batch, bounds = to_jagged(values, offsets, include_last_offset=include_last_offset,
                                  hash_seed=self.table.config.hash_seed)
        return self._pool(batch, bounds, per_sample_weights)

    def _pool(self, batch: KeyBatch, bounds: np.ndarray, per_sample_weights) -> torch.Tensor:
        unique, inverse, counts = unique_inverse(batch.ids)
        rows = rows_for(self.table, self._anchor, unique, counts, training=self.training,
                        strings=batch.strings, string_ids=batch.ids)
        return pool(rows, inverse, bounds, self.mode, per_sample_weights)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}, rows={self.table.size()}"
