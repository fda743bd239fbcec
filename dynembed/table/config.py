"""TableConfig: everything that defines a dynamic table, validated on construction."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dynembed._args import check_bool
from dynembed._caller import warn_at_caller
from dynembed.keys.hashing import (
    DEFAULT_HASH_SEED,
    check_hash_seed,
    hash_bytes,
    hash_strings,
)
from dynembed.optim.base import SparseOptimizer
from dynembed.policy.admission import AdmissionPolicy
from dynembed.policy.eviction import EvictionPolicy
from dynembed.policy.initializers import Initializer, Uniform
from dynembed.storage.base import EmbeddingStore
from dynembed.table.budget import parse_bytes
from dynembed.table.tiering import WRITE_POLICIES

PLACEMENTS = ("sharded", "replicated")
"""Values of :attr:`TableConfig.placement`."""

UPDATE_MODES = ("fused", "deferred")
NONFINITE_POLICIES = ("raise", "skip")


MAX_DIM = 1 << 20
"""Widest row a table takes (4 MiB of float32 weights per row): far past any embedding in use,
low enough that a typo such as ``dim=2**40`` is refused here, not by the allocator."""

_INT_FIELDS = ("dim", "seed", "hash_seed", "initial_capacity", "max_rows", "evict_every",
               "sweep_rows")
"""Fields given as numpy integers are turned into Python ints."""


@dataclass(kw_only=True, frozen=True)
class TableConfig:
    """Configuration of one dynamic table, checked when made and frozen after (a field set
    later would skip the checks; ``dataclasses.replace(config, dim=32)`` makes a checked
    copy).

    Raises:
        ValueError: a field has a bad value (a number of the wrong type too, e.g.
            ``dim="16"``); the message names the field.
        TypeError: a field that takes an object (optimizer, initializer, policy, store)
            gets another type.
    """

    dim: int
    """Width of each row (embedding dimension), in [1, MAX_DIM]."""
    optimizer: SparseOptimizer | None = None
    """Sparse update rule for the rows; None freezes the table (outputs need no grad)."""
    initializer: Initializer = field(default_factory=Uniform)
    """How new rows start; the default is uniform in [-1/sqrt(dim), 1/sqrt(dim)) (cheap to
    draw, so inserts stay fast)."""
    seed: int | None = None
    """Initializer seed; a key's initial vector depends only on (seed, key). None draws one
    from torch's global generator when the table is made (so torch.manual_seed fixes it)."""
    hash_seed: int = DEFAULT_HASH_SEED
    """Seed of the string -> id hash (XXH64). Tables that must agree on ids share it."""
    default_value: float | Sequence[float] = 0.0
    """Vector returned for unseen keys in eval or read-only mode: a number or dim numbers."""
    padding_key: int | str | bytes | None = None
    """A key that stands for no key, as ``torch.nn.Embedding``'s ``padding_idx``: the pad of
    padded (B, L) batches. Module lookups never give it a row: it looks up as zeros, gets no
    gradient and is not counted (not a hit, miss or insert), and bags leave it out
    (``mode="mean"`` divides by the other keys; a bag of pads only is zeros). A str or bytes
    key hashes with ``hash_seed`` like any other. Table verbs (``find_or_insert``, ...)
    treat it as an ordinary key."""
    update_mode: str = "fused"
    """"fused": rows update inside backward (fastest). "deferred": backward queues the
    gradients and ``de.sparse_step(model)`` (``table.step_optimizer()``) applies them, for
    gradient accumulation. Fused, each lookup's backward is its own
    update, so a table looked up by several modules (or calls) in one step gets several
    updates; deferred sums them per key into one, as torch does for a shared
    ``nn.Embedding``. (``EmbeddingCollection`` features sharing a table are one lookup.)"""
    nonfinite_grads: str = "raise"
    """What a NaN/inf gradient row does: "raise" (nothing is applied) or "skip" (the row is
    left unchanged and counted in stats.skipped_gradients)."""
    read_only: bool = False
    """Serving mode: no inserts or updates in any mode; mutating verbs raise."""
    key_log: bool = False
    """Keep id -> original string for string keys, to list and export real keys. In a
    distributed job each rank's log holds the strings of its own rows (the ranks that
    looked them up send them); checkpoints merge every rank's log.

    The log lives in process memory, outside ``memory_budget`` / ``max_rows``, counted in
    ``stats().key_log_bytes``: 50 to 70 bytes plus the key's UTF-8 bytes per key (its
    buffers grow by doubling). It holds the key of every row the table holds: without a
    store, rows evicted to stay within the budget take their keys out of the log; with a
    ``store`` evicted rows stay in the table (in the store), and so do their keys however
    small the memory budget; erased and expired rows take theirs out. It is also saved
    whole in every checkpoint."""
    initial_capacity: int = 0
    """Rows to reserve up front (the table grows on demand anyway)."""
    device: str = "cpu"
    """Where rows live. Only "cpu" (or ``torch.device("cpu")``) is supported in this
    release."""
    admission: AdmissionPolicy | None = None
    """Which unseen keys get a row (None admits all). Keys not admitted get the default
    vector and no gradient; both are counted in stats."""
    eviction: EvictionPolicy | None = None
    """Which rows leave memory first (see de.policy.LRU, LFU, TTL, ScoreFunction). None
    means LRU when a budget is set, and no eviction otherwise."""
    memory_budget: str | int | None = None
    """Bytes the table's rows, index and bookkeeping may use: an int or a size such as
    "2GiB". Lookups past it evict the lowest-scoring rows (to the store if any)."""
    max_rows: int | None = None
    """The most rows memory may hold (with ``memory_budget``, the smaller limit applies)."""
    evict_every: int | None = None
    """Steps between sweeps that evict rows the policy calls expired (TTL, or ``min_score``
    of LFU / ScoreFunction). A sweep examines ``sweep_rows`` slots per lookup; with a
    store it also starts a pass over the store (unless one runs), which removes the
    store's expired rows ``sweep_rows // 16`` stored rows per lookup."""
    sweep_rows: int = 1 << 16
    """Slots a scheduled sweep examines per training lookup (bounds the pause); a pass
    over the store reads a 16th as many stored rows per lookup."""
    store: EmbeddingStore | None = None
    """Storage tier under memory (de.storage.RocksDBStore, RedisStore, MemoryStore): misses
    read through it and evicted rows are written to it. None keeps rows in memory only, and
    evicted rows are discarded (and counted)."""
    write_policy: str = "back"
    """"back": rows reach the store when evicted or flushed. "through": also right after
    every change of weights or optimizer state (optimizer updates, ``assign``,
    ``insert_or_assign``; slower). Either way new rows that nothing changed yet, and the
    lookup counts and steps, reach the store when evicted or flushed."""
    placement: str = "sharded"
    """Where a distributed job (``dynembed.distributed``) keeps the rows: "sharded" splits
    them across ranks by key bucket (each row on one rank); "replicated" keeps every row on
    every rank (for small tables: no row exchange at lookup, gradients are all-gathered).
    A single process ignores it."""

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:  # numpy integers (from arr.max(), np.prod) are ints here
            value = getattr(self, name)
            if isinstance(value, np.integer):
                object.__setattr__(self, name, int(value))
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) \
                or not 0 < self.dim <= MAX_DIM:
            raise ValueError(f"dim must be an int > 0 and at most {MAX_DIM:,} (MAX_DIM), got "
                             f"{self.dim!r}")
        if self.optimizer is not None and not isinstance(self.optimizer, SparseOptimizer):
            raise TypeError("optimizer must be a dynembed sparse optimizer such as "
                            f"de.optim.Adagrad(lr=0.05), got {type(self.optimizer).__name__}; "
                            "torch.optim optimizers are for the dense part of the model")
        if not isinstance(self.initializer, Initializer):
            raise TypeError("initializer must be a de.init initializer such as "
                            f"de.init.Normal(std=0.01), got {type(self.initializer).__name__}")
        try:  # bounds that depend on dim fail here, not at the first insert
            self.initializer.check(self.dim)
        except ValueError as e:
            raise ValueError(f"initializer {self.initializer!r} at dim={self.dim}: {e}") from None
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")
        check_hash_seed(self.hash_seed)
        self._check_default_value()
        self._check_padding_key()
        if self.update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode must be one of {UPDATE_MODES}, got "
                             f"{self.update_mode!r}")
        if self.nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_grads must be one of {NONFINITE_POLICIES}, got "
                             f"{self.nonfinite_grads!r}")
        if (isinstance(self.initial_capacity, bool) or not isinstance(self.initial_capacity, int)
                or self.initial_capacity < 0):
            raise ValueError(f"initial_capacity must be an int >= 0, got "
                             f"{self.initial_capacity!r}")
        object.__setattr__(self, "read_only", check_bool("read_only", self.read_only))
        object.__setattr__(self, "key_log", check_bool("key_log", self.key_log))
        self._check_tiers()
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if isinstance(self.device, torch.device) and str(self.device) == "cpu":
            object.__setattr__(self, "device", "cpu")  # as torch's own modules take it
        if self.device != "cpu":
            raise ValueError(f"device must be 'cpu' in this release, got {self.device!r}; "
                             "GPU tables are planned")

    def _check_tiers(self) -> None:
        if self.admission is not None and not isinstance(self.admission, AdmissionPolicy):
            raise TypeError("admission must be a de.policy admission policy such as "
                            "de.policy.FrequencyAdmission(threshold=3), got "
                            f"{type(self.admission).__name__}")
        if self.eviction is not None and not isinstance(self.eviction, EvictionPolicy):
            raise TypeError("eviction must be a de.policy eviction policy such as "
                            f"de.policy.LRU(), got {type(self.eviction).__name__}")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, "memory_budget")
        for name in ("max_rows", "evict_every", "sweep_rows"):
            value = getattr(self, name)
            if (value is not None or name == "sweep_rows") and (
                    isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be an int > 0" + (
                    "" if name == "sweep_rows" else " or None") + f", got {value!r}")
        if self.evict_every is not None and (self.eviction is None
                                             or not self.eviction.expires):
            raise ValueError(
                "evict_every runs sweeps that evict expired rows, so it needs an eviction "
                "policy that expires rows, e.g. eviction=de.policy.TTL(steps=10_000) or "
                f"de.policy.LFU(min_score=...); got eviction={self.eviction!r}. Without "
                "expiry, rows leave only to stay under max_rows/memory_budget or by "
                "table.evict(rows)")
        if self.evict_every is None and self.eviction is not None and self.eviction.expires:
            warn_at_caller(
                f"eviction={self.eviction!r} expires rows only at sweeps, and evict_every is "
                "not set: expired rows stay until you call table.evict() (under a budget "
                "they merely leave first). Set evict_every=N to sweep every N steps")
        if self.store is not None and not isinstance(self.store, EmbeddingStore):
            raise TypeError("store must be a de.storage store such as "
                            f"de.storage.RocksDBStore(path), got {type(self.store).__name__}")
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, got "
                             f"{self.write_policy!r}")
        if self.write_policy == "through" and self.store is None:
            raise ValueError("write_policy='through' needs a store; pass store=")

    def _check_padding_key(self) -> None:
        key = self.padding_key
        if isinstance(key, np.integer):
            key = int(key)
            object.__setattr__(self, "padding_key", key)
        if key is None or isinstance(key, (str, bytes)):
            return
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError("padding_key must be None or one key (an int id, str or bytes), "
                            f"got {type(key).__name__} {key!r}")
        if not -2**63 <= key < 2**63:
            raise ValueError(f"padding_key must be an int64 id, got {key}")

    def padding_id(self) -> int | None:
        """The id of :attr:`padding_key` (str and bytes hashed with :attr:`hash_seed`), or
        None."""
        key = self.padding_key
        if isinstance(key, str):
            return int(hash_strings([key], self.hash_seed)[0])
        if isinstance(key, bytes):
            return int(hash_bytes([key], self.hash_seed)[0])
        return key

    def _check_default_value(self) -> None:
        value = self.default_value
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            values = [float(value)]
        else:
            try:
                if isinstance(value, (str, bytes)):  # "1234" would read as four digits
                    raise TypeError(value)
                values = [float(v) for v in value]
            except (TypeError, ValueError):
                raise ValueError("default_value must be a number or a sequence of dim numbers, "
                                 f"got {value!r}") from None
            if len(values) != self.dim:
                raise ValueError(f"default_value has {len(values)} numbers but dim is "
                                 f"{self.dim}; give one number or exactly dim numbers")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"default_value must be finite, got {value!r}")
