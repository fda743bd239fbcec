"""ApproximateIndex: a faiss index over a table's live rows, for top-k at scale.

Exact :meth:`DynamicTable.top_k` scores every row; with millions of rows and many queries an
approximate index answers in a fraction of the time. ``ApproximateIndex`` builds a faiss
IVF-Flat (inverted lists, ``nprobe`` lists searched per query) or HNSW index from every
live row (memory, store, lazily opened checkpoint), keyed by row id. Rows change as the
table trains, so the index is rebuilt on demand (:meth:`rebuild`) or automatically before a
search once the table has applied ``rebuild_every`` optimizer updates since the last build
(``stale`` says whether it has changed at all). :meth:`recall` measures it against the
exact search. Needs ``faiss-cpu`` (``pip install 'dynembed[ann]'``).
"""

from __future__ import annotations

import numpy as np
import torch

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
        kind: ``"ivf"`` (IVF-Flat; ``nlist`` lists, default 4 * sqrt(rows)) or ``"hnsw"``
            (``m`` links per node).
        nprobe: lists searched per query (ivf).
        ef_search: candidates kept while searching (hnsw).
        rebuild_every: rebuild before a search once the table applied this many optimizer
            updates since the last build (None: only on demand). Rows erased since the
            build are never answered, rebuilt or not.

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
        for name, value in (("nprobe", nprobe), ("m", m), ("ef_search", ef_search),
                            ("nlist", nlist), ("rebuild_every", rebuild_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
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

    @property
    def stale(self) -> bool:
        """Whether the table changed (updates, assigns, inserts, removals) since the last
        build."""
        t = self.table
        return self._built_at is None or self._built_at[1:] != (t.writes, t.erasures, t.size())

    def rebuild(self) -> int:
        """Builds the index from every live row now; returns the rows indexed."""
        faiss = self._faiss
        parts = list(self.table._search_chunks(1 << 16))
        ids = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        rows = np.array(torch.cat([p[1] for p in parts]).numpy() if parts else
                        np.empty((0, self.table.dim)), dtype=np.float32, copy=True)
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
        return n

    def search(self, queries, k: int) -> TopK:
        """Approximate :meth:`DynamicTable.top_k` (same result type; past the rows found,
        ids are -1 and scores -inf: tell padding by the score, as any id is a valid key)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if self.index is None or (self.rebuild_every is not None and self._built_at is not None
                                  and self.table.update_step - self._built_at[0]
                                  >= self.rebuild_every):
            self.rebuild()
        given = query_matrix(queries)
        single = given.dim() == 1
        q = np.array((given.reshape(1, -1) if single else given).numpy(),
                     dtype=np.float32, copy=True)  # a copy: faiss normalises in place
        if q.ndim != 2 or q.shape[1] != self.table.dim:
            raise ValueError(f"queries must have shape (q, {self.table.dim}) or "
                             f"({self.table.dim},), got {tuple(given.shape)}")
        if self.rows == 0:
            scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
            found = np.full((q.shape[0], k), -1, dtype=np.int64)
        else:
            if self.metric == "cosine":
                self._faiss.normalize_L2(q)
            scores, positions = self.index.search(q, k)
            missing = positions < 0
            found = self.ids[np.where(missing, 0, positions)]
            found[missing] = -1
            scores[missing] = -np.inf
            if self._built_at[2] != self.table.erasures:
                found, scores = self._without_removed(found, scores)
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
        """Share of the exact top k (``table.top_k``) that :meth:`search` returns."""
        exact = self.table.top_k(queries, k, metric=self.metric)
        approx = self.search(queries, k)
        e_ids, e_ok = exact.ids.reshape(-1, k).numpy(), ~np.isinf(exact.scores.reshape(-1, k)
                                                                  .numpy())
        a_ids, a_ok = approx.ids.reshape(-1, k).numpy(), ~np.isinf(approx.scores.reshape(-1, k)
                                                                   .numpy())
        hits = sum(np.isin(a[ao], e[eo]).sum() for a, ao, e, eo in zip(a_ids, a_ok, e_ids, e_ok))
        return float(hits / max(e_ok.sum(), 1))
