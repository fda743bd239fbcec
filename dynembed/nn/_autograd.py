"""The bridge between a table and autograd: gather rows forward, update rows backward."""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from dynembed._caller import warn_at_caller
from dynembed.kernels.gather import segment_sum
from dynembed.optim.adam import Adam
from dynembed.optim.sgd import SGD
from dynembed.table.arena import take_rows
from dynembed.table.table import DynamicTable


def _gather(table: DynamicTable, slots: np.ndarray, inverse: np.ndarray | None) -> torch.Tensor:
    """(u, dim) rows at ``slots``, or (n, dim) ``rows[inverse]`` with ``inverse``.

    Gathering the distinct rows first and expanding them from that compact copy (which
    stays in cache) is faster than gathering every key's row from the scattered arena.
    """
    rows = table.gather(slots)
    return rows if inverse is None else take_rows(rows, inverse)


_STEPPED_IN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Fused table -> (the autograd graph task, i.e. the ``backward()`` call, that last stepped
it; the ids of its first step in that task, None once a second step was checked)."""
_WARNED_TWICE: weakref.WeakSet = weakref.WeakSet()
"""Tables warned about by :func:`note_fused_step` (once each)."""


def _steps_add_up(optimizer) -> bool:
    """Whether any two steps on gradients taken at the same weights equal one step on their
    sum: plain SGD (no momentum, weight decay or clipping)."""
    return (isinstance(optimizer, SGD) and optimizer.momentum == 0
            and optimizer.weight_decay == 0 and optimizer.max_grad_norm is None)


def _counts_steps(optimizer) -> bool:
    """Whether the optimizer's update depends on the table's step count (Adam's bias
    correction, Adagrad's lr_decay): two steps then differ from one even on other rows."""
    return isinstance(optimizer, Adam) or bool(getattr(optimizer, "lr_decay", 0))


def note_fused_step(table: DynamicTable, ids: np.ndarray) -> None:
    """Warns once per table when one ``backward()`` steps it twice in a way that differs from
    torch's one step on the summed gradient: two lookups of it in one graph, in fused mode,
    where each lookup's backward is its own optimizer step (the README said so, but nothing
    told a user whose two-tower or tied-embedding model did it).

    The first two steps of a backward are compared (the ids of the first are kept until
    then): they differ where a row is in both, or always for an optimizer that counts steps.
    Later steps of the same backward are not checked, so a long chain of lookups (one per
    time step of a sequence) costs nothing more.
    """
    if table.config.update_mode != "fused" or table in _WARNED_TWICE \
            or _steps_add_up(table.optimizer):
        return
    task = torch._C._current_graph_task_id()
    last = _STEPPED_IN.get(table)
    if last is None or last[0] != task:
        _STEPPED_IN[table] = (task, ids)
        return
    first = last[1]
    if first is None:  # the first two steps of this backward were checked already
        return
    _STEPPED_IN[table] = (task, None)
    if _counts_steps(table.optimizer) or np.isin(ids, first).any():
        _WARNED_TWICE.add(table)
        warn_at_caller(
            f"one backward() stepped a dynembed table (dim={table.dim}, "
            f"{type(table.optimizer).__name__}) twice: it was looked up twice in this graph, "
            "and in update_mode='fused' (the default) each lookup's backward is its own "
            "optimizer step, not one step on the summed gradient as torch takes. Look the "
            "keys up in one call (concatenated), or use update_mode='deferred' with "
            "de.sparse_step(model)")


def anchor_grad(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (empty) gradient of a module's anchor: every backward of a lookup gives one, so
    DistributedDataParallel sees the anchor Parameter used, as any other."""
    return torch.empty(0, dtype=dtype, device=device)


class _GatherRows(torch.autograd.Function):
    """Rows of distinct ids (or of every key) as a dense tensor; backward updates the table.

    Rows are not ``nn.Parameter`` s (the table grows and reuses slots), so the output is tied
    into the graph through ``anchor``, a zero-size tensor that requires grad. With
    ``inverse`` the output has one row per key, and backward sums the gradients of
    duplicate keys (a compiled segment sum) before the update.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, table: DynamicTable, ids: np.ndarray,
                slots: np.ndarray, inverse: np.ndarray | None) -> torch.Tensor:
        ctx.table, ctx.ids, ctx.slots, ctx.inverse = table, ids, slots, inverse
        ctx.anchor = (anchor.dtype, anchor.device)
        ctx.erasures = table.erasures
        ctx.marks = table.changes.resets  # the lookup marked the slots changed
        return _gather(table, slots, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        note_fused_step(ctx.table, ctx.ids)
        if ctx.inverse is not None:
            grad = grad.detach().to(torch.float32).contiguous().numpy()
            grad = torch.from_numpy(segment_sum(grad, ctx.inverse, ctx.ids.shape[0]))
        ctx.table.apply_gradients(ctx.ids, ctx.slots, grad, erasures_at_lookup=ctx.erasures,
                                  marked_at=ctx.marks)
        return anchor_grad(*ctx.anchor), None, None, None, None


class _IndexRows(torch.autograd.Function):
    """``rows[inverse]`` whose backward sums duplicate gradients in a compiled pass.

    torch's embedding backward is general (sorting, any index range); here indices are
    dense in [0, u) so a direct segment sum is several times faster.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, inverse: np.ndarray) -> torch.Tensor:
        ctx.inverse, ctx.segments = inverse, rows.shape[0]
        return take_rows(rows, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.detach().to(torch.float32).contiguous().numpy()
        summed = segment_sum(grad, ctx.inverse, ctx.segments)
        return torch.from_numpy(summed), None


def index_rows(rows: torch.Tensor, inverse: np.ndarray) -> torch.Tensor:
    """(n, dim) ``rows[inverse]``, differentiable with respect to ``rows``.

    Args:
        rows: (u, dim) rows of distinct ids.
        inverse: (n,) int64 row of each key.
    """
    if rows.requires_grad:
        return _IndexRows.apply(rows, inverse)
    return take_rows(rows, inverse)


class Lookup(NamedTuple):
    """One table's part of a module's lookup call (what a distributed router serves)."""

    table: DynamicTable
    ids: np.ndarray
    """(u,) int64 distinct ids."""
    counts: np.ndarray
    """(u,) int64 occurrences of each."""
    strings: list | None = None
    """The call's original string keys, for the key log ..."""
    string_ids: np.ndarray | None = None
    """... and their ids."""


def rows_for_many(lookups: list[Lookup], anchor: torch.Tensor, *,
                  training: bool) -> list[torch.Tensor]:
    """Rows of several tables' distinct ids for one module call: (u_t, dim_t) each.

    Tables of a distributed job are served together by their router (a fixed number of
    collectives for all of them); the others one by one (see :func:`rows_for`).
    """
    out: list[torch.Tensor | None] = [None] * len(lookups)
    routed: dict[int, list[int]] = {}
    for i, lk in enumerate(lookups):
        if lk.table.router is not None:
            routed.setdefault(id(lk.table.router), []).append(i)
        else:
            out[i] = rows_for(lk.table, anchor, lk.ids, lk.counts, training=training,
                              strings=lk.strings, string_ids=lk.string_ids)
    for which in routed.values():
        router = lookups[which[0]].table.router
        for i, rows in zip(which, router.rows_many([lookups[i] for i in which], anchor,
                                                   training=training)):
            out[i] = rows
    return out


_WARNED_LOCAL: weakref.WeakSet = weakref.WeakSet()
"""Tables warned about by :func:`_warn_if_local_in_a_job` (once each)."""


def _warn_if_local_in_a_job(table: DynamicTable) -> None:
    """Warns once per table that trains on its own in a process group of several ranks: a
    model wrapped in plain DistributedDataParallel (not shard_model / Runtime.prepare)
    trained a different copy of the table on every rank, and a rank's checkpoint then held
    only its own keys, silently."""
    if table in _WARNED_LOCAL or not dist.is_available() or not dist.is_initialized() \
            or dist.get_world_size() < 2:
        return
    _WARNED_LOCAL.add(table)
    warnings.warn(
        f"a dynembed table trains on its own on rank {dist.get_rank()} of "
        f"{dist.get_world_size()}: its rows are not sharded or replicated, so every rank "
        "trains a different copy (DistributedDataParallel syncs Parameters only). Call "
        "de.distributed.shard_model(model) (or Runtime.prepare) before training; a table "
        "meant to stay local is a separate model", stacklevel=4)


def rows_for(table: DynamicTable, anchor: torch.Tensor, unique_ids: np.ndarray,
             counts: np.ndarray, *, training: bool, inverse: np.ndarray | None = None,
             strings=None, string_ids: np.ndarray | None = None) -> torch.Tensor:
    """Looks up distinct ids and returns their rows, differentiable when training.

    Args:
        table: the table.
        anchor: the module's zero-size grad anchor.
        unique_ids: (u,) int64 distinct ids.
        counts: (u,) int64 occurrences of each id.
        training: module is training: insert missing rows and track gradients.
        inverse: optional (n,) int64 index into ``unique_ids`` of each key; with it the
            result has one row per key.
        strings, string_ids: original string keys and their ids, for the key log.

    Returns:
        (u, dim) float32 rows, or (n, dim) with ``inverse``; the default vector for ids
        without a row.
    """
    if table.router is not None:  # a distributed job: the rows live on their owners
        rows = table.router.rows(table, anchor, unique_ids, counts, training=training,
                                 strings=strings, string_ids=string_ids)
        return rows if inverse is None else index_rows(rows, inverse)
    insert = training and not table.read_only
    if not insert:  # evaluation: read rows, never change the table
        rows = table.read_unique(unique_ids, counts)
        return rows if inverse is None else take_rows(rows, inverse)
    if insert and table.trainable:
        _warn_if_local_in_a_job(table)
    slots = table.lookup_slots(unique_ids, counts, insert=insert, strings=strings,
                               string_ids=string_ids)
    if insert and table.trainable and anchor.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(anchor, table, unique_ids, slots, inverse)
    return _gather(table, slots, inverse)
