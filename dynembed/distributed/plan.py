"""shard_model(): turn a model's dynamic tables into a distributed job's sharded tables.

Every rank builds the same model, then calls :func:`shard_model` (the training runtime
does). It checks that all ranks built the same tables (a mismatch fails on every rank with
one message, instead of a hang or silently different rows), agrees on the tables' seeds,
and attaches a router to each table: sharded by key bucket, or replicated for tables with
``placement="replicated"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from dynembed.distributed.exchange import Exchange, Traffic
from dynembed.distributed.router import Router
from dynembed.errors import ConfigMismatchError
from dynembed.keys.buckets import (
    NUM_BUCKETS,
    bucket_of_hash,
    check_num_buckets,
    rank_buckets,
)
from dynembed.nn._base import named_tables
from dynembed.table.table import DynamicTable


@dataclass
class ShardPlan:
    """The tables of a sharded model and the exchange their rows travel through."""

    exchange: Exchange
    sharded: dict[str, DynamicTable]
    replicated: dict[str, DynamicTable]

    @property
    def traffic(self) -> Traffic:
        """Bytes this rank exchanged for lookups and gradients so far."""
        return self.exchange.traffic


def _describe(value) -> str:
    """``repr(value)``, but the same in every process: a function's repr holds its address,
    which differs per process, so a policy holding one (``ScoreFunction(fn=...)``) would
    never match across ranks. Functions are named by module and qualified name instead."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_describe(getattr(value, f.name))}"
                           for f in dataclasses.fields(value) if f.repr)
        return f"{type(value).__qualname__}({fields})"
    if isinstance(value, functools.partial):
        args = [_describe(a) for a in value.args]
        args += [f"{k}={_describe(v)}" for k, v in sorted(value.keywords.items())]
        return f"functools.partial({', '.join([_describe(value.func), *args])})"
    if callable(value) and hasattr(value, "__qualname__") and not isinstance(value, type):
        return f"{getattr(value, '__module__', None)}.{value.__qualname__}"
    return repr(value)


def _fingerprint(table: DynamicTable, num_buckets: int) -> dict[str, str]:
    """What must be equal on every rank for the table's rows to mean the same thing."""
    c = table.config
    out = {"num_buckets": str(num_buckets),  # who owns a key
           "dim": str(table.dim), "state width": str(table.arena.state_width),
           "optimizer": _describe(c.optimizer), "initializer": _describe(c.initializer),
           "hash_seed": str(c.hash_seed), "placement": c.placement,
           "update_mode": c.update_mode, "admission": _describe(c.admission),
           "key_log": str(c.key_log), "read_only": str(c.read_only),
           "default_value": repr(c.default_value), "nonfinite_grads": c.nonfinite_grads,
           "padding key id": str(table.padding_id),
           "eviction": _describe(c.eviction)}
    # Memory budgets and stores stay per rank: machines may differ, and each rank's store
    # has its own path or namespace. But a replica without a store discards what its limit
    # or its sweeps for expired rows evict, so replicas whose limits or sweeps differ would
    # hold different rows.
    if c.placement == "replicated" and c.store is None:
        out["row limit (max_rows / memory_budget) of a replica without a store"] = \
            str(table.max_rows)
        out["evict_every of a replica without a store"] = str(c.evict_every)
        out["sweep_rows of a replica without a store"] = str(c.sweep_rows)
    if c.seed is not None:
        out["seed"] = str(c.seed)
    return out


def check_same_tables(tables: dict[str, DynamicTable], group=None, *,
                      num_buckets: int = NUM_BUCKETS) -> None:
    """Raises on every rank unless all ranks have the same tables, and no sharded table
    already holds rows that another rank owns.

    Raises:
        ConfigMismatchError: names every difference: table names, then fields by table.
        ValueError: a rank's sharded table holds rows of other ranks' buckets (named).
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = {name: _fingerprint(table, num_buckets) for name, table in sorted(tables.items())}
    foreign = [name for name, table in sorted(tables.items())
               if table.config.placement != "replicated"
               and _holds_foreign_rows(table, rank, world_size, num_buckets)]
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, (mine, foreign), group=group)
    holders = [f"rank {r}: {names}" for r, (_, names) in enumerate(everyone) if names]
    everyone = [fingerprints for fingerprints, _ in everyone]
    problems = []
    reference = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        if sorted(theirs) != sorted(reference):
            problems.append(f"rank 0 has tables {sorted(reference)} but rank {rank} has "
                            f"{sorted(theirs)}")
            continue
        for name, fields in theirs.items():
            for field in sorted(set(fields) | set(reference[name])):
                a, b = reference[name].get(field), fields.get(field)
                if a != b:
                    problems.append(f"table {name!r}: {field} is {a} on rank 0 but {b} on "
                                    f"rank {rank}")
    if problems:
        raise ConfigMismatchError(
            "the ranks of this job built different tables: " + "; ".join(problems[:8])
            + ("; ..." if len(problems) > 8 else "")
            + ". Every rank must build the same model (the same TableConfig per table): "
            "check per-rank arguments and config files")
    if holders:  # raised on every rank: one rank alone would leave the others waiting
        raise ValueError(f"tables already hold rows of other ranks' buckets ({'; '.join(holders)}"
                         "); shard the model before training it, then restore checkpoints "
                         "(each rank loads only its buckets)")


def _agree_on_seeds(tables: dict[str, DynamicTable], group) -> None:
    """Tables without a configured seed drew one per process; take rank 0's everywhere so a
    key's initial vector is the same whichever rank creates it."""
    seeds = [t.seed for _, t in sorted(tables.items())]
    holder = [seeds]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    for (_, table), seed in zip(sorted(tables.items()), holder[0]):
        if table.seed != seed:
            table.seed = seed
            if table.admitter is not None:
                table.admitter = table.config.admission.create(seed)


