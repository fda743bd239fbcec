"""The serving benchmark's synthetic CTR workload and model, shared by both servers.

The model is what a CTR ranker serves: five dynamic string features, each looked up in its
own embedding table (dim 16), concatenated in :data:`FEATURES` order into a (B, 80) input,
and a small dense MLP (80 -> 64 -> 32 -> 1) giving a logit; the served output is
``sigmoid(logit)``, one click probability per request.

Features (a request is one JSON object ``{feature: value}``, one example):

=========== ============================================== ====================================
feature     value                                          vocabulary (keys in the table)
=========== ============================================== ====================================
``user``    str, Zipf over ~1M ids (``"u123"``)            ``u1`` .. ``u{n_users}``
``item``    str, Zipf over ~100k ids (``"i42"``)           ``i1`` .. ``i{n_items}``
``category`` str, the item's category (``"c7"``)           ``c0`` .. ``c{n_categories - 1}``
``tags``    list of 1-5 str, Zipf over ~5k (``"t9"``)      ``t1`` .. ``t{n_tags}``, mean-pooled
``hour``    str ``"0"`` .. ``"23"`` (an hour as a string   ``"0"`` .. ``"23"``
            key, so every feature is a string key)
=========== ============================================== ====================================

A share (:attr:`Workload.unseen_share`) of the users and items in requests are new: keys
past the vocabulary, in no table. As in any serving of dynamic tables they get the default
row, a zero vector, and are never inserted. A ``tags`` bag is the mean of its tags' rows,
an unseen tag counting as a zero row (so it still counts in the mean); an empty or missing
bag is a zero vector, as is a missing scalar feature.

Every row is a pure function of (feature, key, seed) -- :func:`key_rows` hashes the key
with BLAKE2b and expands the hash with SplitMix64 -- and the MLP's weights come from a fixed
seed, so both servers compute the same probabilities for the same request:

* **The TorchServe peer** (:mod:`.torchserve_handler`) holds each table as a Python dict
  key -> row number into a float32 tensor (row 0 the zero row), built by
  :class:`PeerTables` from the files :func:`write_artifacts` writes into the model archive.
* **dynembed's server** serves the same :class:`CTRDense` (exported with
  ``output="sigmoid"``) over dynembed tables (``default_value=0``, read-only) holding the
  same keys with the same rows: :func:`dynembed_collection` builds that collection, with
  ``tags`` as a ``pooling="mean"`` feature.

:func:`reference_scores` computes the expected probabilities, to check that both servers
answer alike.

Only the serving path (:class:`CTRDense`, :class:`PeerTables`, :func:`load_dense`) is
needed inside a TorchServe worker; it imports torch alone (the TorchServe venv has no
numpy). Request and table generation import numpy when called.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

FEATURES = ("user", "item", "category", "tags", "hour")
"""Feature order: the dense input is the features' rows concatenated in this order."""
POOLED = {"tags": "mean"}
"""Features that take a list of keys per request, and how their rows are pooled."""
HIDDEN = (64, 32)
DENSE_FILE = "ctr_dense.pt"
WORKLOAD_FILE = "ctr_workload.json"
KEYS_SUFFIX = ".keys.txt"
ROWS_SUFFIX = ".rows.pt"
_ROW_SCALE = 0.5
"""Rows are uniform in [-0.5, 0.5): large enough that the MLP's output depends on them."""


