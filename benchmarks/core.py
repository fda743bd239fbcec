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

Each optimizer runs in its own child process (``--_phase``), holding dynembed's table and
that optimizer's baselines (torch sparse, FBGEMM; the Adagrad process also the lookup and
insert baselines), so one optimizer's memory can't colour the next one's timings or RSS.
dynembed's resident bytes are measured before any baseline allocates. Inside a process the
systems are timed together: every repeat times one pass of each, one after the other, in
orders where each system follows every other equally often. This VM's speed drifts by tens of percent over minutes, more
than some of the targets' margins; passes of one repeat see the same machine, so each
ratio is the median over repeats of the per-pass ratio. A throughput is keys per second over
one pass through all batches, median over ``--repeats`` timed passes after ``warmup``
untimed ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import (
    WORDS_EXPECTED,
    Phase,
    PhaseResults,
    add_harness_args,
    build_report,
    check_quiet_at_start,
    default_cache_dir,
    eprint,
    evaluate_target,
    fetch_words,
    fmt_num,
    fmt_rate,
    loadavg,
    metric_row,
    paired_ratio,
    parse_phases,
    read_words,
    record_run_options,
    report_footer,
    report_header,
    rss_bytes,
    run_phase,
    run_phases,
    run_sizes,
    settle,
    splitmix64,
    timed_together,
    verdict,
    write_report,
    zipf_ranks,
)

MODULE = "benchmarks.core"
UNAVAILABLE = "unavailable"

# 15 timed passes: a neighbour that slows a few seconds of a run hits a few passes, which
# moved the median of 7 (the SGD ratio went 1.64 -> 1.30 with 3 of 7 passes hit)
FULL = {"rows": 10_000_000, "n_batches": 8, "repeats": 15, "warmup": 2}
QUICK = {"rows": 1_000_000, "n_batches": 4, "repeats": 5, "warmup": 1}

DYNEMBED_OPTIMIZERS = ("adagrad", "sgd", "rowwise_adagrad", "adam")
PHASES = DYNEMBED_OPTIMIZERS + ("strings",)

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


TORCH_OPTIMIZERS = ("sgd", "adagrad", "adam")
"""Optimizers with a torch sparse baseline (Adam's is SparseAdam)."""
FBGEMM_OPTIMIZERS = ("sgd", "rowwise_adagrad")
"""Optimizers with an FBGEMM fused baseline (EXACT_SGD, EXACT_ROWWISE_ADAGRAD)."""


def _torch_embedding(p: Phase):
    """nn.Embedding(N, dim, sparse=True) seeded from the run's seed."""
    import torch
    n, d = p.cfg["rows"], p.cfg["dim"]
    torch.manual_seed(p.cfg["seed"])
    t = time.perf_counter()
    emb = torch.nn.Embedding(n, d, sparse=True)
    p.log(f"nn.Embedding({n:,}, {d}, sparse=True) built in {time.perf_counter() - t:.1f}s")
    return emb


def _torch_step(p: Phase, emb, opt_name: str, grad):
    """The torch sparse training step for ``opt_name`` (a fresh torch optimizer)."""
    import torch
    lr = p.cfg["lr"][opt_name]
    opt = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
           "adam": torch.optim.SparseAdam}[opt_name](emb.parameters(), lr=lr)

    def step(idx):
        opt.zero_grad()
        out = emb(idx)
        out.backward(grad)
        opt.step()
    return step


def _fbgemm_table(p: Phase, opt_name: str, rows_b):
    """FBGEMM's CPU table-batched embedding (one table) with the fused ``opt_name`` update,
    or None (the metrics marked unavailable) when fbgemm is missing or fails."""
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
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken native build
        p.log(f"fbgemm unavailable: {e!r}")
        p.info["fbgemm_unavailable"] = repr(e)
        return _fbgemm_unavailable(p, opt_name)
    import warnings
    warnings.filterwarnings("ignore")
    n, d, bsz = cfg["rows"], cfg["dim"], cfg["batch"]
    offsets = torch.arange(bsz + 1, dtype=torch.int64)  # bag size 1: one row per output
    ot, kw = {"sgd": (EmbOptimType.EXACT_SGD, {"learning_rate": cfg["lr"]["sgd"]}),
              "rowwise_adagrad": (EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                  {"learning_rate": cfg["lr"]["rowwise_adagrad"], "eps": 1e-8}),
              }[opt_name]
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
            p.info[f"fbgemm_{opt_name}_pooling_mode"] = pooling.name
            p.log(f"{ot.name} table ({n:,} x {d}, pooling {pooling.name}) built in "
                  f"{time.perf_counter() - t:.1f}s")
            return lambda idx: tbe(idx, offsets)
        except Exception as e:  # noqa: BLE001 - any failure: try the next pooling mode
            p.log(f"{ot.name} with pooling {pooling.name} failed: {e!r}")
    return _fbgemm_unavailable(p, opt_name)