def _holds_foreign_rows(table: DynamicTable, rank: int, world_size: int,
                        num_buckets: int) -> bool:
    """Whether the table's memory or lazily opened checkpoint holds rows of buckets this
    rank does not own. (A store is not scanned: that can take long, and a shared store
    holds the other shards' rows by design.)"""
    own = rank_buckets(rank, world_size, num_buckets)
    base = table.base
    if base is not None and any(base.layers) and (
            base.num_buckets != num_buckets
            or base.buckets.start < own.start or base.buckets.stop > own.stop):
        return True  # a checkpoint opened lazily before sharding: its rows are all here
    if table.size() == 0:
        return False
    buckets = bucket_of_hash(table.index.bucket_hashes(), num_buckets)
    return bool(buckets.min() < own.start or buckets.max() >= own.stop)


def shard_model(model: nn.Module, *, group=None, num_buckets: int = NUM_BUCKETS,
                timeout: float = 300.0) -> ShardPlan:
    """Makes the dynamic tables of ``model`` the shards of a distributed job.

    Call it on every rank after ``torch.distributed.init_process_group`` and before the
    first lookup. From then on every module lookup is a collective: every rank must look up
    the same modules in the same order, with the same mode (train or eval), and back-propagate
    through every training lookup.

    Args:
        model: the model holding the tables (the same on every rank).
        group: the process group of the job (None: the default group), of any backend:
            the checks and row exchanges run in a gloo group of the same ranks.
        num_buckets: key buckets (must match the checkpoints'; a power of two).
        timeout: seconds a row exchange may wait for other ranks before failing.

    Returns:
        The :class:`ShardPlan` (tables by placement, traffic counters).

    Raises:
        ConfigMismatchError: ranks built different tables (raised on every rank).
        ValueError: a sharded table already holds rows other ranks own (raised on every
            rank); a bad ``timeout`` or ``num_buckets``.
        TypeError: ``model`` is not a torch module.
        RuntimeError: torch.distributed is not initialised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module holding dynembed tables, got "
                        f"{type(model).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialised; use "
                           "de.train.Runtime, or call torch.distributed.init_process_group")
    check_num_buckets(num_buckets)
    tables = named_tables(model)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    ranks = None if group is None else dist.get_process_group_ranks(group)
    # every collective of dynembed's own goes over gloo: the tables' rows and checks live on
    # the CPU, which the job's group may not serve (NCCL moves objects to the current GPU)
    exchange_group = dist.new_group(ranks=ranks, backend="gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
    try:
        check_same_tables(tables, exchange_group, num_buckets=num_buckets)
        _agree_on_seeds(tables, exchange_group)
    except BaseException:
        dist.destroy_process_group(exchange_group)
        raise
    exchange = Exchange(exchange_group, rank, world_size)
    plan = ShardPlan(exchange, {}, {})
    router = Router(exchange, num_buckets=num_buckets, tables=tables)
    for name, table in tables.items():
        if table.config.placement == "replicated":
            plan.replicated[name] = table
        else:
            plan.sharded[name] = table
            if table.tier is not None and table.tier.store.shared:
                # the other shards keep their rows in the same store
                table.tier.owned = (rank_buckets(rank, world_size, num_buckets), num_buckets)
        table.router = router
    return plan


def unshard_model(model: nn.Module) -> None:
    """Detaches the routers: the tables answer lookups from their local rows again."""
    for table in named_tables(model).values():
        table.router = None
        if table.tier is not None:
            table.tier.owned = None

