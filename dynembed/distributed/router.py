"""Routers: how a module's lookup reaches rows that live on other ranks.

A :class:`ShardedRouter` sends each distinct id to the rank that owns its key bucket; the
owner merges the requests of all ranks (so a key's count and its one optimizer update cover
the whole global batch), looks the ids up in its table shard and sends the rows back.
Backward sends each row's gradient to the owner, which sums the parts and applies the
sparse optimizer once.

A :class:`ReplicatedRouter` keeps every row on every rank: a training lookup all-gathers the
ranks' ids so every replica inserts and touches the same rows, and backward all-gathers the
gradients so every replica applies the same update. Evaluation reads the local replica.

Gradients are averaged over ranks (scaled by 1/W, as DDP averages dense gradients), so a job
of W ranks with a global batch of B trains like one process with batch B.
"""

from __future__ import annotations

import numpy as np
import torch

from dynembed.distributed.exchange import Exchange
from dynembed.kernels.gather import segment_sum
from dynembed.kernels.hash_index import unique_inverse
from dynembed.keys.buckets import NUM_BUCKETS, buckets_of, rank_of_bucket
from dynembed.table.arena import take_rows
from dynembed.table.table import DynamicTable


def _merge(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ids of several ranks' requests, their inverse, and summed counts."""
    unique, inverse, _ = unique_inverse(ids)
    summed = np.bincount(inverse, weights=counts, minlength=unique.shape[0])
    return unique, inverse, summed.astype(np.int64)


def _log_strings(table: DynamicTable, strings, string_ids) -> None:
    # The requesting rank logs its own string keys (the owner never sees the strings);
    # checkpoints merge every rank's log.
    if table.key_log is not None and strings is not None and len(strings):
        table.key_log.add(string_ids, strings)


class _Lookup:
    """What one training lookup needs again in backward."""

    def __init__(self, table: DynamicTable, ids: np.ndarray, slots: np.ndarray,
                 inverse: np.ndarray, erasures: int) -> None:
        self.table, self.ids, self.slots, self.inverse = table, ids, slots, inverse
        self.erasures = erasures

    def apply(self, grads: torch.Tensor, scale: float) -> None:
        """Sums the gradient parts of each id and updates the rows."""
        summed = segment_sum(grads.to(torch.float32).contiguous().numpy(), self.inverse,
                             self.ids.shape[0])
        if scale != 1.0:
            summed *= np.float32(scale)
        self.table.apply_gradients(self.ids, self.slots, torch.from_numpy(summed),
                                   erasures_at_lookup=self.erasures)


class _RoutedRows(torch.autograd.Function):
    """Rows fetched by a router; backward hands the gradient back to the router."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, fetched: tuple) -> torch.Tensor:
        rows, ctx.route_backward = fetched  # a tuple: autograd does not see rows as an input
        return rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.route_backward(grad)
        return None, None


class ShardedRouter:
    """Routes a table's lookups to the owners of the ids' buckets.

    Args:
        exchange: the collectives of the job's row-exchange group.
        num_buckets: key buckets (the checkpoints' unit; rank r owns a contiguous range).
        grad_scale: factor on the summed gradient of each row (1/W: the average over ranks,
            matching DDP).
    """

    placement = "sharded"

    def __init__(self, exchange: Exchange, *, num_buckets: int = NUM_BUCKETS,
                 grad_scale: float | None = None) -> None:
        self.exchange = exchange
        self.num_buckets = num_buckets
        self.grad_scale = 1.0 / exchange.world_size if grad_scale is None else grad_scale

    def owners(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 rank owning each of (n,) int64 ids."""
        return rank_of_bucket(buckets_of(ids, self.num_buckets), self.exchange.world_size,
                              self.num_buckets)

    def rows(self, table: DynamicTable, anchor: torch.Tensor, unique_ids: np.ndarray,
             counts: np.ndarray, *, training: bool, strings=None,
             string_ids: np.ndarray | None = None) -> torch.Tensor:
        """Rows of this rank's distinct ids, fetched from their owners.

        Every rank must call it for the same lookups in the same order (a collective).

        Args:
            table: this rank's shard of the table.
            anchor: the module's grad anchor.
            unique_ids: (u,) int64 distinct ids; counts: (u,) their occurrences.
            training: insert missing rows and track gradients (the module's mode).
            strings, string_ids: original string keys, for the key log.

        Returns:
            (u, dim) float32, differentiable when training with grad enabled.
        """
        ex = self.exchange
        order = np.argsort(self.owners(unique_ids), kind="stable")
        send = np.bincount(self.owners(unique_ids[order]), minlength=ex.world_size)
        recv = ex.splits(send)
        request = torch.from_numpy(np.stack([unique_ids[order], counts[order]], axis=1))
        got = ex.all_to_all(request, send, recv).numpy()
        ids, inverse, merged = _merge(got[:, 0].copy(), got[:, 1].copy())
        insert = training and not table.read_only
        if insert:
            slots = table.lookup_slots(ids, merged, insert=True)
            owned = table.gather(slots)
            _log_strings(table, strings, string_ids)
        else:
            slots, owned = None, table.read_unique(ids, merged)
        back = ex.all_to_all(take_rows(owned, inverse), recv, send)
        rows = torch.empty_like(back)
        rows[torch.from_numpy(order)] = back
        if not (insert and table.trainable and torch.is_grad_enabled()):
            return rows
        lookup = _Lookup(table, ids, slots, inverse, table.erasures)

        def backward(grad: torch.Tensor) -> None:
            parts = ex.all_to_all(grad.to(torch.float32)[torch.from_numpy(order)], send, recv)
            lookup.apply(parts, self.grad_scale)

        return _RoutedRows.apply(anchor, (rows, backward))


class ReplicatedRouter:
    """Keeps a (small) table whole on every rank, in step.

    Args:
        exchange: the collectives of the job's row-exchange group.
        grad_scale: factor on the summed gradient of each row (default 1/W).
    """

    placement = "replicated"

    def __init__(self, exchange: Exchange, *, grad_scale: float | None = None) -> None:
        self.exchange = exchange
        self.grad_scale = 1.0 / exchange.world_size if grad_scale is None else grad_scale

    def rows(self, table: DynamicTable, anchor: torch.Tensor, unique_ids: np.ndarray,
             counts: np.ndarray, *, training: bool, strings=None,
             string_ids: np.ndarray | None = None) -> torch.Tensor:
        """Rows of this rank's distinct ids from the local replica (see
        :meth:`ShardedRouter.rows` for the arguments). Training lookups are collectives;
        evaluation is local."""
        if not training or table.read_only:
            return table.read_unique(unique_ids, counts)
        ex = self.exchange
        request = torch.from_numpy(np.stack([unique_ids, counts], axis=1))
        everyone, sizes = ex.all_gather(request)
        everyone = everyone.numpy()
        ids, inverse, merged = _merge(everyone[:, 0].copy(), everyone[:, 1].copy())
        slots = table.lookup_slots(ids, merged, insert=True)  # the same on every replica
        _log_strings(table, strings, string_ids)
        start = int(sizes[:ex.rank].sum())
        rows = table.gather(slots[inverse[start:start + unique_ids.shape[0]]])
        if not (table.trainable and torch.is_grad_enabled()):
            return rows
        lookup = _Lookup(table, ids, slots, inverse, table.erasures)

        def backward(grad: torch.Tensor) -> None:
            parts, _ = ex.all_gather(grad.to(torch.float32).contiguous())
            lookup.apply(parts, self.grad_scale)

        return _RoutedRows.apply(anchor, (rows, backward))
