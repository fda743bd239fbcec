"""dynembed: dynamic embedding tables for PyTorch.

Tables keyed by raw strings or int64 ids that grow as data arrives, with sparse optimizers
and a compiled CPU engine::

    import dynembed as de
    emb = de.DynamicEmbedding(dim=64, optimizer=de.optim.Adagrad(lr=0.05))
    v = emb(["cat", "dog", "cat"])   # (3, 64); new keys get rows
"""

from dynembed import optim
from dynembed import policy as init
from dynembed.errors import (
    DynembedError,
    KeyInputError,
    KeyValueError,
    NonFiniteGradientError,
    ReadOnlyTableError,
    StateDictError,
    TableError,
)
from dynembed.kernels._threads import get_num_threads, set_num_threads
from dynembed.keys import KeyLog, hash_bytes, hash_strings
from dynembed.nn import (
    DynamicEmbedding,
    DynamicEmbeddingBag,
    EmbeddingCollection,
    FeatureConfig,
    sparse_step,
    sparse_zero_grad,
)
from dynembed.table import DynamicTable, FindResult, InsertResult, TableConfig, TableStats

__version__ = "0.1.0"

__all__ = [
    "DynamicEmbedding", "DynamicEmbeddingBag", "EmbeddingCollection", "FeatureConfig",
    "DynamicTable", "TableConfig", "TableStats", "FindResult", "InsertResult",
    "optim", "init", "sparse_step", "set_num_threads", "get_num_threads", "sparse_zero_grad", "hash_strings", "hash_bytes", "KeyLog",
    "DynembedError", "KeyInputError", "KeyValueError", "TableError", "ReadOnlyTableError",
    "StateDictError", "NonFiniteGradientError", "__version__",
]
