"""Exact top-k search over a table's live rows (the paper's ``top_k`` op).

:class:`TableSearch` is a mixin of :class:`~dynembed.table.table.DynamicTable`. Scores are
dot products (or cosines) of each query with every live row, computed a chunk of rows at a
time with one matmul and merged into a running top k, so memory stays bounded by the chunk
whatever the table size. Rows in the store and in a lazily opened checkpoint are searched
too, after memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from dynembed._args import check_int
from dynembed.table.arena import LAST_STEP
from dynembed.table.eviction import FREE_STEP
from dynembed.table.exclusions import Exclusions

METRICS = ("dot", "cosine")
DEFAULT_CHUNK_ROWS = 1 << 16


class TopK(NamedTuple):
    """Result of :meth:`TableSearch.top_k`.

    Attributes:
        ids: (q, k) int64 ids of the best rows per query, best first, equal scores by
            smallest id ((k,) for one (dim,) query); -1 past the last row when the table has
            fewer than k candidates.
        scores: (q, k) (or (k,)) float32 their scores (-inf past the last row). A score
            that is NaN (a row holding NaN, or infinities that cancel) counts, and is
            reported, as -inf.
        keys: with a key log, the original keys of ``ids`` (str, or bytes for bytes keys
            that are not UTF-8; None where unknown): a list of k per query, or one list of
            k for one (dim,) query; None without a key log.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    keys: list[list[str | None]] | None


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _best(scores: torch.Tensor, ids: torch.Tensor, k: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row: highest score first, ties by smallest id, NaN as -inf.

    torch.topk ranks NaN above everything and picks among tied scores in no stated order,
    which made results change with ``chunk_rows``; this order is total, so the result is
    the same however the rows are chunked. The common case (no NaN, no tie at the cut)
    costs one topk of k + 1 columns.

    Args:
        scores: (q, n) float32 scores (overwritten where NaN).
        ids: (n,) or (q, n) int64 ids of the columns, distinct within a row.
        k: columns to keep (fewer if n < k).

    Returns:
        (q, min(k, n)) scores and ids, best first.
    """
    ids = ids.expand(scores.shape)
    m = min(k, scores.shape[1])
    top, where = torch.topk(scores, min(m + 1, scores.shape[1]), dim=1)
    if torch.isnan(top[:, 0]).any():  # topk ranks NaN first: a row has one iff its top does
        scores.masked_fill_(torch.isnan(scores), float("-inf"))
        top, where = torch.topk(scores, min(m + 1, scores.shape[1]), dim=1)
    if top.shape[1] > m:
        # the (m+1)-th best equal to the m-th: a run of equal scores straddles the cut and
        # topk kept an arbitrary part of it; redo those queries with a key that ranks the
        # run by id
        straddles = top[:, m - 1] == top[:, m]
        top, where = top[:, :m], where[:, :m]
        if straddles.any():
            rows = torch.nonzero(straddles).squeeze(1)
            sub, cut = scores[rows], top[rows, m - 1:]
            # ~id is decreasing in id; the run beats what scores below it, and what scores
            # above it (fewer than m columns, all kept) beats the run
            key = (torch.bitwise_not(ids[rows]).masked_fill(sub < cut, _INT64_MIN)
                   .masked_fill(sub > cut, _INT64_MAX))
            where[rows] = torch.topk(key, m, dim=1).indices
            top[rows] = torch.gather(sub, 1, where[rows])
    chosen = torch.gather(ids, 1, where)
    # best first, ties by id: sort by id, then stably by score
    by_id = torch.argsort(chosen, dim=1)
    top, chosen = torch.gather(top, 1, by_id), torch.gather(chosen, 1, by_id)
    by_score = torch.argsort(top, dim=1, descending=True, stable=True)
    return torch.gather(top, 1, by_score), torch.gather(chosen, 1, by_score)


def _merge(best_scores: torch.Tensor, best_ids: torch.Tensor, scores: torch.Tensor,
           ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the running best and a chunk's scores: the chunk's own top k first,
    so the merge handles 2k columns, not the chunk's width."""
    top, top_ids = _best(scores, ids, k)
    return _best(torch.cat([best_scores, top], dim=1), torch.cat([best_ids, top_ids], dim=1),
                 k)


def query_matrix(queries) -> torch.Tensor:
    """Queries as a float32 tensor in host memory, where the rows are searched (queries
    from a GPU model too), detached (shape as given).

    Raises:
        TypeError: ``queries`` are not numbers.
        ValueError: a query holds NaN or inf (its scores would rank rows at random).
    """
    try:
        q = torch.as_tensor(queries).detach()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"queries must be a float tensor or array of shape (q, dim) or "
                        f"(dim,), got {type(queries).__name__}: {e}") from None
    if q.dtype == torch.bool or q.is_complex():
        raise TypeError(f"queries must be a float tensor or array, got {q.dtype}")
    if q.device.type == "meta":  # no values to score (torch: "item() ... meta tensors")
        raise ValueError("queries are on the meta device, which holds no values; give real "
                         "tensors (build the model on a real device, or call .to('cpu'))")
    q = q.to("cpu", torch.float32)
    if not torch.isfinite(q).all():
        raise ValueError("queries hold NaN or inf; scores of such a query rank rows at "
                         "random. Fix the model output, or drop those queries")
    return q


