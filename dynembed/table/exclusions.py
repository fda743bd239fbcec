"""Rows a search must not answer, per query: the ``exclude=`` of ``DynamicTable.top_k`` and
``ApproximateIndex.search`` (e.g. the items each user has seen).

The exact search masks the pairs that fall in each chunk of rows it scores (``pairs_in``: a
binary search of the chunk's ids in the pairs sorted by id, so the cost follows the chunk
and the pairs it holds, never the product of queries and excluded ids) and keeps its depth
at k; the approximate one asks the index for as many more answers as a query's excluded
ids it holds, and drops them (``contains``: a compiled hash set of the pairs).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from dynembed.kernels.pair_set import pair_set, pair_set_contains

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _is_int_array(entry) -> bool:
    if isinstance(entry, torch.Tensor):
        return entry.dtype in _INT_DTYPES
    # uint64 is left to the key conversion, which refuses ids past the int64 range
    return isinstance(entry, np.ndarray) and (
        entry.dtype.kind == "i" or (entry.dtype.kind == "u" and entry.dtype.itemsize < 8))


def _entry_ids(table, entry, arg: str) -> np.ndarray:
    """(n,) int64 ids of one query's collection of keys.

    Raises:
        TypeError: the entry is one key, not a collection (named ``arg``).
        KeyInputError: bad keys (named ``arg``).
    """
    if isinstance(entry, (set, frozenset)):
        entry = list(entry)
    if isinstance(entry, (str, bytes, numbers.Number)) or (
            isinstance(entry, (torch.Tensor, np.ndarray)) and entry.ndim == 0):
        raise TypeError(f"{arg} must be a collection of keys (a list, set, array or tensor), "
                        f"got one key {entry!r}; with (q, dim) queries, exclude holds one "
                        "collection per query, e.g. [['a', 'b'], [], ...]")
    if hasattr(entry, "__len__") and len(entry) == 0:
        return np.empty(0, np.int64)  # also an empty float array: no history
    return table.ids_of(entry, arg=arg).ids.reshape(-1)


class Exclusions:
    """(query, id) pairs a search must not answer.

    Args:
        queries: (e,) int64 query of each pair.
        ids: (e,) int64 excluded id of each pair (repeats are harmless).
        n_queries: q.
    """

    def __init__(self, queries: np.ndarray, ids: np.ndarray, n_queries: int) -> None:
        self.queries, self.ids, self.n_queries = queries, ids, n_queries
        self._by_id: tuple[np.ndarray, np.ndarray] | None = None  # for pairs_in
        self._set: tuple[np.ndarray, np.ndarray] | None = None  # for contains

    @classmethod
    def of(cls, table, exclude, n_queries: int, single: bool) -> Exclusions:
        """Parses ``exclude``: for one (dim,) query, one collection of keys or ids (any form
        a lookup takes, or a set); for (q, dim) queries, a sequence of q such collections
        (empty ones included).

        Raises:
            ValueError: not one collection per query (named ``exclude``).
            TypeError: an entry is one key, not a collection (named ``exclude[i]``).
            KeyInputError: bad keys, named ``exclude`` or ``exclude[i]``.
        """
        if single:
            ids = _entry_ids(table, exclude, "exclude")
            return cls(np.zeros(ids.shape[0], np.int64), ids, 1)
        if isinstance(exclude, (str, bytes, set, frozenset)) \
                or not hasattr(exclude, "__len__") or len(exclude) != n_queries:
            size = f" of length {len(exclude)}" if hasattr(exclude, "__len__") else ""
            raise ValueError(f"exclude must hold one collection of keys per query "
                             f"({n_queries} queries), got {type(exclude).__name__}{size}; "
                             "e.g. [['a', 'b'], [], ...]. For one query, give a (dim,) "
                             "vector (not (1, dim), e.g. find(...).values[0]) and exclude "
                             "as one collection")
        entries = list(exclude)
        if entries and all(_is_int_array(e) and e.ndim == 1 for e in entries):
            # integer arrays (the common case: item ids): converted in one call
            sizes = np.array([e.shape[0] for e in entries], dtype=np.int64)
            flat = [e.cpu().numpy() if isinstance(e, torch.Tensor) else e for e in entries]
            ids = table.ids_of(np.concatenate(flat).astype(np.int64, copy=False),
                               arg="exclude").ids
        else:
            parts = [_entry_ids(table, e, f"exclude[{i}]") for i, e in enumerate(entries)]
            sizes = np.array([p.shape[0] for p in parts], dtype=np.int64)
            ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
        queries = np.repeat(np.arange(n_queries, dtype=np.int64), sizes)
        return cls(queries, ids, n_queries)

    def subset(self, queries: np.ndarray) -> Exclusions:
        """The exclusions of some queries, numbered 0.. in the order of ``queries``."""
        number = np.full(self.n_queries, -1, dtype=np.int64)
        number[queries] = np.arange(queries.shape[0], dtype=np.int64)
        kept = number[self.queries]
        return Exclusions(kept[kept >= 0], self.ids[kept >= 0], queries.shape[0])

    def pairs_in(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The excluded pairs among some rows.

        Args:
            ids: (c,) int64 ids of a chunk of rows, distinct.

        Returns:
            ((m,) queries, (m,) positions in ``ids``): query ``queries[j]`` excludes the row
            ``ids[positions[j]]``.
        """
        if self._by_id is None:
            order = np.argsort(self.ids, kind="stable")
            self._by_id = self.ids[order], self.queries[order]
        sorted_ids, queries = self._by_id
        left = np.searchsorted(sorted_ids, ids, side="left")
        counts = np.searchsorted(sorted_ids, ids, side="right") - left
        total = int(counts.sum())
        positions = np.repeat(np.arange(ids.shape[0], dtype=np.int64), counts)
        starts = np.repeat(left - (np.cumsum(counts) - counts), counts)
        return queries[starts + np.arange(total, dtype=np.int64)], positions

    def contains(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Whether each query excludes each id (arrays of one shape) -> bool, that shape."""
        if self.ids.shape[0] == 0:
            return np.zeros(ids.shape, dtype=bool)
        if self._set is None:
            self._set = pair_set(self.queries, self.ids)
        flat = pair_set_contains(*self._set, np.ascontiguousarray(queries).reshape(-1),
                                 np.ascontiguousarray(ids).reshape(-1))
        return flat.reshape(ids.shape)

    def counts_among(self, ids: np.ndarray) -> np.ndarray:
        """(q,) how many of ``ids`` each query excludes (``ids`` distinct)."""
        present = np.isin(self.ids, ids)
        return np.bincount(self.queries[present], minlength=self.n_queries)

    def drop(self, ids: np.ndarray, scores: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """The first k answers per query that it does not exclude, in order, padded with id
        -1 and score -inf.

        Args:
            ids: (q, m) int64 answers, best first, m >= k.
            scores: (q, m) float32.
            k: answers to keep per query.

        Returns:
            (q, k) ids and scores (new arrays).
        """
        queries = np.broadcast_to(np.arange(ids.shape[0], dtype=np.int64)[:, None], ids.shape)
        dropped = self.contains(queries, ids)  # padding (-1) too if -1 is excluded: alike
        if dropped.any():
            order = np.argsort(dropped, axis=1, kind="stable")  # the kept ones first, in order
            ids = np.take_along_axis(np.where(dropped, -1, ids), order, axis=1)
            scores = np.take_along_axis(np.where(dropped, -np.inf, scores), order, axis=1)
        return (np.ascontiguousarray(ids[:, :k]),
                np.ascontiguousarray(scores[:, :k], dtype=np.float32))