def _fbgemm_unavailable(p: Phase, opt_name: str) -> None:
    """Marks the FBGEMM metrics of ``opt_name``'s phase unavailable."""
    p.metrics[f"fbgemm_train_{opt_name}_keys_per_s"] = UNAVAILABLE
    if opt_name == "sgd":
        p.metrics["fbgemm_lookup_keys_per_s"] = UNAVAILABLE


def _import_dynembed(p: Phase, metrics: tuple[str, ...]):
    try:
        import dynembed as de
        p.record_dynembed(de)
        return de
    except Exception as e:  # noqa: BLE001 - any failure is reported, the run goes on
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


def _filled_table(p: Phase, de, opt_name: str, ids_b, grad):
    """A dynembed table filled with the N ids of the id space: records the fill rate and
    the resident bytes per row (measured before any baseline allocates)."""
    import torch
    cfg = p.cfg
    n, d, bsz = cfg["rows"], cfg["dim"], cfg["batch"]
    main = opt_name == "adagrad"
    opt = _make_opt(de, opt_name, cfg)
    try:
        state_floats = int(opt.state_width(d))
    except Exception:  # noqa: BLE001 - an optimizer that can't say: the known widths
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
    return emb


def _time_lookups(p: Phase, emb, torch_emb, rows_b, ids_b) -> dict:
    """Lookups on the warm table and the lookup baselines, interleaved. Returns the Python
    dict id -> row (kept for the insert reference)."""
    import torch
    n = p.cfg["rows"]
    w = torch_emb.weight.detach()
    t = time.perf_counter()
    table = dict(zip(splitmix64(np.arange(n, dtype=np.int64)).tolist(), range(n)))
    p.log(f"python dict of {len(table):,} ids built in {time.perf_counter() - t:.1f}s")
    getter = table.__getitem__

    def dict_lookup(ids):
        rows = torch.tensor(list(map(getter, ids.tolist())), dtype=torch.int64)
        return torch_emb(rows)

    entries = {
        "torch_index_select_keys_per_s": (lambda b: torch.index_select(w, 0, b), rows_b),
        "torch_embedding_lookup_keys_per_s": (torch_emb, rows_b),
        "python_dict_lookup_keys_per_s": (dict_lookup, ids_b),
    }
    if emb is not None:
        def eval_lookup(ids):
            emb.train(False)  # a read, as the baselines
            return emb(ids)

        def train_lookup(ids):
            emb.train(True)  # also counts every key in the row metadata
            return emb(ids)

        entries["dynembed_lookup_eval_keys_per_s"] = (eval_lookup, ids_b)
        entries["dynembed_lookup_keys_per_s"] = (train_lookup, ids_b)
        entries["dynembed_find_keys_per_s"] = (emb.table.find, ids_b)
    with torch.no_grad():
        ok = torch.equal(dict_lookup(ids_b[0]), torch.index_select(w, 0, rows_b[0]))
        p.info["python_dict_matches_index_select"] = bool(ok)
        if emb is not None:
            out = eval_lookup(ids_b[0])
            p.info["lookup_output"] = [list(out.shape), str(out.dtype)]
        p.time_together(entries)
    if emb is not None:
        emb.train()
        p.info["table_size_after_lookups"] = int(emb.table.size())
    return table


