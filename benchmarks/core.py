"""Core dynembed benchmark: lookup, training, insert, memory and string keys vs baselines.

Run from the repository root::

    python -m benchmarks.core                 # full run: 10M rows (several minutes)
    python -m benchmarks.core --quick         # short run: 1M rows, fewer passes
    python -m benchmarks.core --json out.json # also write the results as JSON
    python -m benchmarks.core --rows 2000000  # override the table size

Every system sees the same workload: ``--batches`` Zipf(1.1) batches of 65,536 keys over a
``--rows`` id space. A Zipf rank r maps to row ``perm[r - 1]`` (a fixed random permutation, so
hot rows are scattered over the table) and row -> id through SplitMix64 (a bijection, so ids
are distinct and spread over the whole int64 range). dynembed gets the ids; the baselines get
the row indices. dynembed's warm tables are filled with the ids of rows 0..N-1 in row order.

Each system runs in its own child process (``--_phase``), so one system's memory (freed or
fragmented heap, optimizer state) can't colour the next one's timings or RSS, and peak memory
is that of the largest single system. A throughput is keys per second over one pass through
all batches, median over ``--repeats`` timed passes after ``warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks._common import (
    WORDS_EXPECTED,
    cpu_busy_seconds,
    default_cache_dir,
    eprint,
    fetch_words,
    fmt_num,
    fmt_rate,
    git_commit,
    loadavg,
    machine_info,
    own_cpu_seconds,
    peak_rss_bytes,
    read_words,
    rss_bytes,
    settle,
    splitmix64,
    time_batches,
    zipf_ranks,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
UNAVAILABLE = "unavailable"

FULL = {"rows": 10_000_000, "n_batches": 8, "repeats": 7, "warmup": 2}
QUICK = {"rows": 1_000_000, "n_batches": 4, "repeats": 5, "warmup": 1}

FOREIGN_WARN = 0.05  # warn when other processes used more than this share of all cores

DYNEMBED_OPTIMIZERS = ("adagrad", "sgd", "rowwise_adagrad", "adam")
PHASES = ("torch", "fbgemm") + tuple(f"dynembed_{o}" for o in DYNEMBED_OPTIMIZERS) + ("strings",)

# name: (numerator metric, denominator metric)
RATIOS = {
    "train_adagrad_vs_torch_sparse": ("dynembed_train_adagrad_keys_per_s", "torch_sparse_train_adagrad_keys_per_s"),
    "train_sgd_vs_torch_sparse": ("dynembed_train_sgd_keys_per_s", "torch_sparse_train_sgd_keys_per_s"),
    "train_adam_vs_torch_sparse_adam": ("dynembed_train_adam_keys_per_s", "torch_sparse_train_adam_keys_per_s"),
    "train_rowwise_adagrad_vs_fbgemm": ("dynembed_train_rowwise_adagrad_keys_per_s", "fbgemm_train_rowwise_adagrad_keys_per_s"),
    "train_sgd_vs_fbgemm": ("dynembed_train_sgd_keys_per_s", "fbgemm_train_sgd_keys_per_s"),
    # A lookup is a read, as in the baselines: eval mode (no inserts, no metadata updates).
    # The train-mode lookup (which also counts keys and could insert) is reported beside it.
    "lookup_vs_index_select": ("dynembed_lookup_eval_keys_per_s", "torch_index_select_keys_per_s"),
    "lookup_vs_python_dict": ("dynembed_lookup_eval_keys_per_s", "python_dict_lookup_keys_per_s"),
    "bytes_per_row_vs_payload": ("dynembed_rss_bytes_per_row", "dynembed_payload_bytes_per_row"),
}
# name: (op, threshold)
TARGETS = {
    "train_adagrad_vs_torch_sparse": (">=", 3.0),
    "train_sgd_vs_torch_sparse": (">=", 1.5),
    "train_adam_vs_torch_sparse_adam": (">=", 3.0),
    "train_rowwise_adagrad_vs_fbgemm": (">=", 0.7),
    "train_sgd_vs_fbgemm": (">=", 0.7),
    "lookup_vs_index_select": (">=", 0.5),
    "lookup_vs_python_dict": (">=", 20.0),
    "bytes_per_row_vs_payload": ("<=", 1.3),
}

# Optimizer-state floats per row, for the payload (used if the optimizer can't say).
STATE_FLOATS = {"sgd": lambda d: 0, "adagrad": lambda d: d, "rowwise_adagrad": lambda d: 1,
                "adam": lambda d: 2 * d}


# ============================================================================================
# Child-process phases
# ============================================================================================


class Phase:
    """Collects one child's metrics, their spread, and free-form info."""

    def __init__(self, name: str, cfg: dict, data: dict):
        self.name, self.cfg, self.data = name, cfg, data
        self.metrics: dict = {}
        self.spread: dict = {}
        self.samples: dict = {}
        self.info: dict = {}

    def log(self, msg: str) -> None:
        eprint(f"  [{self.name}] {msg}")

    def time(self, metric: str, fn, batches, *, keys_per_batch: int | None = None,
             repeats: int | None = None, warmup: int | None = None) -> dict:
        fixed = warmup is not None  # a fixed warm-up (inserts: each pass consumes new keys)
        r = time_batches(fn, batches, keys_per_batch=keys_per_batch or self.cfg["batch"],
                         repeats=repeats or self.cfg["repeats"],
                         warmup=warmup if fixed else self.cfg["warmup"],
                         min_warmup_s=0.0 if fixed else self.cfg["min_warmup_s"])
        self.metrics[metric] = r["keys_per_s"]
        self.spread[metric] = (r["keys_per_s_max"] - r["keys_per_s_min"]) / r["keys_per_s"]
        self.samples[metric] = r["samples_s"]
        self.log(f"{metric:<44s} {fmt_rate(r['keys_per_s'])}  "
                 f"(min {fmt_rate(r['keys_per_s_min']).strip()}, max {fmt_rate(r['keys_per_s_max']).strip()})")
        return r

    def result(self) -> dict:
        self.info["peak_rss_gib"] = round(peak_rss_bytes() / 2**30, 2)
        return {"metrics": self.metrics, "spread": self.spread, "samples_s": self.samples,
                "info": self.info}


