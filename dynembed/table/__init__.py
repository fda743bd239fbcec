"""Tables: the index, the row arena and the batch verbs."""

from dynembed.table.ann import ApproximateIndex
from dynembed.table.config import TableConfig
from dynembed.table.results import FindResult, InsertResult, TableExport
from dynembed.table.search import TopK
from dynembed.table.stats import CallStats, Counters, TableStats
from dynembed.table.table import DynamicTable

__all__ = [
           "ApproximateIndex",
           "CallStats",
           "Counters",
           "DynamicTable",
           "FindResult",
           "InsertResult",
           "TableConfig",
           "TableExport",
           "TableStats",
           "TopK",
]
