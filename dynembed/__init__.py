"""dynembed: dynamic embedding tables for PyTorch.

Tables keyed by raw strings or int64 ids that grow as data arrives, with sparse optimizers
and a compiled CPU engine::

    import dynembed as de
    emb = de.DynamicEmbedding(dim=64, optimizer=de.optim.Adagrad(lr=0.05))
    v = emb(["cat", "dog", "cat"])   # (3, 64); new keys get rows
"""

from dynembed import (
    checkpoint,
    distributed,
    metrics,
    optim,
    policy,
    sampling,
    storage,
    train,
)
from dynembed import policy as init
from dynembed._version import __version__
from dynembed.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigMismatchError,
    DistributedError,
    DynembedError,
    KeyInputError,
    KeyValueError,
    MemoryBudgetError,
    NonFiniteGradientError,
    ReadOnlyTableError,
    StateDictError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreUnavailableError,
    TableError,
)
from dynembed.kernels._threads import get_num_threads, set_num_threads
from dynembed.keys import KeyLog, hash_bytes, hash_strings
from dynembed.nn import (
    DynamicEmbedding,
    DynamicEmbeddingBag,
    EmbeddingCollection,
    FeatureConfig,
    clip_grad_norm_,
    set_sparse_lr,
    sparse_step,
    sparse_zero_grad,
)
from dynembed.sampling import sampled_logits, sampled_softmax_loss
from dynembed.table import (
    ApproximateIndex,
    DynamicTable,
    FindResult,
    InsertResult,
    TableConfig,
    TableStats,
    TopK,
)
from dynembed.table._memory import keep_freed_memory
from dynembed.table.loss_scale import loss_scale

# Batch-sized buffers are reused instead of faulted in again every step (see the module).
keep_freed_memory()

__all__ = [
    "ApproximateIndex",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigMismatchError",
    "DistributedError",
    "DynamicEmbedding",
    "DynamicEmbeddingBag",
    "DynamicTable",
    "DynembedError",
    "EmbeddingCollection",
    "FeatureConfig",
    "FindResult",
    "InsertResult",
    "KeyInputError",
    "KeyLog",
    "KeyValueError",
    "MemoryBudgetError",
    "NonFiniteGradientError",
    "ReadOnlyTableError",
    "StateDictError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "StoreUnavailableError",
    "TableConfig",
    "TableError",
    "TableStats",
    "TopK",
    "__version__",
    "checkpoint",
    "clip_grad_norm_",
    "distributed",
    "get_num_threads",
    "hash_bytes",
    "hash_strings",
    "init",
    "loss_scale",
    "metrics",
    "optim",
    "policy",
    "sampled_logits",
    "sampled_softmax_loss",
    "sampling",
    "set_num_threads",
    "set_sparse_lr",
    "sparse_step",
    "sparse_zero_grad",
    "storage",
    "train",
]


def __getattr__(name: str):
    # The serving stack (uvicorn, starlette) loads on first use of ``de.serving``, so that
    # training jobs do not import it.
    if name == "serving":
        import importlib

        return importlib.import_module("dynembed.serving")
    raise AttributeError(f"module 'dynembed' has no attribute {name!r}")