def _time_inserts(p: Phase, emb, table: dict) -> None:
    """Inserts of never-seen ids: dynembed's find_or_insert and dict.update, interleaved."""
    import torch
    cfg = p.cfg
    new_b = [torch.from_numpy(x) for x in p.data["new_id_batches"]]

    def dict_insert(ids):
        start = len(table)
        table.update(zip(ids.tolist(), range(start, start + ids.numel())))

    entries = {"python_dict_insert_keys_per_s": (dict_insert, _insert_batches(cfg, new_b))}
    dict_before = len(table)
    if emb is not None:
        p.info["insert_table_size_before"] = int(emb.table.size())
        entries["dynembed_insert_new_keys_per_s"] = (emb.table.find_or_insert,
                                                     _insert_batches(cfg, new_b))
    p.time_together(entries, warmup=cfg["insert_warmup"])
    p.info["python_dict_inserted"] = len(table) - dict_before
    if emb is not None:
        p.info["insert_table_size_after"] = int(emb.table.size())


def phase_optimizer(p: Phase, opt_name: str) -> None:
    """One optimizer: dynembed's table filled to N rows (fill rate, RSS), then training
    steps timed together with the same optimizer's baselines (torch sparse, FBGEMM);
    Adagrad's phase also times the lookups and inserts with theirs."""
    main = opt_name == "adagrad"
    metric = f"dynembed_train_{opt_name}_keys_per_s"
    expected = [metric, f"dynembed_fill_{opt_name}_keys_per_s"]
    if main:
        expected += ["dynembed_lookup_keys_per_s", "dynembed_find_keys_per_s",
                     "dynembed_lookup_eval_keys_per_s", "dynembed_insert_new_keys_per_s",
                     "dynembed_fill_keys_per_s", "dynembed_rss_bytes_per_row",
                     "dynembed_payload_bytes_per_row"]
    import warnings

    import torch
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    rows_b, ids_b, grad = _tensors(p.data)
    de = _import_dynembed(p, tuple(expected))
    emb = _filled_table(p, de, opt_name, ids_b, grad) if de is not None else None
    torch_emb = _torch_embedding(p) if opt_name in TORCH_OPTIMIZERS else None
    table = _time_lookups(p, emb, torch_emb, rows_b, ids_b) if main else None

    steps = {}
    if emb is not None:
        def step(ids):
            out = emb(ids)
            out.backward(grad)
        steps[metric] = (step, ids_b)
    if torch_emb is not None:
        steps[f"torch_sparse_train_{opt_name}_keys_per_s"] = (
            _torch_step(p, torch_emb, opt_name, grad), rows_b)
    tbe = _fbgemm_table(p, opt_name, rows_b) if opt_name in FBGEMM_OPTIMIZERS else None
    if tbe is not None:
        if opt_name == "sgd":
            with torch.no_grad():
                p.time("fbgemm_lookup_keys_per_s", tbe, rows_b)

        def fbgemm_step(idx):
            tbe(idx).backward(grad)
        steps[f"fbgemm_train_{opt_name}_keys_per_s"] = (fbgemm_step, rows_b)
    p.time_together(steps)
    if emb is not None:
        p.info[f"{opt_name}_table_size_after_train"] = int(emb.table.size())
    if main:
        # The inserts grow the arena past its reservation (a copy of every row): free the
        # torch baseline's weights and optimizer state first.
        steps = torch_emb = tbe = None
        settle()
        _time_inserts(p, emb, table)


def phase_strings(p: Phase) -> None:
    """String-key lookup on the English word list: dynembed vs Python dict -> index_select,
    timed together."""
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

    entries = {"python_dict_string_lookup_keys_per_s": (dict_lookup, fresh)}
    de = _import_dynembed(p, ("dynembed_string_lookup_keys_per_s",
                              "dynembed_string_fill_keys_per_s"))
    if de is not None:
        emb = de.DynamicEmbedding(dim=d, optimizer=de.optim.SGD(lr=cfg["lr"]["sgd"]),
                                  seed=cfg["seed"])
        emb.train()
        emb.table.find_or_insert(words[:16])  # loads the compiled kernels, untimed
        t = time.perf_counter()
        for s in range(0, nw, bsz):
            emb.table.find_or_insert(words[s:s + bsz])
        t_fill = time.perf_counter() - t
        size = int(emb.table.size())
        p.info["string_table_size_after_fill"] = size
        p.metrics["dynembed_string_fill_keys_per_s"] = nw / t_fill
        p.log(f"filled {size:,} string rows in {t_fill:.2f}s ({fmt_rate(nw / t_fill).strip()})")
        entries["dynembed_string_lookup_keys_per_s"] = (emb, fresh)
    with torch.no_grad():
        p.time_together(entries)
    if de is not None:
        p.info["string_table_size_after_lookup"] = int(emb.table.size())