def _tensors(data: dict):
    import torch
    rows_b = [torch.from_numpy(np.ascontiguousarray(x)) for x in data["rows_batches"]]
    ids_b = [torch.from_numpy(np.ascontiguousarray(x)) for x in data["id_batches"]]
    grad = torch.from_numpy(np.ascontiguousarray(data["grad"]))
    return rows_b, ids_b, grad


def _insert_batches(cfg: dict, new_batches: list):
    """``rep -> batches`` for insert timing: every pass (warm-up or timed) gets unseen keys."""
    per = cfg["insert_batches_per_pass"]
    warm = cfg["insert_warmup"]

    def get(rep: int):
        slot = (-1 - rep) if rep < 0 else warm + rep
        return new_batches[slot * per:(slot + 1) * per]
    return get


def phase_torch(p: Phase) -> None:
    """index_select, nn.Embedding, Python dict -> nn.Embedding, torch sparse optimizers."""
    import warnings

    import torch
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    cfg = p.cfg
    n, d = cfg["rows"], cfg["dim"]
    rows_b, ids_b, grad = _tensors(p.data)
    torch.manual_seed(cfg["seed"])
    t = time.perf_counter()
    emb = torch.nn.Embedding(n, d, sparse=True)
    p.log(f"nn.Embedding({n:,}, {d}, sparse=True) built in {time.perf_counter() - t:.1f}s")
    w = emb.weight.detach()

    with torch.no_grad():
        p.time("torch_index_select_keys_per_s", lambda b: torch.index_select(w, 0, b), rows_b)
        p.time("torch_embedding_lookup_keys_per_s", lambda b: emb(b), rows_b)

    # Python dict id -> row feeding nn.Embedding.
    t = time.perf_counter()
    table = dict(zip(splitmix64(np.arange(n, dtype=np.int64)).tolist(), range(n)))
    p.log(f"python dict of {len(table):,} ids built in {time.perf_counter() - t:.1f}s")
    getter = table.__getitem__

    def dict_lookup(ids):
        rows = torch.tensor(list(map(getter, ids.tolist())), dtype=torch.int64)
        return emb(rows)

    with torch.no_grad():
        ok = torch.equal(dict_lookup(ids_b[0]), torch.index_select(w, 0, rows_b[0]))
        p.info["python_dict_matches_index_select"] = bool(ok)
        p.time("python_dict_lookup_keys_per_s", dict_lookup, ids_b)

    new_b = [torch.from_numpy(x) for x in p.data["new_id_batches"]]

    def dict_insert(ids):
        start = len(table)
        table.update(zip(ids.tolist(), range(start, start + ids.numel())))

    before = len(table)
    p.time("python_dict_insert_keys_per_s", dict_insert, _insert_batches(cfg, new_b),
           warmup=cfg["insert_warmup"])
    p.info["python_dict_inserted"] = len(table) - before
    del table, getter
    settle()

    optimizers = {
        "sgd": lambda: torch.optim.SGD(emb.parameters(), lr=cfg["lr"]["sgd"]),
        "adagrad": lambda: torch.optim.Adagrad(emb.parameters(), lr=cfg["lr"]["adagrad"]),
        "adam": lambda: torch.optim.SparseAdam(emb.parameters(), lr=cfg["lr"]["adam"]),
    }
    for name, make in optimizers.items():
        opt = make()

        def step(idx, opt=opt):
            opt.zero_grad()
            out = emb(idx)
            out.backward(grad)
            opt.step()

        p.time(f"torch_sparse_train_{name}_keys_per_s", step, rows_b)
        del opt, step
        emb.weight.grad = None
        settle()