@dataclass(frozen=True)
class Workload:
    """Sizes and seeds of the synthetic CTR workload (the defaults are the benchmark's).

    Attributes:
        n_users: users in the table (``u1`` .. ``u{n_users}``).
        n_items: items in the table.
        n_categories: categories (each item has one, a hash of its key).
        n_tags: tags in the table.
        max_tags: a request has 1 .. ``max_tags`` distinct tags.
        zipf_a: Zipf exponent of users, items and tags (rank 1 the most frequent).
        unseen_share: share of requests whose user (and, separately, item) is new: a key
            past the vocabulary, found in no table.
        dim: embedding dimension of every table.
        seed: seed of the rows and of the MLP's weights (not of the requests: see
            :func:`make_requests`).
    """

    n_users: int = 1_000_000
    n_items: int = 100_000
    n_categories: int = 200
    n_tags: int = 5_000
    max_tags: int = 5
    zipf_a: float = 1.1
    unseen_share: float = 0.01
    dim: int = 16
    seed: int = 0

    @property
    def total_dim(self) -> int:
        """Width of the dense input: one row per feature."""
        return self.dim * len(FEATURES)

    def to_json(self) -> str:
        """The workload as JSON (written into the archive next to the tables)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Workload:
        """The workload :meth:`to_json` wrote."""
        return cls(**json.loads(text))


# ------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------


def _category_of_items(items, n_categories: int):
    """Category number of each item key: a stable hash, so an item always has the same."""
    import numpy as np
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=4,
                                                    person=b"category").digest(), "little")
                     % n_categories for k in items], dtype=np.int64)


def make_requests(n: int, seed: int, workload: Workload | None = None) -> list[dict]:
    """``n`` synthetic CTR requests, each a JSON-able dict ``{feature: value}``.

    The same ``(n, seed, workload)`` always gives the same requests.

    Args:
        n: number of requests.
        seed: seed of the request stream (independent of ``workload.seed``).
        workload: sizes and distributions; :class:`Workload` () by default.

    Returns:
        A list of ``n`` dicts with keys :data:`FEATURES`: ``tags`` a list of 1 ..
        ``max_tags`` distinct strings, every other value a string.
    """
    import numpy as np

    from benchmarks._common import zipf_ranks
    w = workload or Workload()
    if n <= 0:
        return []
    rng = np.random.default_rng([seed, 0x5E12])
    users = zipf_ranks(rng, w.zipf_a, w.n_users, n)
    items = zipf_ranks(rng, w.zipf_a, w.n_items, n)
    # New users and items: ranks past the vocabulary, so no table holds them.
    users = np.where(rng.random(n) < w.unseen_share, w.n_users + users, users)
    items = np.where(rng.random(n) < w.unseen_share, w.n_items + items, items)
    n_tags = rng.integers(1, w.max_tags + 1, size=n)
    tag_pool = zipf_ranks(rng, w.zipf_a, w.n_tags, int(n_tags.sum()) * 2 + 16)
    hours = rng.integers(0, 24, size=n)
    item_keys = [f"i{i}" for i in items.tolist()]
    cats = _category_of_items(item_keys, w.n_categories)
    out: list[dict] = []
    at = 0
    pool = tag_pool.tolist()
    for j in range(n):
        tags: list[str] = []
        while len(tags) < n_tags[j]:
            # Distinct tags; past the end of the pool (rare) fall back to a uniform draw.
            t = f"t{pool[at]}" if at < len(pool) else f"t{int(rng.integers(1, w.n_tags + 1))}"
            at += 1
            if t not in tags:
                tags.append(t)
        out.append({"user": f"u{users[j]}", "item": item_keys[j], "category": f"c{cats[j]}",
                    "tags": tags, "hour": str(int(hours[j]))})
    return out


def request_bodies(requests: Sequence[Mapping]) -> list[bytes]:
    """Each request as a compact UTF-8 JSON body, ready for a load generator."""
    return [json.dumps(r, separators=(",", ":")).encode() for r in requests]


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------


def vocabulary(feature: str, workload: Workload | None = None) -> list[str]:
    """Every key the table of ``feature`` holds, in a fixed order."""
    w = workload or Workload()
    if feature == "user":
        return [f"u{i}" for i in range(1, w.n_users + 1)]
    if feature == "item":
        return [f"i{i}" for i in range(1, w.n_items + 1)]
    if feature == "category":
        return [f"c{i}" for i in range(w.n_categories)]
    if feature == "tags":
        return [f"t{i}" for i in range(1, w.n_tags + 1)]
    if feature == "hour":
        return [str(h) for h in range(24)]
    raise ValueError(f"unknown feature {feature!r}; expected one of {FEATURES}")


def key_rows(feature: str, keys: Sequence[str], dim: int, seed: int):
    """The embedding rows of ``keys`` in ``feature``'s table: a (len(keys), dim) float32
    numpy array, each row a pure function of (feature, key, seed).

    The key is hashed with BLAKE2b (salted with the feature and seed); the hash seeds
    SplitMix64 steps, one per column, mapped to uniform floats in [-0.5, 0.5). So a row never
    depends on which other keys exist, and dynembed's tables can be filled with the same
    rows key by key.
    """
    import numpy as np

    from benchmarks._common import splitmix64
    salt = f"{feature}/{seed}".encode()[:16]
    h = np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, salt=salt)
                                    .digest(), "little") for k in keys),
                    dtype=np.uint64, count=len(keys))
    # splitmix64(x) adds the golden-ratio step itself: consecutive counters are independent.
    steps = (h[:, None] * np.uint64(dim)) + np.arange(dim, dtype=np.uint64)[None, :]
    bits = splitmix64(steps.reshape(-1)).view(np.uint64).reshape(len(keys), dim)
    unit = (bits >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # [0, 1), 24 bits
    return ((unit - 0.5) * (2 * _ROW_SCALE)).astype(np.float32)


def write_artifacts(folder: str | Path, workload: Workload | None = None) -> list[Path]:
    """Writes the model's files into ``folder``: the MLP's weights, the workload, and per
    feature its keys (one a line) and rows (a float32 tensor, row 0 the zero row of unseen
    keys, row i the i-th key's).

    Returns:
        The files written (what goes into the TorchServe archive).
    """
    w = workload or Workload()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    torch.save(make_dense(w).state_dict(), out / DENSE_FILE)
    written.append(out / DENSE_FILE)
    (out / WORKLOAD_FILE).write_text(w.to_json())
    written.append(out / WORKLOAD_FILE)
    for f in FEATURES:
        keys = vocabulary(f, w)
        rows = torch.zeros(len(keys) + 1, w.dim)
        rows[1:] = torch.from_numpy(key_rows(f, keys, w.dim, w.seed))
        (out / f"{f}{KEYS_SUFFIX}").write_text("\n".join(keys) + "\n", encoding="utf-8")
        torch.save(rows, out / f"{f}{ROWS_SUFFIX}")
        written += [out / f"{f}{KEYS_SUFFIX}", out / f"{f}{ROWS_SUFFIX}"]
    return written


class PeerTables:
    """The peer's embedding tables: per feature, a dict key -> row number and a float32
    tensor of rows (row 0 zeros: unseen keys).

    Args:
        index: feature -> {key: row number >= 1}.
        weights: feature -> (rows + 1, dim) tensor.
    """

    def __init__(self, index: dict[str, dict[str, int]], weights: dict[str, torch.Tensor]):
        self.index = index
        self.weights = weights

    @classmethod
    def load(cls, folder: str | Path) -> PeerTables:
        """Reads the tables :func:`write_artifacts` wrote (torch only, no numpy)."""
        folder = Path(folder)
        index, weights = {}, {}
        for f in FEATURES:
            keys = (folder / f"{f}{KEYS_SUFFIX}").read_text(encoding="utf-8").splitlines()
            index[f] = dict(zip(keys, range(1, len(keys) + 1)))
            weights[f] = torch.load(folder / f"{f}{ROWS_SUFFIX}", weights_only=True)
            if weights[f].shape[0] != len(keys) + 1:
                raise ValueError(f"{f}: {weights[f].shape[0]} rows for {len(keys)} keys")
        return cls(index, weights)

    def lookup(self, requests: Sequence[Mapping]) -> torch.Tensor:
        """The dense input of a batch: (len(requests), total_dim) float32, each request's
        feature rows concatenated in :data:`FEATURES` order.

        A missing or unseen key gives the zero row; ``tags`` rows are mean-pooled.
        """
        parts = []
        for f in FEATURES:
            get = self.index[f].get
            if f in POOLED:
                flat, offsets = [], []
                for r in requests:
                    offsets.append(len(flat))
                    flat.extend(get(k, 0) for k in (r.get(f) or ()))
                parts.append(nn.functional.embedding_bag(
                    torch.tensor(flat, dtype=torch.int64), self.weights[f],
                    torch.tensor(offsets, dtype=torch.int64), mode=POOLED[f]))
            else:
                idx = torch.tensor([get(r.get(f), 0) for r in requests], dtype=torch.int64)
                parts.append(self.weights[f].index_select(0, idx))
        return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------------------
# Dense model
# ------------------------------------------------------------------------------------------


class CTRDense(nn.Module):
    """The dense part: an MLP from the concatenated rows to one logit per example.

    Args:
        total_dim: width of the input (dim x number of features).
        hidden: widths of the hidden layers (ReLU after each).

    Input (B, total_dim) float32; output (B,) logits (the servers apply the sigmoid).
    """

    def __init__(self, total_dim: int, hidden: Sequence[int] = HIDDEN):
        super().__init__()
        layers: list[nn.Module] = []
        width = total_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


def make_dense(workload: Workload | None = None) -> CTRDense:
    """The MLP with weights drawn from ``workload.seed`` (the global RNG is left as it
    was), in eval mode."""
    w = workload or Workload()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(w.seed)
        model = CTRDense(w.total_dim)
    return model.eval()


def load_dense(folder: str | Path, workload: Workload, *, script: bool = False) -> nn.Module:
    """The MLP from the weights :func:`write_artifacts` wrote, in eval mode; with
    ``script``, frozen TorchScript (see the handler for which one it uses)."""
    model = CTRDense(workload.total_dim)
    model.load_state_dict(torch.load(Path(folder) / DENSE_FILE, weights_only=True))
    model.eval()
    if script:
        model = torch.jit.freeze(torch.jit.script(model))
    return model


def reference_scores(requests: Sequence[Mapping], tables: PeerTables,
                     dense: nn.Module) -> list[float]:
    """The click probabilities both servers must answer for ``requests``."""
    with torch.inference_mode():
        return torch.sigmoid(dense(tables.lookup(requests))).tolist()


# ------------------------------------------------------------------------------------------
# The same model on dynembed
# ------------------------------------------------------------------------------------------


def dynembed_collection(workload: Workload | None = None, *, chunk: int = 1 << 18):
    """A dynembed ``EmbeddingCollection`` with the peer's tables: one table per feature
    (``default_value=0``), ``tags`` pooled by mean, filled with the same keys and rows.

    Export it with :func:`make_dense` and ``output="sigmoid"`` (``de.serving
    .export_package``) and dynembed's server answers what the peer answers.
    """
    import dynembed as de
    w = workload or Workload()
    coll = de.EmbeddingCollection(
        tables={f: de.TableConfig(dim=w.dim, default_value=0.0) for f in FEATURES},
        features={f: de.FeatureConfig(table=f, pooling=POOLED.get(f)) for f in FEATURES})
    for f in FEATURES:
        keys = vocabulary(f, w)
        for s in range(0, len(keys), chunk):
            part = keys[s:s + chunk]
            coll.tables[f].insert_or_assign(
                part, torch.from_numpy(key_rows(f, part, w.dim, w.seed)))
    return coll