def run_system(p: Phase) -> None:
    """Runs the phase named ``p.name`` (in the child process)."""
    if p.name in DYNEMBED_OPTIMIZERS:
        phase_optimizer(p, p.name)
    elif p.name == "strings":
        phase_strings(p)
    else:
        raise ValueError(f"unknown phase {p.name!r}")


# ============================================================================================
# Parent: workload, orchestration, report
# ============================================================================================


def build_config(args) -> dict:
    base = run_sizes(args, FULL, QUICK, {"rows": "rows", "repeats": "repeats", "batches": "n_batches"})
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
                  "at least `warmup` untimed passes and `min_warmup_s` of warm-up; gc disabled "
                  "while timed; one child process per optimizer (and one for string keys), in "
                  "which dynembed and that optimizer's baselines are timed together: each "
                  "repeat times one pass of every system, one after the other (Williams-design "
                  "orders: each system in every place, after every other equally often); "
                  "paired ratios are medians of the per-pass "
                  "ratios",
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


def compute_ratios(results: PhaseResults) -> tuple[dict, dict]:
    """Each ratio pass by pass where its two metrics were timed together
    (:func:`paired_ratio`), else as the ratio of their medians."""
    ratios, targets = {}, {}
    for name, (num, den) in RATIOS.items():
        ratios[name] = paired_ratio(results, num, den)
        targets[name] = evaluate_target(*TARGETS[name], ratios[name])
        targets[name]["timed_together"] = timed_together(results, num, den)
    return ratios, targets


def render(report: dict) -> str:
    m, cfg, sp = report["metrics"], report["config"], report["config"].get("spread", {})
    L: list[str] = []

    def row(label, key, kind="rate"):
        v = m.get(key)
        L.append(metric_row(label, fmt_rate(v) if kind == "rate" else fmt_num(v), sp.get(key), 56))

    mach = report["machine"]
    L.extend(report_header(
        report,
        f"dynembed core benchmark   rows={cfg['rows']:,}  dim={cfg['dim']}  batch={cfg['batch']:,}  "
        f"Zipf({cfg['zipf_a']})  {cfg['n_batches']} batches x {cfg['repeats']} passes (median)"
        + ("  [quick]" if cfg["quick"] else ""),
        f"fbgemm-gpu-cpu {mach.get('fbgemm_gpu_cpu') or '-'}, "
        f"dynembed kernel threads {mach.get('dynembed_num_threads', '-')}",
        92))
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
    for name, t in report["targets"].items():
        v = t["value"]
        val = "-" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.1f}")
        paired = "  (paired)" if t.get("timed_together") else ""
        L.append(f"  {name:<48s} {val:>10s}   {t['target']:>7s}   {verdict(t['pass'])}{paired}")
    L.append("  (paired): both systems timed in one process, passes interleaved; the ratio is the "
             "median of the per-pass ratios")
    L.extend(report_footer(report, 92))
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0],
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
    add_harness_args(ap, timeout_s=1800, quick_timeout_s=600)
    args = ap.parse_args(argv)

    if args._phase:
        return run_phase(args._phase, Path(args._workdir), run_system)

    phases = parse_phases(ap, args.phases, PHASES)
    cfg = build_config(args)
    record_run_options(cfg, phases, args)
    cfg["skipped"] = {}
    cfg["loadavg_start"] = loadavg()
    t_start = time.perf_counter()
    check_quiet_at_start(cfg, args.wait_quiet)

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
    results = run_phases(MODULE, cfg, data, phases, prefix="dynembed-bench-",
                         timeout=args.phase_timeout or (600 if cfg["quick"] else 1800),
                         wait_quiet_s=args.wait_quiet, retries=args.retries)

    ratios, targets = compute_ratios(results)
    report = build_report(MODULE, argv, cfg, results, t_start, ratios, targets)
    write_report(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