class TableSearch:
    """Top-k search (mixin; see module doc)."""

    def _refuse_a_shard(self, verb: str) -> None:
        """Raises for a shard of a distributed table: its rows are a part of the table's.

        Raises:
            ValueError: the table is sharded across ranks.
        """
        if self.is_shard:
            raise ValueError(f"{verb}: this table is sharded across the ranks of a "
                             "distributed job, and this rank holds only its shard's rows, so "
                             "a search here would miss the others'. Search a table restored "
                             "whole from a checkpoint in one process (or make the table "
                             "placement='replicated')")

    def _search_chunks(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(ids, weights) of every live row, a chunk at a time: memory, store, checkpoint."""
        self._refuse_a_shard("search")
        meta = self.arena.np("meta")
        for start in range(0, self._high_water, chunk_rows):
            stop = min(start + chunk_rows, self._high_water)
            live = np.flatnonzero(meta[start:stop, LAST_STEP] != FREE_STEP) + start
            if live.shape[0]:
                yield meta[live, 0].copy(), self.arena.weights[torch.from_numpy(live)]
        for block in self.rows_below_memory(chunk_rows):
            yield block.ids, torch.from_numpy(block.weights)

    def top_k(self, queries, k: int, *, metric: str = "dot", keys=None, exclude=None,
              chunk_rows: int = DEFAULT_CHUNK_ROWS) -> TopK:
        """The k live rows that score highest against each query, exactly.

        Args:
            queries: (q, dim) or (dim,) float tensor (an activation per query).
            k: rows per query, >= 1.
            metric: ``"dot"`` (inner product) or ``"cosine"``.
            keys: optional candidates (keys or int64 ids): only these rows are scored
                (absent ones are ignored).
            exclude: rows never to answer, per query (e.g. the items a user has seen):
                for one (dim,) query, keys or ids (a list, set, array or tensor); for
                (q, dim) queries, a sequence of q such collections. The k answers are the
                best of the other rows (rows scoring -inf, e.g. holding NaN, may give way to
                padding).
            chunk_rows: rows scored at a time (bounds memory: chunk_rows x q scores).

        Returns:
            :class:`TopK` with (q, k) ids and scores, best first ((k,) when ``queries`` is
            one (dim,) vector). Equal scores are ordered by id, smallest first, and a NaN
            score (from a row holding NaN, or infinities that cancel) ranks as -inf, below
            every real score, so chunking never reorders equal scores. Scores are float32
            matrix products, whose last bit can change with ``chunk_rows`` and the number
            of queries (the BLAS kernel rounds by shape): rows whose scores differ only by
            such rounding, e.g. rows with equal vectors, may come in another order.

        Raises:
            ValueError: bad ``k``, ``metric``, ``chunk_rows``, query shape or ``exclude``,
                or a query holding NaN or inf; the table is a shard of a distributed table.
            TypeError: ``queries`` are not numbers, or an ``exclude`` entry is one key.
            KeyInputError: bad keys in ``keys`` or ``exclude``.
        """
        self._refuse_a_shard("top_k")
        k = check_int("k", k)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        chunk_rows = check_int("chunk_rows", chunk_rows)
        q = query_matrix(queries)
        single = q.dim() == 1
        q = q.reshape(1, -1) if single else q
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (q, {self.dim}) or ({self.dim},), got "
                             f"{tuple(torch.as_tensor(queries).shape)}")
        excluded = None if exclude is None else Exclusions.of(self, exclude, q.shape[0], single)
        if metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
        best_scores = torch.full((q.shape[0], 0), float("-inf"))
        best_ids = torch.empty((q.shape[0], 0), dtype=torch.int64)
        if keys is not None:
            chunks = self._candidate_chunks(keys, chunk_rows)
        else:
            chunks = self._search_chunks(chunk_rows)
        for ids, rows in chunks:
            if metric == "cosine":
                rows = torch.nn.functional.normalize(rows, dim=1)
            scores = q @ rows.T
            if excluded is not None:  # below every row; dropped if still among the best
                rows_of, columns = excluded.pairs_in(ids)
                scores[torch.from_numpy(rows_of), torch.from_numpy(columns)] = float("-inf")
            best_scores, best_ids = _merge(best_scores, best_ids, scores,
                                           torch.from_numpy(ids), k)
        if best_scores.shape[1] < k:  # fewer candidates than k
            pad = k - best_scores.shape[1]
            best_scores = torch.cat([best_scores, torch.full((q.shape[0], pad),
                                                             float("-inf"))], 1)
            best_ids = torch.cat([best_ids, torch.full((q.shape[0], pad), -1)], 1)
        if excluded is not None:  # masked rows among the best: only fewer than k others
            kept = excluded.drop(best_ids.numpy(), best_scores.numpy(), k)
            best_ids, best_scores = torch.from_numpy(kept[0]), torch.from_numpy(kept[1])
        found_keys = None
        if self.key_log is not None:
            flat = self.key_log.lookup(best_ids.reshape(-1).numpy())
            found_keys = [flat[i * k:(i + 1) * k] for i in range(best_ids.shape[0])]
        if single:
            best_ids, best_scores = best_ids[0], best_scores[0]
            found_keys = found_keys[0] if found_keys is not None else None
        return TopK(best_ids, best_scores, found_keys)

    def _candidate_chunks(self, keys, chunk_rows: int
                          ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(ids, weights) of the given candidates that have rows, a chunk at a time."""
        ids = np.unique(self.ids_of(keys, arg="keys").ids)
        for start in range(0, ids.shape[0], chunk_rows):
            part = ids[start:start + chunk_rows]
            values, missing = self._find_gather(part)
            if (~missing).any():
                yield part[~missing], values[torch.from_numpy(~missing)]
