"""Distributed tables: rows sharded across the ranks of a torchrun job by key bucket.

    plan = de.distributed.shard_model(model)      # after init_process_group, on every rank
    out = model(batch)                            # lookups route ids to their owners

Most jobs use :class:`dynembed.train.Runtime`, which starts the process group, shards the
tables, wraps the dense part in DistributedDataParallel and checkpoints.
"""

from dynembed.distributed.exchange import Exchange, Traffic
from dynembed.distributed.plan import (
    ShardPlan,
    check_same_tables,
    shard_model,
    unshard_model,
)
from dynembed.distributed.process_group import JobEnv, init_process_group
from dynembed.distributed.router import Lookup, Router

__all__ = [
    "Exchange",
    "JobEnv",
    "Lookup",
    "Router",
    "ShardPlan",
    "Traffic",
    "check_same_tables",
    "init_process_group",
    "shard_model",
    "unshard_model",
]