def phase_fbgemm(p: Phase) -> None:
    """FBGEMM table-batched embedding on CPU (one table), EXACT_SGD and EXACT_ROWWISE_ADAGRAD."""
    cfg = p.cfg
    try:
        import torch
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as e:  # ImportError, or a broken native build
        p.log(f"fbgemm unavailable: {e!r}")
        for m in ("fbgemm_train_sgd_keys_per_s", "fbgemm_train_rowwise_adagrad_keys_per_s",
                  "fbgemm_lookup_keys_per_s"):
            p.metrics[m] = UNAVAILABLE
        p.info["fbgemm_unavailable"] = repr(e)
        return
    import warnings
    warnings.filterwarnings("ignore")
    n, d, bsz = cfg["rows"], cfg["dim"], cfg["batch"]
    rows_b, _, grad = _tensors(p.data)
    offsets = torch.arange(bsz + 1, dtype=torch.int64)  # bag size 1: one row per output
    ots = {"sgd": (EmbOptimType.EXACT_SGD, {"learning_rate": cfg["lr"]["sgd"]}),
           "rowwise_adagrad": (EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                               {"learning_rate": cfg["lr"]["rowwise_adagrad"], "eps": 1e-8})}
    for name, (ot, kw) in ots.items():
        tbe = None
        for pooling in (PoolingMode.NONE, PoolingMode.SUM):
            try:
                t = time.perf_counter()
                tbe = SplitTableBatchedEmbeddingBagsCodegen(
                    [(n, d, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=ot,
                    pooling_mode=pooling, **kw)
                with torch.no_grad():
                    out = tbe(rows_b[0], offsets)
                if tuple(out.shape) != (bsz, d):
                    raise RuntimeError(f"unexpected output shape {tuple(out.shape)}")
                p.info[f"fbgemm_{name}_pooling_mode"] = pooling.name
                p.log(f"{ot.name} table ({n:,} x {d}, pooling {pooling.name}) built in "
                      f"{time.perf_counter() - t:.1f}s")
                break
            except Exception as e:
                p.log(f"{ot.name} with pooling {pooling.name} failed: {e!r}")
                tbe = None
        if tbe is None:
            p.metrics[f"fbgemm_train_{name}_keys_per_s"] = UNAVAILABLE
            continue
        if name == "sgd":
            with torch.no_grad():
                p.time("fbgemm_lookup_keys_per_s", lambda b: tbe(b, offsets), rows_b)

        def step(idx, tbe=tbe):
            out = tbe(idx, offsets)
            out.backward(grad)

        p.time(f"fbgemm_train_{name}_keys_per_s", step, rows_b)
        del tbe, step
        settle()


def _import_dynembed(p: Phase, metrics: tuple[str, ...]):
    try:
        import dynembed as de
        p.info["dynembed_version"] = getattr(de, "__version__", None)
        get_threads = getattr(de, "get_num_threads", None)
        p.info["dynembed_num_threads"] = get_threads() if callable(get_threads) else None
        return de
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        p.log(f"dynembed not importable: {msg}")
        for m in metrics:
            p.metrics[m] = UNAVAILABLE
        p.info["dynembed_unavailable"] = msg
        return None


def _make_opt(de, name: str, cfg: dict):
    cls = {"sgd": de.optim.SGD, "adagrad": de.optim.Adagrad,
           "rowwise_adagrad": de.optim.RowWiseAdagrad, "adam": de.optim.Adam}[name]
    return cls(lr=cfg["lr"][name])


def phase_dynembed(p: Phase, opt_name: str) -> None:
    """Fill a table to N rows (insert throughput, RSS), then train; lookups/inserts for adagrad."""
    cfg = p.cfg
    n, d, bsz = cfg["rows"], cfg["dim"], cfg["batch"]
    main = opt_name == "adagrad"
    expected = [f"dynembed_train_{opt_name}_keys_per_s"]
    if main:
        expected += ["dynembed_lookup_keys_per_s", "dynembed_find_keys_per_s",
                     "dynembed_lookup_eval_keys_per_s", "dynembed_insert_new_keys_per_s",
                     "dynembed_fill_keys_per_s", "dynembed_rss_bytes_per_row",
                     "dynembed_payload_bytes_per_row"]
    de = _import_dynembed(p, tuple(expected))
    if de is None:
        return
    import torch
    _, ids_b, grad = _tensors(p.data)

    opt = _make_opt(de, opt_name, cfg)
    try:
        state_floats = int(opt.state_width(d))
    except Exception:
        state_floats = STATE_FLOATS[opt_name](d)
    payload = 4 * (d + state_floats)

    # Compile / warm every code path on a tiny table first, so the RSS delta below is the
    # table, not JIT output or first-use buffers.
    t = time.perf_counter()
    small = de.DynamicEmbedding(dim=d, optimizer=_make_opt(de, opt_name, cfg), seed=cfg["seed"])
    k = ids_b[0][:4096]
    small.table.find_or_insert(k)
    small(k).backward(grad[:4096])
    with torch.no_grad():
        small(k)
    small.table.find(k)
    small.eval()
    with torch.no_grad():
        small(k)
    del small
    p.info["warmup_tiny_table_s"] = round(time.perf_counter() - t, 2)
    p.log(f"tiny-table warm-up (JIT) {p.info['warmup_tiny_table_s']}s")

    fill_ids = torch.from_numpy(splitmix64(np.arange(n, dtype=np.int64)))
    settle()
    rss0 = rss_bytes()
    emb = de.DynamicEmbedding(dim=d, optimizer=opt, seed=cfg["seed"])
    t = time.perf_counter()
    if cfg["reserve"]:
        emb.table.reserve(n)
    t_res = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(0, n, bsz):
        emb.table.find_or_insert(fill_ids[s:s + bsz])
    t_fill = time.perf_counter() - t
    settle()
    rss1 = rss_bytes()
    size = int(emb.table.size())
    p.info[f"{opt_name}_reserve_s"] = round(t_res, 3)
    p.info[f"{opt_name}_fill_s"] = round(t_fill, 3)
    p.info[f"{opt_name}_table_size_after_fill"] = size
    p.info[f"{opt_name}_rss_before_fill_bytes"] = rss0
    p.info[f"{opt_name}_rss_after_fill_bytes"] = rss1
    if size != n:
        p.log(f"WARNING: table.size() == {size:,} after inserting {n:,} distinct ids")
    fill_rate = n / t_fill
    bpr = (rss1 - rss0) / max(size, 1)
    p.log(f"filled {size:,} rows in {t_fill:.2f}s ({fmt_rate(fill_rate).strip()}, reserve "
          f"{t_res:.2f}s); RSS +{(rss1 - rss0) / 2**30:.2f} GiB = {bpr:.1f} B/row "
          f"(payload {payload} B/row)")
    p.metrics[f"dynembed_fill_{opt_name}_keys_per_s"] = fill_rate
    p.metrics[f"dynembed_rss_bytes_per_row_{opt_name}"] = bpr
    p.metrics[f"dynembed_payload_bytes_per_row_{opt_name}"] = payload
    if main:
        p.metrics["dynembed_fill_keys_per_s"] = fill_rate
        p.metrics["dynembed_rss_bytes_per_row"] = bpr
        p.metrics["dynembed_payload_bytes_per_row"] = payload
    del fill_ids

    found = emb.table.find(ids_b[0]).found
    p.info[f"{opt_name}_all_batch_keys_found"] = bool(found.all())

    emb.train()
    if main:
        with torch.no_grad():
            out = emb(ids_b[0])
            p.info["lookup_output"] = [list(out.shape), str(out.dtype)]
            p.time("dynembed_lookup_keys_per_s", lambda b: emb(b), ids_b)
        p.time("dynembed_find_keys_per_s", lambda b: emb.table.find(b), ids_b)
        emb.eval()
        with torch.no_grad():
            p.time("dynembed_lookup_eval_keys_per_s", lambda b: emb(b), ids_b)
        emb.train()
        p.info["table_size_after_lookups"] = int(emb.table.size())

    def step(ids):
        out = emb(ids)
        out.backward(grad)

    p.time(f"dynembed_train_{opt_name}_keys_per_s", step, ids_b)
    p.info[f"{opt_name}_table_size_after_train"] = int(emb.table.size())

    if main:
        new_b = [torch.from_numpy(x) for x in p.data["new_id_batches"]]
        before = int(emb.table.size())
        p.time("dynembed_insert_new_keys_per_s", lambda b: emb.table.find_or_insert(b),
               _insert_batches(cfg, new_b), warmup=cfg["insert_warmup"])
        p.info["insert_table_size_before"] = before
        p.info["insert_table_size_after"] = int(emb.table.size())


def phase_strings(p: Phase) -> None:
    """String-key lookup on the English word list: dynembed vs Python dict -> index_select."""
    cfg = p.cfg
    import torch
    words = read_words(Path(cfg["words_path"]))
    wb = p.data["word_batches"]
    nw, d, bsz = len(words), cfg["dim"], cfg["batch"]
    p.info["string_vocab"] = nw

    # Each pass gets freshly built str objects (as if just parsed), so no system profits from
    # a hash CPython cached on a str object in an earlier pass.
    def fresh(rep: int):
        return [[words[i].encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
                 for i in idx.tolist()] for idx in wb]

    # Baseline: Python dict word -> row, then index_select.
    weight = torch.randn(nw, d)
    vocab = {w: i for i, w in enumerate(words)}
    getter = vocab.__getitem__

    def dict_lookup(batch):
        return torch.index_select(weight, 0, torch.tensor(list(map(getter, batch)), dtype=torch.int64))

    with torch.no_grad():
        p.time("python_dict_string_lookup_keys_per_s", dict_lookup, fresh)
    del vocab, getter, weight
    settle()

    de = _import_dynembed(p, ("dynembed_string_lookup_keys_per_s",
                              "dynembed_string_fill_keys_per_s"))
    if de is None:
        return
    emb = de.DynamicEmbedding(dim=d, optimizer=de.optim.SGD(lr=cfg["lr"]["sgd"]), seed=cfg["seed"])
    emb.train()
    chunks = [words[s:s + bsz] for s in range(0, nw, bsz)]
    try:
        emb.table.find_or_insert(chunks[0][:16])  # does the table take str keys directly?
        insert = emb.table.find_or_insert
        p.info["string_fill_call"] = "table.find_or_insert(list[str])"
    except Exception as e:
        p.log(f"table.find_or_insert(list[str]) failed ({type(e).__name__}: {e}); "
              "filling with no-grad emb(list[str]) in train mode")

        def insert(batch):
            with torch.no_grad():
                emb(batch)
        p.info["string_fill_call"] = "no_grad emb(list[str]) in train mode"
    t = time.perf_counter()
    for c in chunks:
        insert(c)
    t_fill = time.perf_counter() - t
    size = int(emb.table.size())
    p.info["string_table_size_after_fill"] = size
    p.metrics["dynembed_string_fill_keys_per_s"] = nw / t_fill
    p.log(f"filled {size:,} string rows in {t_fill:.2f}s ({fmt_rate(nw / t_fill).strip()})")
    with torch.no_grad():
        p.time("dynembed_string_lookup_keys_per_s", lambda b: emb(b), fresh)
    p.info["string_table_size_after_lookup"] = int(emb.table.size())


def run_phase(name: str, workdir: Path) -> int:
    cfg = json.loads((workdir / "config.json").read_text())
    with np.load(workdir / "data.npz") as z:
        data = {k: z[k] for k in z.files}
    p = Phase(name, cfg, data)
    try:
        if name == "torch":
            phase_torch(p)
        elif name == "fbgemm":
            phase_fbgemm(p)
        elif name.startswith("dynembed_"):
            phase_dynembed(p, name[len("dynembed_"):])
        elif name == "strings":
            phase_strings(p)
        else:
            raise ValueError(f"unknown phase {name!r}")
        rc = 0
    except Exception as e:
        p.log("FAILED:\n" + traceback.format_exc())
        p.info["error"] = f"{type(e).__name__}: {e}"
        rc = 1
    (workdir / f"{name}.json").write_text(json.dumps(p.result()))
    return rc


# ============================================================================================
# Parent: workload, orchestration, report
# ============================================================================================


def build_config(args) -> dict:
    base = dict(QUICK if args.quick else FULL)
    if args.rows is not None:
        base["rows"] = args.rows
    if args.repeats is not None:
        base["repeats"] = args.repeats
    if args.batches is not None:
        base["n_batches"] = args.batches
    if base["repeats"] < 5:
        raise SystemExit("--repeats must be >= 5 (the result is a median of at least 5)")
    return {
        "quick": bool(args.quick),
        "rows": int(base["rows"]),
        "dim": 64,
        "batch": 65_536,
        "n_batches": int(base["n_batches"]),
        "repeats": int(base["repeats"]),
        "warmup": int(base["warmup"]),
        "min_warmup_s": 1.0,
        "insert_batches_per_pass": 1,
        "insert_warmup": 1,
        "zipf_a": 1.1,
        "seed": int(args.seed),
        "reserve": not args.no_reserve,
        "lr": {"sgd": 0.05, "adagrad": 0.05, "rowwise_adagrad": 0.05, "adam": 1e-3},
        "id_mapping": "rank r -> row perm[r-1] (fixed random permutation, numpy seed) -> "
                      "id splitmix64(row) as int64; baselines index rows, dynembed gets ids",
        "grad": "fixed N(0,1)*1e-3 float32 tensor (batch, dim) passed to out.backward(grad)",
        "timing": "keys/s over one pass through all batches; median of `repeats` passes after "
                  "at least `warmup` untimed passes and `min_warmup_s` of warm-up; gc disabled while timed; one child process per system",
        "python_dict_baseline": "torch.tensor(list(map(d.__getitem__, ids.tolist()))) -> "
                                "nn.Embedding forward (no grad)",
        "torch_sparse_step": "optimizer.zero_grad(); out = emb(idx); out.backward(grad); "
                             "optimizer.step()  (nn.Embedding sparse=True; Adam = SparseAdam)",
        "fbgemm_step": "out = tbe(idx, offsets=arange(B+1)); out.backward(grad)  (fused update)",
        "dynembed_step": "out = emb(ids); out.backward(grad)  (fused update in backward)",
        "dynembed_lookup": "emb.eval(); emb(ids) on a warm table (a read, as the baselines; "
                           "the ratios use it); also with torch.no_grad() in train mode, "
                           "which also counts keys",
        "insert": "find_or_insert of 65,536 never-seen ids into the warm table per pass; "
                  "fill = N distinct ids into an empty (reserved) table in 65,536-id chunks",
        "memory": "RSS (/proc/self/statm) after filling N rows minus before creating the table, "
                  "in a fresh process after JIT warm-up on a tiny table; payload = 4*(dim + "
                  "optimizer state floats); ratio uses Adagrad",
    }


def make_data(cfg: dict, words: list[str] | None) -> dict:
    rng = np.random.default_rng(cfg["seed"])
    n, bsz, nb = cfg["rows"], cfg["batch"], cfg["n_batches"]
    perm = rng.permutation(n).astype(np.int64)
    ranks = zipf_ranks(rng, cfg["zipf_a"], n, nb * bsz)
    rows = perm[ranks - 1].reshape(nb, bsz)
    ids = splitmix64(rows)
    n_new = (cfg["insert_warmup"] + cfg["repeats"]) * cfg["insert_batches_per_pass"]
    new_ids = splitmix64(n + np.arange(n_new * bsz, dtype=np.int64)).reshape(n_new, bsz)
    grad = (rng.standard_normal((bsz, cfg["dim"]), dtype=np.float32) * 1e-3).astype(np.float32)
    data = {"rows_batches": rows, "id_batches": ids, "new_id_batches": new_ids, "grad": grad}
    if words is not None:
        wperm = rng.permutation(len(words)).astype(np.int64)
        wranks = zipf_ranks(rng, cfg["zipf_a"], len(words), nb * bsz)
        data["word_batches"] = wperm[wranks - 1].reshape(nb, bsz)
    cfg["distinct_keys_per_batch_mean"] = float(np.mean([np.unique(r).size for r in rows]))
    return data


def spawn_phase(name: str, workdir: Path, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.core", "--_phase", name, "--_workdir", str(workdir)]
    t = time.perf_counter()
    busy0, own0 = cpu_busy_seconds(), own_cpu_seconds()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: collections.deque[str] = collections.deque(maxlen=30)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    th.join(timeout=10)
    wall = time.perf_counter() - t
    # CPU time other processes used while this system was measured (the box is shared).
    foreign = max(0.0, (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0))
    share = foreign / (wall * (os.cpu_count() or 1))
    path = workdir / f"{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {"metrics": {}, "spread": {},
                                                               "samples_s": {}, "info": {}}
    res["info"]["wall_s"] = round(wall, 1)
    res["info"]["foreign_cpu_s"] = round(foreign, 1)
    res["info"]["foreign_cpu_share"] = round(share, 3)
    if share > FOREIGN_WARN:
        eprint(f"WARNING: other processes used {foreign:.1f} CPU-s ({100 * share:.0f}% of the "
               f"machine) while '{name}' ran; its timings are contaminated")
    if rc is None:
        res["info"]["error"] = f"timed out after {timeout:.0f}s"
    elif rc != 0 and "error" not in res["info"]:
        res["info"]["error"] = f"exit code {rc} (killed? out of memory?): " + " | ".join(list(tail)[-5:])
    return res


def foreign_share(window_s: float) -> float:
    """Share of all cores that other processes used during a ``window_s`` sleep."""
    b0, o0, t0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    time.sleep(window_s)
    return max(0.0, (cpu_busy_seconds() - b0) - (own_cpu_seconds() - o0)) / (
        (time.perf_counter() - t0) * (os.cpu_count() or 1))


def wait_quiet(limit_s: float, window_s: float = 2.0) -> bool:
    """Waits (up to ``limit_s``) for a ``window_s`` window in which other processes use less
    than FOREIGN_WARN of the machine; True if one came."""
    t_end = time.perf_counter() + limit_s
    first = True
    while True:
        share = foreign_share(window_s)
        if share <= FOREIGN_WARN:
            return True
        if time.perf_counter() >= t_end:
            eprint(f"machine still busy ({100 * share:.0f}% used by others) after waiting "
                   f"{limit_s:.0f}s; going on")
            return False
        if first:
            eprint(f"machine busy ({100 * share:.0f}% used by other processes); waiting up to "
                   f"{limit_s:.0f}s for it to go quiet ...")
            first = False


def compute_ratios(metrics: dict) -> tuple[dict, dict]:
    ratios, targets = {}, {}
    for name, (num, den) in RATIOS.items():
        a, b = metrics.get(num), metrics.get(den)
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0
        ratios[name] = (a / b) if ok else None
        op, thr = TARGETS[name]
        v = ratios[name]
        passed = None if v is None else (v >= thr if op == ">=" else v <= thr)
        targets[name] = {"target": f"{op} {thr:g}", "op": op, "threshold": thr, "value": v,
                         "pass": passed}
    return ratios, targets


def render(report: dict) -> str:
    m, cfg, sp = report["metrics"], report["config"], report["config"].get("spread", {})
    L: list[str] = []

    def row(label, key, kind="rate"):
        v = m.get(key)
        s = sp.get(key)
        val = fmt_rate(v) if kind == "rate" else fmt_num(v)
        extra = f"   spread {100 * s:4.0f}%" if isinstance(s, (int, float)) else ""
        L.append(f"  {label:<56s} {val:>12s}{extra}")

    mach = report["machine"]
    L.append("=" * 92)
    L.append(f"dynembed core benchmark   rows={cfg['rows']:,}  dim={cfg['dim']}  batch={cfg['batch']:,}  "
             f"Zipf({cfg['zipf_a']})  {cfg['n_batches']} batches x {cfg['repeats']} passes (median)"
             + ("  [quick]" if cfg["quick"] else ""))
    L.append(f"{mach['cpu_model']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM; "
             f"commit {report['commit'][:12]}" + (" (+ uncommitted changes)" if cfg.get("git_dirty") else ""))
    L.append(f"python {mach['python']}, torch {mach['torch']} ({mach['torch_threads']} threads), "
             f"numba {mach['numba']}, fbgemm-gpu-cpu {mach.get('fbgemm_gpu_cpu') or '-'}, "
             f"dynembed kernel threads {mach.get('dynembed_num_threads', '-')}")
    L.append(f"mean distinct keys per batch: {cfg.get('distinct_keys_per_batch_mean', 0):,.0f} of {cfg['batch']:,}")
    L.append("-" * 92)
    L.append("Lookup (keys/s)")
    row("dynembed  emb(ids)  [eval mode: read; used in ratios]", "dynembed_lookup_eval_keys_per_s")
    row("dynembed  emb.table.find(ids)", "dynembed_find_keys_per_s")
    row("dynembed  with no_grad: emb(ids)  [train mode: counts keys]", "dynembed_lookup_keys_per_s")
    row("torch.index_select(weight, 0, rows)", "torch_index_select_keys_per_s")
    row("nn.Embedding(rows)", "torch_embedding_lookup_keys_per_s")
    row("python dict id->row + nn.Embedding", "python_dict_lookup_keys_per_s")
    row("fbgemm TBE forward (CPU)", "fbgemm_lookup_keys_per_s")
    L.append("Training step: lookup + backward + sparse update (keys/s)")
    for o, label in (("sgd", "SGD"), ("adagrad", "Adagrad"), ("rowwise_adagrad", "RowWiseAdagrad"),
                     ("adam", "Adam")):
        row(f"dynembed {label}", f"dynembed_train_{o}_keys_per_s")
        if o in ("sgd", "adagrad", "adam"):
            row(f"torch sparse {label if o != 'adam' else 'SparseAdam'}", f"torch_sparse_train_{o}_keys_per_s")
        if o in ("sgd", "rowwise_adagrad"):
            row(f"fbgemm EXACT_{'SGD' if o == 'sgd' else 'ROWWISE_ADAGRAD'}", f"fbgemm_train_{o}_keys_per_s")
    L.append("Insert (keys/s)")
    row("dynembed find_or_insert, 65,536 new ids into warm table", "dynembed_insert_new_keys_per_s")
    row("dynembed fill: N new ids into empty table (Adagrad)", "dynembed_fill_keys_per_s")
    row("python dict.update, same new ids (reference)", "python_dict_insert_keys_per_s")
    L.append(f"Memory at {cfg['rows']:,} rows (bytes/row; RSS delta vs payload)")
    for o in DYNEMBED_OPTIMIZERS:
        r, pl = m.get(f"dynembed_rss_bytes_per_row_{o}"), m.get(f"dynembed_payload_bytes_per_row_{o}")
        if isinstance(r, (int, float)):
            L.append(f"  {'dynembed ' + o:<56s} {r:12.1f}   payload {pl} ({r / pl:.2f}x)")
        else:
            L.append(f"  {'dynembed ' + o:<56s} {fmt_num(r):>12s}")
    L.append("String keys (English word list)")
    if cfg.get("skipped", {}).get("strings"):
        L.append(f"  SKIPPED: {cfg['skipped']['strings']}")
    else:
        row("dynembed with no_grad: emb(list[str])", "dynembed_string_lookup_keys_per_s")
        row("python dict word->row + index_select", "python_dict_string_lookup_keys_per_s")
        row("dynembed fill (all words)", "dynembed_string_fill_keys_per_s")
    L.append("-" * 92)
    L.append(f"{'Ratios (dynembed / baseline)':<50s} {'value':>10s}   {'target':>7s}   result")
    npass = nfail = 0
    for name, t in report["targets"].items():
        v = t["value"]
        res = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        npass += t["pass"] is True
        nfail += t["pass"] is False
        val = "-" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.1f}")
        L.append(f"  {name:<48s} {val:>10s}   {t['target']:>7s}   {res}")
    L.append(f"  {npass} pass, {nfail} fail, {len(report['targets']) - npass - nfail} n/a")
    busy = {k: v.get("foreign_cpu_share") for k, v in cfg.get("phase_info", {}).items()
            if (v.get("foreign_cpu_share") or 0) > FOREIGN_WARN}
    if busy:
        L.append("-" * 92)
        L.append("  WARNING: other processes used CPU during: " + ", ".join(
            f"{k} ({100 * v:.0f}% of all cores)" for k, v in busy.items())
            + "; those timings are unreliable")
    errs = cfg.get("errors", {})
    if errs:
        L.append("-" * 92)
        for k, v in errs.items():
            L.append(f"  ERROR in {k}: {v}")
    L.append("=" * 92)
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (1M rows, 4 batches, 5 passes)")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")
    ap.add_argument("--rows", type=int, help="table size / id space (default 10M, quick 1M)")
    ap.add_argument("--repeats", type=int, help="timed passes per measurement (>= 5)")
    ap.add_argument("--batches", type=int, help="distinct batches per pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of: {','.join(PHASES)}")
    ap.add_argument("--words", metavar="PATH", help="word list to use instead of fetching it")
    ap.add_argument("--no-reserve", action="store_true", help="don't call table.reserve(N) before filling")
    ap.add_argument("--phase-timeout", type=float, help="seconds per system (default 1800, quick 600)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each system, wait up to S seconds for other processes to "
                         "stop using the CPU (default 0: don't wait)")
    ap.add_argument("--retries", type=int, default=0, metavar="N",
                    help="re-run a system up to N times if other processes used more than "
                         f"{100 * FOREIGN_WARN:.0f}%% of the CPU while it ran; keep the "
                         "least-disturbed run (default 0)")
    ap.add_argument("--_phase", help=argparse.SUPPRESS)
    ap.add_argument("--_workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._phase:
        return run_phase(args._phase, Path(args._workdir))

    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = [x for x in phases if x not in PHASES]
    if bad:
        ap.error(f"unknown phases {bad}; choose from {list(PHASES)}")
    cfg = build_config(args)
    cfg["phases"] = list(phases)
    cfg["wait_quiet_s"] = args.wait_quiet
    cfg["retries"] = args.retries
    cfg["skipped"] = {}
    cfg["loadavg_start"] = loadavg()
    t_start = time.perf_counter()
    if args.wait_quiet <= 0:
        busy = foreign_share(1.0)
        cfg["foreign_cpu_share_at_start"] = round(busy, 3)
        if busy > FOREIGN_WARN:
            eprint(f"WARNING: other processes are using {100 * busy:.0f}% of the CPU; timings "
                   "will be unreliable (see --wait-quiet / --retries)")

    words = None
    if "strings" in phases:
        if args.words:
            wpath, msg = Path(args.words), f"given: {args.words}"
            if not wpath.is_file():
                wpath, msg = None, f"--words {args.words}: no such file"
        else:
            wpath, msg = fetch_words(default_cache_dir(), eprint)
        if wpath is None:
            cfg["skipped"]["strings"] = f"word list unavailable ({msg}); string-key benchmark (e) skipped"
            eprint(f"SKIPPING string keys: {msg}")
            phases.remove("strings")
        else:
            words = read_words(wpath)
            cfg["words_path"] = str(wpath)
            cfg["words_source"] = msg
            cfg["words_count"] = len(words)
            if len(words) != WORDS_EXPECTED:
                eprint(f"note: word list has {len(words):,} lines, expected {WORDS_EXPECTED:,}")

    eprint(f"generating workload: {cfg['rows']:,} rows, {cfg['n_batches']} x {cfg['batch']:,} keys ...")
    data = make_data(cfg, words)
    del words
    workdir = Path(tempfile.mkdtemp(prefix="dynembed-bench-"))
    try:
        np.savez(workdir / "data.npz", **data)
        (workdir / "config.json").write_text(json.dumps(cfg))
        del data
        timeout = args.phase_timeout or (600 if cfg["quick"] else 1800)
        metrics: dict = {}
        spread: dict = {}
        samples: dict = {}
        info: dict = {}
        errors: dict = {}
        for ph in phases:
            res = None
            for attempt in range(1 + max(0, args.retries)):
                if args.wait_quiet > 0:
                    wait_quiet(args.wait_quiet)
                eprint(f"--- {ph} ---" + (f" (retry {attempt})" if attempt else ""))
                r = spawn_phase(ph, workdir, timeout)
                r["info"]["attempts"] = attempt + 1
                if res is None or ("error" in res["info"] and "error" not in r["info"]) or (
                        "error" not in r["info"]
                        and r["info"]["foreign_cpu_share"] < res["info"]["foreign_cpu_share"]):
                    res = r
                if "error" in r["info"] or r["info"]["foreign_cpu_share"] <= FOREIGN_WARN:
                    break
            metrics.update(res["metrics"])
            spread.update(res["spread"])
            samples.update(res["samples_s"])
            info[ph] = res["info"]
            if "error" in res["info"]:
                errors[ph] = res["info"]["error"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ratios, targets = compute_ratios(metrics)
    commit, dirty = git_commit(REPO_ROOT)
    cfg["git_dirty"] = dirty
    cfg["spread"] = spread  # (max - min) / median keys/s per metric
    cfg["samples_s"] = samples  # seconds per timed pass, per metric
    cfg["phase_info"] = info
    cfg["errors"] = errors
    cfg["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    cfg["loadavg_end"] = loadavg()
    cfg["python_executable"] = sys.executable
    mach = machine_info()
    for ph_info in info.values():  # what the dynembed phases saw
        for k in ("dynembed_version", "dynembed_num_threads"):
            if ph_info.get(k) is not None:
                mach.setdefault(k, ph_info[k])
    report = {
        "metrics": metrics,
        "ratios": ratios,
        "targets": targets,
        "machine": mach,
        "commit": commit,
        "command": ["python", "-m", "benchmarks.core", *(sys.argv[1:] if argv is None else argv)],
        "config": cfg,
    }
    print(render(report), flush=True)
    if args.json:
        path = Path(args.json)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        eprint(f"wrote {path}")
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
