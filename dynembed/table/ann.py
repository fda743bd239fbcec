"""ApproximateIndex: a faiss index over a table's live rows, for top-k at scale.

Exact :meth:`DynamicTable.top_k` scores every row; with millions of rows and many queries an
approximate index answers in a fraction of the time. ``ApproximateIndex`` builds a faiss
IVF-Flat (inverted lists, ``nprobe`` lists searched per query) or HNSW index from every
live row (memory, store, lazily opened checkpoint), keyed by row id. Rows change as the
table trains, so the index is rebuilt on demand (:meth:`rebuild`) or automatically before a
search once the table has applied ``rebuild_every`` optimizer updates since the last build,
or was cleared or loaded (``stale`` says whether it has changed at all). Rows holding NaN or
inf are left out. :meth:`recall` measures it against the exact search. Needs ``faiss-cpu``
(``pip install 'dynembed[ann]'``).
"""

from __future__ import annotations

import numpy as np
import torch

from dynembed._args import check_in, check_int
from dynembed.table.exclusions import Exclusions
from dynembed.table.search import METRICS, TableSearch, TopK, query_matrix

KINDS = ("ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("ApproximateIndex needs faiss: pip install faiss-cpu (or "
                          "'dynembed[ann]')") from None
    return faiss


class ApproximateIndex:
    """An approximate nearest-neighbour index over a :class:`DynamicTable`'s rows.

    Args:
        table: the table.
        metric: ``"dot"`` or ``"cosine"``.
        kind: ``"ivf"`` (IVF-Flat; ``nlist`` lists, default 4 * sqrt(rows), at most one
            per 39 rows, as faiss's k-means wants) or ``"hnsw"`` (``m`` >= 2 links per
            node).
        nprobe: lists searched per query (ivf).
        ef_search: candidates kept while searching (hnsw).
        rebuild_every: rebuild before a search once the table applied this many optimizer
            updates since the last build, or was cleared or loaded since (a load replaces
            every row, and may set the update count back); None: only on demand. Rows
            erased since the build are never answered, rebuilt or not.

    Raises:
        TypeError: ``table`` is not a table.
        ValueError: a bad option (named).
        ImportError: faiss is not installed.
    """

    def __init__(self, table, *, metric: str = "dot", kind: str = "ivf",
                 nlist: int | None = None, nprobe: int = 16, m: int = 32,
                 ef_search: int = 64, rebuild_every: int | None = None) -> None:
        if not isinstance(table, TableSearch):
            raise TypeError(f"table must be a DynamicTable (e.g. emb.table), got "
                            f"{type(table).__name__}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        nprobe, ef_search = check_int("nprobe", nprobe), check_int("ef_search", ef_search)
        m = check_int("m", m, minimum=2)  # faiss's HNSW with one link crashes the process
        nlist = None if nlist is None else check_int("nlist", nlist)
        if rebuild_every is not None:
            rebuild_every = check_int("rebuild_every", rebuild_every)
        self._faiss = _faiss()
        self.table, self.metric, self.kind = table, metric, kind
        self.nlist, self.nprobe, self.m, self.ef_search = nlist, nprobe, m, ef_search
        self.rebuild_every = rebuild_every
        self.index = None
        self.ids = np.empty(0, np.int64)
        """The id of each faiss row (faiss numbers rows 0..n-1; ids may be negative)."""
        self.rows = 0
        # (update step, writes, erasures, size) at the last build
        self._built_at: tuple[int, int, int, int] | None = None
        self._wipes_at = 0  # table.wipes at the last build

    @property
    def stale(self) -> bool:
        """Whether the table changed (updates, assigns, inserts, removals) since the last
        build."""
        t = self.table
        return self._built_at is None or self._built_at[1:] != (t.writes, t.erasures, t.size())

    def rebuild(self) -> int:
        """Builds the index from every live row now; returns the rows indexed.

        Rows holding NaN or inf are left out: their scores are not numbers (``top_k`` ranks
        a NaN score last) and faiss's k-means refuses them, so one diverged row made every
        rebuild of an ivf index raise.
        """
        faiss = self._faiss
        id_parts, row_parts = [], []
        for ids, rows in self.table._search_chunks(1 << 16):
            rows = rows.numpy()
            finite = np.isfinite(rows).all(axis=1)
            id_parts.append(ids if finite.all() else ids[finite])
            row_parts.append(rows if finite.all() else rows[finite])
        ids = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
        # one copy of the rows (the parts are copies already): faiss normalises it in place
        rows = (np.concatenate(row_parts).astype(np.float32, copy=False) if row_parts
                else np.empty((0, self.table.dim), np.float32))
        del row_parts
        if self.metric == "cosine" and rows.shape[0]:
            faiss.normalize_L2(rows)
        dim, n = self.table.dim, ids.shape[0]
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
        else:
            nlist = self.nlist or int(4 * np.sqrt(max(n, 1)))
            nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))  # faiss wants 39 per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            if n:
                index.train(rows)
            index.nprobe = min(self.nprobe, nlist)
        if n:
            index.add(rows)  # faiss numbers rows 0..n-1; ids are kept beside it
        self.index, self.ids, self.rows = index, ids, n
        t = self.table
        self._built_at = (t.update_step, t.writes, t.erasures, t.size())
        self._wipes_at = t.wipes
        return n

    def _due(self) -> bool:
        """Whether :meth:`search` rebuilds first: never built, or ``rebuild_every`` is set
        and the table applied that many updates since the build, or every row was replaced
        (a clear or a load, after which ``update_step`` may be lower than at the build, and
        counting from there waited for the old count)."""
        if self.index is None:
            return True
        if self.rebuild_every is None:
            return False
        t = self.table
        return (t.wipes != self._wipes_at
                or t.update_step - self._built_at[0] >= self.rebuild_every)

    def search(self, queries, k: int, *, exclude=None) -> TopK:
        """Approximate :meth:`DynamicTable.top_k`, rebuilding first if due (see
        ``rebuild_every``).

        Args:
            queries: (q, dim) or (dim,) float tensor or array (any layout).
            k: rows per query, >= 1.
            exclude: rows never to answer, per query, as ``top_k``'s ``exclude``.

        Returns:
            :class:`TopK` as ``top_k``'s: (q, k) ids and scores ((k,) for one (dim,) query),
            best first; past the rows found, ids are -1 and scores -inf (tell padding by the
            score, as any id is a valid key).

        Raises:
            ValueError: bad ``k``, query shape or ``exclude``, or a query holding NaN or
                inf.
            TypeError: ``queries`` are not numbers, or an ``exclude`` entry is one key.
            KeyInputError: bad keys in ``exclude``.
        """
        k = check_int("k", k)
        given = query_matrix(queries)
        single = given.dim() == 1
        # a C-ordered copy: faiss normalises in place, and reads only C-contiguous arrays
        # (a transposed, sliced or expanded tensor was refused with faiss's own error)
        q = np.array((given.reshape(1, -1) if single else given).numpy(),
                     dtype=np.float32, order="C", copy=True)
        if q.ndim != 2 or q.shape[1] != self.table.dim:
            raise ValueError(f"queries must have shape (q, {self.table.dim}) or "
                             f"({self.table.dim},), got {tuple(given.shape)}")
        excluded = (None if exclude is None
                    else Exclusions.of(self.table, exclude, q.shape[0], single))
        if self._due():  # after the arguments are checked: a rebuild takes a while
            self.rebuild()
        if self.rows == 0:
            scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
            found = np.full((q.shape[0], k), -1, dtype=np.int64)
        else:
            if self.metric == "cosine":
                self._faiss.normalize_L2(q)
            if excluded is None:
                found, scores = self._answers(q, k)
            else:
                found, scores = self._answers_excluding(q, k, excluded)
        keys = None
        if self.table.key_log is not None:
            flat = self.table.key_log.lookup(found.reshape(-1))
            keys = [flat[i * k:(i + 1) * k] for i in range(found.shape[0])]
            for row, score in zip(keys, scores):
                for j in np.flatnonzero(np.isinf(score)):
                    row[j] = None
        ids_t, scores_t = torch.from_numpy(found), torch.from_numpy(scores)
        if single:
            return TopK(ids_t[0], scores_t[0], keys[0] if keys is not None else None)
        return TopK(ids_t, scores_t, keys)

    def _answers(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, k) ids and scores of the index's answers, erased rows made padding."""
        scores, positions = self.index.search(q, k)
        missing = positions < 0
        found = self.ids[np.where(missing, 0, positions)]
        found[missing] = -1
        scores[missing] = -np.inf
        if self._built_at[2] != self.table.erasures:
            found, scores = self._without_removed(found, scores)
        return found, scores

    def _answers_excluding(self, q: np.ndarray, k: int, excluded: Exclusions
                           ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_answers` without each query's excluded rows. The index is asked for k
        more answers than the excluded rows it holds, so k others remain; queries are
        searched in groups by that count rounded up to a power of two, so one long list
        does not deepen every query's search."""
        extra = excluded.counts_among(self.ids)
        depth = np.zeros_like(extra)
        some = extra > 0
        depth[some] = 2 ** np.ceil(np.log2(extra[some])).astype(np.int64)
        found = np.full((q.shape[0], k), -1, dtype=np.int64)
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        for more in np.unique(depth):
            group = np.flatnonzero(depth == more)
            ids, group_scores = self._answers(q[group], k + int(more))
            found[group], scores[group] = excluded.subset(group).drop(ids, group_scores, k)
        return found, scores

    def _without_removed(self, found: np.ndarray, scores: np.ndarray):
        """Answers whose row was erased since the build become padding (at the end of their
        row): an answer must be a key the table has. Only ids the table logged as erased
        (or all, after a wipe) are looked up again, once each: rows evicted to the store
        are not removed, and reading them back for every search would be slow."""
        answered = ~np.isinf(scores)
        wiped, erased = self.table._erased_since(self._built_at[2])
        suspect = answered if wiped else answered & np.isin(found, erased)
        if not suspect.any():
            return found, scores
        ids, where = np.unique(found[suspect], return_inverse=True)
        dropped = ~answered
        dropped[suspect] = ~self.table.contains(torch.from_numpy(ids)).numpy()[where]
        if not dropped[suspect].any():
            return found, scores
        order = np.argsort(dropped, axis=1, kind="stable")  # the kept ones first, in order
        found = np.take_along_axis(np.where(dropped, -1, found), order, axis=1)
        scores = np.take_along_axis(np.where(dropped, -np.inf, scores), order, axis=1)
        return found, scores.astype(np.float32)

    def recall(self, queries, k: int) -> float:
        """Share of the exact top k (``table.top_k``) that :meth:`search` finds, rows tied
        at the cut counted as found.

        The exact search breaks a tie at the k-th score by id and the index by chance, so a
        row that scores exactly as the exact k-th (e.g. one of several equal vectors) stands
        in for a tied exact answer the index did not return (at most as many as the exact
        answer holds). Scores are computed from the table's rows as they are now, so a stale
        index is measured against the current table.

        Args:
            queries: (q, dim) or (dim,) float tensor.
            k: neighbours per query, >= 1.

        Returns:
            Found answers / exact answers (rows with a finite score), over every query; 0.0
            when there is no exact answer (no rows, or no queries).

        Raises:
            ValueError: bad ``k`` or queries (as :meth:`DynamicTable.top_k`).
        """
        k = check_int("k", k)
        return self._recall_of(self.search(queries, k),
                               self.table.top_k(queries, k, metric=self.metric), queries, k)

    def tune(self, queries, k: int, target_recall: float = 0.95) -> float:
        """Searches more of the index until :meth:`recall` on ``queries`` reaches
        ``target_recall``, and keeps that setting.

        Rebuilds first if the table changed since the build. Doubles ``nprobe`` (ivf; at
        most every list, an exhaustive search) or ``ef_search`` (hnsw; at most the rows
        indexed) from its current value and keeps the first setting that reaches the
        target, or the largest; with no exact answer (no rows, no queries) it changes
        nothing. Each setting costs one search of the queries; the exact answers are
        computed once. Tune on queries like those you will search with (e.g. a sample of
        the query tower's outputs): recall depends on where the queries fall, and an index
        over rows without cluster structure needs to search far more of itself than one
        over clustered rows.

        Args:
            queries: (q, dim) or (dim,) float tensor.
            k: neighbours per query, >= 1.
            target_recall: in (0, 1].

        Returns:
            The recall reached (0.0 when there is no exact answer: no rows or no queries).

        Raises:
            ValueError: bad ``k``, ``target_recall`` or queries.
        """
        k = check_int("k", k)
        check_in("target_recall", target_recall, 0.0, 1.0, low_open=True)
        if self._due() or self.stale:  # measured against the current rows: no setting of
            self.rebuild()             # an index of older ones reaches the target
        exact = self.table.top_k(queries, k, metric=self.metric)
        if not torch.isfinite(exact.scores).any():  # no rows, or no queries: nothing to tune
            return self._recall_of(self.search(queries, k), exact, queries, k)
        while True:
            reached = self._recall_of(self.search(queries, k), exact, queries, k)
            if reached >= target_recall or not self._search_more():
                return reached

    def _search_more(self) -> bool:
        """Doubles how much of the index a search visits; False if it visits all already."""
        if self.kind == "hnsw":
            if self.ef_search >= self.rows:
                return False
            self.ef_search = min(2 * self.ef_search, self.rows)
            self.index.hnsw.efSearch = self.ef_search
        else:
            if self.index.nprobe >= self.index.nlist:
                return False
            self.nprobe = min(2 * self.index.nprobe, self.index.nlist)
            self.index.nprobe = self.nprobe
        return True

    def _recall_of(self, approx: TopK, exact: TopK, queries, k: int) -> float:
        """:meth:`recall` of the answers ``approx`` against ``exact``."""
        e_ids, e_ok = exact.ids.reshape(-1, k), ~torch.isinf(exact.scores.reshape(-1, k))
        a_ids, a_ok = approx.ids.reshape(-1, k), ~torch.isinf(approx.scores.reshape(-1, k))
        wanted = e_ok.sum(1)  # (q,) exact answers: best first, so a prefix of each row
        # answers in the exact top k, found by sorting (vectorised over queries); counting
        # the valid exact ids equal to an answer, so that padding (-1) never matches a row
        # whose id is -1
        e_sorted, order = torch.sort(e_ids, dim=1)
        valid = torch.nn.functional.pad(torch.cumsum(torch.gather(e_ok, 1, order), 1), (1, 0))
        first = torch.searchsorted(e_sorted, a_ids, side="left")
        last = torch.searchsorted(e_sorted, a_ids, side="right")
        in_exact = a_ok & (torch.gather(valid, 1, last) > torch.gather(valid, 1, first))
        # ties at the cut, both sides scored by one arithmetic (a float32 matrix product
        # rounds a row's score by where the row sits in it, so equal vectors differ there)
        q = query_matrix(queries).reshape(-1, self.table.dim)
        scores = self._scores(q, torch.cat([e_ids, a_ids], 1))
        e_scores, a_scores = scores[:, :k], scores[:, k:]
        cut = torch.gather(e_scores, 1, (wanted - 1).clamp(min=0).unsqueeze(1))
        e_tied = (e_ok & (e_scores == cut)).sum(1)
        a_tied = a_ok & (a_scores == cut)
        stand_ins = torch.minimum(e_tied - (a_tied & in_exact).sum(1),
                                  (a_tied & ~in_exact).sum(1))
        hits = in_exact.sum(1) + stand_ins
        return float(hits.sum()) / max(int(wanted.sum()), 1)

    def _scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scores of the current rows of ids against their query, in float64.

        Each score is a sum of exactly computed products in a fixed order, so rows with
        equal vectors score equally wherever they sit.

        Args:
            q: (q, dim) float32 queries.
            ids: (q, j) int64 ids per query.

        Returns:
            (q, j) float64; -inf where an id has no row.
        """
        unique, inverse = np.unique(ids.numpy(), return_inverse=True)
        rows, missing = self.table._find_gather(unique)
        if self.metric == "cosine":
            q, rows = (torch.nn.functional.normalize(q, dim=1),
                       torch.nn.functional.normalize(rows, dim=1))
        q, rows = q.double(), rows.double()
        out = torch.empty(ids.shape, dtype=torch.float64)
        inverse = torch.from_numpy(inverse.reshape(ids.shape))
        step = max(1, (1 << 22) // max(1, ids.shape[1] * q.shape[1]))  # bounded memory
        for start in range(0, ids.shape[0], step):
            part = slice(start, start + step)
            out[part] = (rows[inverse[part]] * q[part, None, :]).sum(-1)
        out[torch.from_numpy(missing)[inverse]] = float("-inf")
        return out
