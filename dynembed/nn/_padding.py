"""The padding key (``TableConfig.padding_key``): dropped from a batch before its lookup.

A pad never reaches the table, so it gets no row, no gradient and no count, whatever the
mode; the modules put zeros where it stood (keyed lookups) or pool the other keys (bags),
as ``torch.nn.Embedding(Bag)`` with ``padding_idx`` do.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dynembed.keys.convert import KeyBatch


def drop_padding(batch: KeyBatch, padding_id: int | None) -> tuple[KeyBatch, np.ndarray | None]:
    """The batch without its padding keys.

    Args:
        batch: the converted keys.
        padding_id: the table's padding id, or None.

    Returns:
        (kept, keep): ``kept`` holds the other keys, flat, in order; ``keep`` is the (n,)
        bool mask of them in ``batch.ids``, or None (and ``kept`` is ``batch``) when the
        batch has no padding key.
    """
    if padding_id is None or batch.ids.size == 0:
        return batch, None
    keep = batch.ids != padding_id
    if keep.all():
        return batch, None
    strings = batch.strings
    if strings is not None:  # the key log's strings, by position like the ids
        strings = np.asarray(strings, dtype=object)[keep].tolist()
    ids = batch.ids[keep]
    return dataclasses.replace(batch, ids=ids, shape=ids.shape, strings=strings), keep


def drop_padding_from_bags(batch: KeyBatch, bounds: np.ndarray, weights: torch.Tensor | None,
                           padding_id: int | None):
    """Bags without their padding keys (and the weights of those keys).

    Args:
        batch: the flat keys of every bag.
        bounds: (B + 1,) int64 bag boundaries in ``batch.ids``.
        weights: (n,) per-key weights or None.
        padding_id: the table's padding id, or None.

    Returns:
        (batch, bounds, weights) of the kept keys; the same bags, fewer keys in each.
    """
    kept, keep = drop_padding(batch, padding_id)
    if keep is None:
        return batch, bounds, weights
    before = np.zeros(keep.shape[0] + 1, dtype=np.int64)  # kept keys before each position
    np.cumsum(keep, out=before[1:])
    if weights is not None:
        weights = weights[torch.from_numpy(keep).to(weights.device)]
    return kept, before[bounds], weights


def restore_padding(rows: torch.Tensor, keep: np.ndarray | None) -> torch.Tensor:
    """(n, dim) rows with zeros where the padding keys stood (differentiable in ``rows``).

    Args:
        rows: (k, dim) rows of the kept keys, in order.
        keep: (n,) bool mask of the kept keys (from :func:`drop_padding`), or None.
    """
    if keep is None:
        return rows
    out = rows.new_zeros((keep.shape[0], rows.shape[1]))
    return out.index_copy(0, torch.from_numpy(np.flatnonzero(keep)), rows)
