"""Storage-tier benchmark: a table bounded in memory over RocksDB and Redis, against the raw
stores and the all-in-memory table.

Run from the repository root::

    python -m benchmarks.tiers                 # full run (several minutes)
    python -m benchmarks.tiers --quick         # short run (under a minute or so)
    python -m benchmarks.tiers --json bench-results/tiers.json   # also write JSON

Everything trains ``DynamicEmbedding(dim=32, optimizer=Adagrad(lr=0.05))`` with
``out = emb(ids); out.backward(grad)`` (``grad`` a fixed ``N(0, 1) * 1e-3`` tensor) on batches
of 4,096 int64 keys, with the library's defaults otherwise (LRU eviction, write-back, and
the stores' ``background_io`` off: evicted rows are written by the lookup that evicts them).
Zipf rank r maps to id ``splitmix64(r - 1 + salt)``
(a bijection, so distinct ranks give distinct ids, and hot ids are scattered over the whole
int64 range, not contiguous). Each system runs in its own child process (``--_phase``) on
batches the parent generated once, so all see the same keys. Redis is a real
``redis-server`` on 127.0.0.1 (no persistence), started by the phase that uses it, on the
same machine (it competes for the same cores).

Training over a store runs two loops, each on a fresh table and store: the plain loop (the
step above: the library's default usage, and the one ``tiered_95pct_hit_vs_in_memory``
uses), and with prefetch, where each step first calls ``emb.prefetch(next_ids)`` so the
next batch's stored rows are read on a background thread while this step trains (phases
``*_prefetch``, reported beside the plain loop without a target; on a 2-core machine it
measured slower). The in-memory reference runs the plain loop (prefetch is a no-op without
a store).

Workloads and what is measured
------------------------------

1. **Training over 100M ids** (``memory``, ``rocksdb[_prefetch]``, ``redis[_prefetch]``).
   Zipf(1.1) over 100M ids, a stream of ``(warmup_segments + repeats) * segment_steps``
   batches. The memory budget is ``max_rows = 5%`` of the distinct ids in the whole stream
   (counted by the parent in a dry pass over the same batches). The stream is cut into
   segments; the warm-up segments run untimed (they fill memory to its budget), then each
   timed segment is one pass and the reported keys/s is the median over the timed segments
   (each segment sees new batches: the stream goes on). Reported per backend: keys/s of
   training steps, the hit rate (``stats().totals``: memory hits / keys, over the timed
   segments), rows read from the store and rows written to it per key, and storage per row:
   RocksDB ``disk_bytes()`` / stored rows after ``table.flush()`` (SST files plus the
   write-ahead log, which still holds overwritten versions), the same after closing the
   store and a full manual compaction, and for Redis ``INFO memory`` ``used_memory`` growth
   since the server started / stored rows. The all-in-memory table (unbounded, reserved for
   every distinct id) runs the same stream as the upper reference. A large share of the keys
   (14% in the full run) are first touches of an id (compulsory misses, a new row in every
   system, and a store read that finds nothing in the tiers), so no budget gives a high hit
   rate on this stream; workload 3 is the 95% case.

2. **Miss path vs the raw store** (``rocksdb_miss``, ``raw_rocksdb``, ``redis_miss``,
   ``raw_redis``). The store is pre-filled with ``miss_rows`` rows (Adagrad rows of the
   table's layout, written with ``store.put``; a RocksDB directory is then closed, fully
   compacted and reopened, as a table saved earlier would be, and so is the raw one).
   Batches are a random permutation of those ids cut into 4,096 distinct ids, cycled in the
   same order every pass; memory holds ``max_rows = miss_budget`` rows (4 batches), so every
   lookup misses memory, every row is read from the store, and the table evicts (writes
   back) as many dirty rows as it loads. Timed: training-mode lookups ``emb(ids)`` under
   ``torch.no_grad()``, no prefetch (index probe, store read + decode, eviction pick +
   encode + write-back, allocation, gather: the whole miss path, without the optimizer
   update; the write-back runs in the lookup that evicts, as by default). Rate =
   rows loaded per second (= keys/s, every key is a loaded row; the JSON checks it). The
   raw ceiling does the minimum the store must do for the same rows in the same batch
   sizes, one call after the other: per batch, one batched get of the 4,096 keys and one
   batched write of 4,096 rows (the rows read one batch earlier, standing in for the
   evicted ones), with keys of 8 bytes (``encode_ids``) and values of exactly the bytes
   ``RowCodec`` produces, built before timing. RocksDB: ``Rdict.get(list)`` and a
   ``WriteBatch``, on a directory opened with the RocksDBStore's options (raw mode, Bloom
   filters, 256 MiB block cache). Redis: two ways, and the ceiling is the faster one:
   ``MGET`` + ``MSET`` of plain keys (two commands), and the RedisStore's layout, 64 hashes,
   pipelined ``HMGET`` (no transaction) and pipelined ``HSET`` in MULTI/EXEC, with the keys
   already grouped by hash (the grouping is part of building the keys). Also reported,
   not in the ratio: a whole training step (forward + backward) at 100% misses.
   ``tiered_miss_path_vs_raw_store`` is the worse of the two backends (each is reported).

3. **95% hits vs all in memory** (``memory_hot``, ``rocksdb_hot[_prefetch]``). Zipf(1.1)
   over ``hot_ids`` ids (1M; 200k with ``--quick``), every id's row already in the store
   (RocksDB, written, compacted and reopened as in 2.) or in the table (in memory), as when
   training resumes from a saved table. The budget is calibrated first: a bounded table
   without a store (which hits and misses exactly as the tiered one: the same index and
   eviction) runs the same stream at a few budgets until the hit rate over the timed
   segments is within 0.5 points of 95%. The tiered table (RocksDB) then trains the stream
   with that budget; its measured hit rate is reported. ``tiered_95pct_hit_vs_in_memory``
   is its keys/s in the plain loop (no prefetch) over that of the same training on an
   unbounded in-memory table holding every row (``..._prefetch``: the loop with prefetch,
   reported beside it, no target).

Ratios and targets: ``tiered_miss_path_vs_raw_store`` >= 0.5 (per backend and the worse),
``tiered_95pct_hit_vs_in_memory`` >= 0.8. Throughputs are medians over ``--repeats`` timed
passes/segments; the JSON keeps every pass's seconds and the spread.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import (
    Phase,
    add_harness_args,
    build_report,
    check_quiet_at_start,
    eprint,
    evaluate_target,
    fmt_num,
    fmt_rate,
    loadavg,
    metric_row,
    parse_phases,
    ratio_of,
    record_run_options,
    report_footer,
    report_header,
    run_phase,
    run_phases,
    run_sizes,
    settle,
    splitmix64,
    verdict,
    write_report,
    zipf_ranks,
)

MODULE = "benchmarks.tiers"

FULL = {"ids": 100_000_000, "segment_steps": 250, "warmup_segments": 2, "repeats": 7,
        "miss_rows": 262_144, "hot_ids": 1_000_000, "hot_segment_steps": 100,
        "hot_warmup_segments": 10}
QUICK = {"ids": 100_000_000, "segment_steps": 25, "warmup_segments": 2, "repeats": 5,
         "miss_rows": 32_768, "hot_ids": 200_000, "hot_segment_steps": 25,
         "hot_warmup_segments": 12}

PHASES = ("memory", "rocksdb", "rocksdb_prefetch", "redis", "redis_prefetch", "raw_rocksdb",
          "rocksdb_miss", "raw_redis", "redis_miss", "memory_hot", "rocksdb_hot",
          "rocksdb_hot_prefetch")

# name: (numerator metric, denominator metric)
RATIOS = {
    "tiered_miss_path_vs_raw_store_rocksdb": ("rocksdb_miss_path_rows_per_s",
                                              "raw_rocksdb_get_put_rows_per_s"),
    "tiered_miss_path_vs_raw_store_redis": ("redis_miss_path_rows_per_s",
                                            "raw_redis_get_put_rows_per_s"),
    # The target uses the plain training loop (no prefetch), the library's default usage.
    "tiered_95pct_hit_vs_in_memory": ("rocksdb_hot_train_keys_per_s",
                                      "memory_hot_train_keys_per_s"),
    # References without targets.
    "tiered_95pct_hit_vs_in_memory_prefetch": ("rocksdb_hot_prefetch_train_keys_per_s",
                                               "memory_hot_train_keys_per_s"),
    "rocksdb_train_vs_in_memory": ("rocksdb_train_keys_per_s", "memory_train_keys_per_s"),
    "redis_train_vs_in_memory": ("redis_train_keys_per_s", "memory_train_keys_per_s"),
    "rocksdb_train_vs_in_memory_prefetch": ("rocksdb_prefetch_train_keys_per_s",
                                            "memory_train_keys_per_s"),
    "redis_train_vs_in_memory_prefetch": ("redis_prefetch_train_keys_per_s",
                                          "memory_train_keys_per_s"),
}
REFERENCE_RATIOS = ("tiered_95pct_hit_vs_in_memory_prefetch", "rocksdb_train_vs_in_memory",
                    "redis_train_vs_in_memory", "rocksdb_train_vs_in_memory_prefetch",
                    "redis_train_vs_in_memory_prefetch")
MISS_PATH_BACKENDS = ("rocksdb", "redis")
# name: (op, threshold); tiered_miss_path_vs_raw_store is the worse backend's ratio.
TARGETS = {
    "tiered_miss_path_vs_raw_store": (">=", 0.5),
    "tiered_95pct_hit_vs_in_memory": (">=", 0.8),
}
HIT_TARGET, HIT_TOLERANCE = 0.95, 0.005


# ============================================================================================
# Child-process phases
# ============================================================================================


def _dynembed(p: Phase):
    import dynembed as de
    p.record_dynembed(de)
    logging.getLogger("dynembed.eviction").setLevel(logging.ERROR)  # no-store discards
    return de


def _make_emb(de, cfg: dict, **options):
    return de.DynamicEmbedding(dim=cfg["dim"], optimizer=de.optim.Adagrad(lr=cfg["lr"]),
                               seed=cfg["seed"], **options)


def _grad(cfg: dict):
    import torch
    rng = np.random.default_rng(cfg["seed"] + 1)
    return torch.from_numpy(rng.standard_normal((cfg["batch"], cfg["dim"]),
                                                dtype=np.float32) * np.float32(1e-3))


def _jit_warmup(p: Phase, de, cfg: dict) -> None:
    """Runs every code path once on tiny tables (compile or load the kernels) before timing."""
    import torch
    t = time.perf_counter()
    grad = _grad(cfg)
    ids = torch.from_numpy(splitmix64(np.arange(cfg["batch"], dtype=np.int64) + (1 << 40)))
    for store in (None, de.storage.MemoryStore()):
        emb = _make_emb(de, cfg, max_rows=2 * cfg["batch"] + 64, store=store)
        for s in range(4):
            emb(ids + s * 7919).backward(grad)
            with torch.no_grad():
                emb(ids + s * 104729)
        emb.table.flush()
    emb = _make_emb(de, cfg)
    emb(ids).backward(grad)
    p.info["jit_warmup_s"] = round(time.perf_counter() - t, 2)


def _steps(data: dict, name: str):
    import torch
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in data[name]]


def _segments(batches: list, seg_steps: int, warm: int, on_start=None):
    """``rep -> batches`` for a training stream: warm-up segments first, then one new
    segment per timed pass; ``on_start`` runs (untimed) before the first timed pass."""

    def get(rep: int):
        slot = (-1 - rep) if rep < 0 else warm + rep
        if rep == 0 and on_start is not None:
            on_start()
        return batches[slot * seg_steps:(slot + 1) * seg_steps]
    return get


def _train_stream(p: Phase, emb, prefix: str, batches: list, seg_steps: int, warm: int,
                  grad, *, prefetch: bool = False) -> dict:
    """Times the training stream; records keys/s and the table counters of the timed part.

    With ``prefetch`` every step first calls ``emb.prefetch(next batch)``, so the next
    batch's stored rows are read in the background while this step trains.
    """
    snap = {}

    def start():
        snap["t0"] = emb.table.stats().totals

    if prefetch:
        items = [(b, batches[i + 1] if i + 1 < len(batches) else None)
                 for i, b in enumerate(batches)]

        def step(item):
            ids, nxt = item
            if nxt is not None:
                emb.prefetch(nxt)
            emb(ids).backward(grad)
    else:
        items = batches

        def step(ids):
            emb(ids).backward(grad)

    p.time(f"{prefix}_train_keys_per_s", step, _segments(items, seg_steps, warm, start),
           keys_per_batch=p.cfg["batch"], repeats=p.cfg["repeats"], warmup=warm)
    t0, t1 = snap["t0"], emb.table.stats().totals
    d = {f: getattr(t1, f) - getattr(t0, f)
         for f in ("keys", "hits", "misses", "loaded", "inserts", "evicted", "store_writes",
                   "discarded")}
    keys = max(d["keys"], 1)
    p.metrics[f"{prefix}_hit_rate"] = d["hits"] / keys
    p.info[f"{prefix}_timed_counters"] = d
    p.info[f"{prefix}_loaded_per_key"] = d["loaded"] / keys
    p.info[f"{prefix}_inserts_per_key"] = d["inserts"] / keys
    p.info[f"{prefix}_store_writes_per_key"] = d["store_writes"] / keys
    p.info[f"{prefix}_rows_in_memory"] = int(emb.table.size())
    p.log(f"{prefix}: hit rate {d['hits'] / keys:.4f}, loaded/key {d['loaded'] / keys:.3f}, "
          f"inserts/key {d['inserts'] / keys:.3f}, store writes/key "
          f"{d['store_writes'] / keys:.3f}; {emb.table.size():,} rows in memory")
    return d


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _compact(path: str) -> None:
    """Flushes the memtable of a closed RocksDB directory and compacts it fully."""
    import rocksdict

    from dynembed.storage.rocksdb import rocksdb_options
    db = rocksdict.Rdict(path, rocksdb_options())  # the store's options (no compression)
    try:
        db.flush(True)
        db.compact_range(None, None)
    finally:
        db.close()


def _compacted_bytes(path: str) -> int:
    """Bytes of a closed RocksDB directory after a memtable flush and a full compaction."""
    _compact(path)
    return _dir_bytes(path)


def phase_memory(p: Phase) -> None:
    """The 100M-id stream on an unbounded in-memory table (reserved for every distinct id)."""
    de = _dynembed(p)
    cfg = p.cfg
    _jit_warmup(p, de, cfg)
    emb = _make_emb(de, cfg)
    emb.table.reserve(cfg["distinct_ids"])
    _train_stream(p, emb, "memory", _steps(p.data, "main"), cfg["segment_steps"],
                  cfg["warmup_segments"], _grad(cfg))


def _tiered_main(p: Phase, de, store, prefix: str, prefetch: bool):
    cfg = p.cfg
    emb = _make_emb(de, cfg, max_rows=cfg["budget_rows"], store=store)
    _train_stream(p, emb, prefix, _steps(p.data, "main"), cfg["segment_steps"],
                  cfg["warmup_segments"], _grad(cfg), prefetch=prefetch)
    t = time.perf_counter()
    written = emb.table.flush()
    p.info[f"{prefix}_final_flush_rows"] = written
    p.info[f"{prefix}_final_flush_s"] = round(time.perf_counter() - t, 2)
    rows = store.size()
    p.info[f"{prefix}_store_rows"] = rows
    if rows != cfg["distinct_ids"]:
        p.log(f"WARNING: the store holds {rows:,} rows, the stream has {cfg['distinct_ids']:,} "
              "distinct ids")
    return emb, rows


def phase_rocksdb(p: Phase, prefetch: bool = False) -> None:
    """The 100M-id stream over RocksDB at 5% of the rows in memory; bytes on disk per row."""
    de = _dynembed(p)
    cfg = p.cfg
    _jit_warmup(p, de, cfg)
    path = str(Path(cfg["scratch"]) / "rocksdb-main")
    store = de.storage.RocksDBStore(path)
    emb, rows = _tiered_main(p, de, store, "rocksdb_prefetch" if prefetch else "rocksdb",
                             prefetch)
    if prefetch:  # the same rows as without prefetch: storage measured there
        del emb
        store.close()
        shutil.rmtree(path, ignore_errors=True)
        return
    disk = store.disk_bytes()
    p.metrics["rocksdb_disk_bytes_per_row"] = disk / max(rows, 1)
    p.info["rocksdb_disk_bytes"] = disk
    del emb
    store.close()
    t = time.perf_counter()
    compacted = _compacted_bytes(path)
    p.metrics["rocksdb_disk_bytes_per_row_compacted"] = compacted / max(rows, 1)
    p.info["rocksdb_disk_bytes_compacted"] = compacted
    p.info["rocksdb_compaction_s"] = round(time.perf_counter() - t, 2)
    p.log(f"rocksdb: {rows:,} rows, {disk / max(rows, 1):.1f} B/row on disk after flush, "
          f"{compacted / max(rows, 1):.1f} B/row after compaction")
    shutil.rmtree(path, ignore_errors=True)


def _redis_used(url: str) -> int:
    import redis
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def phase_redis(p: Phase, prefetch: bool = False) -> None:
    """The 100M-id stream over Redis on loopback; Redis memory per row."""
    from dynembed.testing import RedisServer
    de = _dynembed(p)
    cfg = p.cfg
    _jit_warmup(p, de, cfg)
    with RedisServer() as srv:
        used0 = _redis_used(srv.url)
        store = de.storage.RedisStore(srv.url, namespace="bench")
        emb, rows = _tiered_main(p, de, store, "redis_prefetch" if prefetch else "redis",
                                 prefetch)
        if prefetch:
            del emb
            store.close()
            return
        used1 = _redis_used(srv.url)
        p.metrics["redis_memory_bytes_per_row"] = (used1 - used0) / max(rows, 1)
        p.info["redis_used_memory_start"] = used0
        p.info["redis_used_memory_end"] = used1
        p.log(f"redis: {rows:,} rows, used_memory +{(used1 - used0) / 2**20:.1f} MiB = "
              f"{(used1 - used0) / max(rows, 1):.1f} B/row")
        del emb
        store.close()


# ---------------------------------------------------------------------------------- miss path


def _prefill_block(de, cfg: dict, ids: np.ndarray):
    """Rows as a trained table would store them (deterministic: raw and tiered get the same)."""
    rng = np.random.default_rng(cfg["seed"] + 2)
    n, d = ids.shape[0], cfg["dim"]
    bound = np.float32(1 / np.sqrt(d))
    weights = rng.uniform(-bound, bound, (n, d)).astype(np.float32)
    state = rng.uniform(0, 1e-3, (n, d)).astype(np.float32)  # Adagrad sums of squares
    counts = rng.integers(1, 100, n).astype(np.int64)
    return de.storage.RowBlock(ids.astype(np.int64), weights, state, counts,
                               np.zeros(n, dtype=np.int64))


def _prefill_store(p: Phase, de, store, ids: np.ndarray, chunk: int = 65_536) -> None:
    t = time.perf_counter()
    block = _prefill_block(de, p.cfg, ids)
    for s in range(0, ids.shape[0], chunk):
        store.put(block.take(np.arange(s, min(s + chunk, ids.shape[0]))))
    p.info[f"prefill_{ids.shape[0]}_rows_s"] = round(time.perf_counter() - t, 2)


def _encoded(de, cfg: dict, ids: np.ndarray) -> tuple[list[bytes], list[bytes]]:
    from dynembed.storage.rows import encode_ids
    codec = de.storage.RowCodec(cfg["dim"], cfg["dim"])  # Adagrad: dim state floats
    return encode_ids(ids), codec.encode(_prefill_block(de, cfg, ids))


def _prefilled_rocksdb(p: Phase, de, path: str, ids: np.ndarray):
    """A RocksDBStore holding the rows of ids, at rest: written, closed, compacted, reopened
    (a table saved earlier), so no compaction debt of the fill runs into the timing."""
    store = de.storage.RocksDBStore(path)
    store.bind(p.cfg["dim"], p.cfg["dim"])
    _prefill_store(p, de, store, ids)
    store.close()
    t = time.perf_counter()
    _compact(path)
    p.info["prefill_compaction_s"] = round(time.perf_counter() - t, 2)
    return de.storage.RocksDBStore(path)


def _tiered_miss(p: Phase, de, store, prefix: str) -> None:
    """``store`` already holds the rows of ``miss_ids``."""
    import torch
    cfg = p.cfg
    emb = _make_emb(de, cfg, max_rows=cfg["miss_budget_rows"], store=store)
    batches = _steps(p.data, "miss_batches")
    snap = {}

    def get(rep):
        if rep == 0:
            snap["t0"] = emb.table.stats().totals
        return batches

    def lookup(ids):
        with torch.no_grad():
            emb(ids)

    p.time(f"{prefix}_miss_path_rows_per_s", lookup, get, keys_per_batch=cfg["batch"],
           repeats=cfg["repeats"], warmup=1)
    t0, t1 = snap["t0"], emb.table.stats().totals
    keys, loaded = t1.keys - t0.keys, t1.loaded - t0.loaded
    writes, hits = t1.store_writes - t0.store_writes, t1.hits - t0.hits
    p.info[f"{prefix}_miss_path_counters"] = {"keys": keys, "hits": hits, "loaded": loaded,
                                               "store_writes": writes}
    p.info[f"{prefix}_miss_path_all_loaded"] = bool(loaded == keys and hits == 0)
    p.log(f"{prefix} miss path: {keys:,} keys, {hits} memory hits, {loaded:,} rows loaded, "
          f"{writes:,} rows written back ({writes / max(loaded, 1):.3f} per loaded row)")
    if loaded != keys:
        p.log("WARNING: not every key was a row loaded from the store")
    grad = _grad(cfg)
    p.time(f"{prefix}_all_miss_train_keys_per_s", lambda ids: emb(ids).backward(grad),
           batches, keys_per_batch=cfg["batch"], repeats=cfg["repeats"], warmup=1)


def phase_rocksdb_miss(p: Phase) -> None:
    """Every lookup misses memory and reads its row from RocksDB (and evicts one)."""
    de = _dynembed(p)
    _jit_warmup(p, de, p.cfg)
    path = str(Path(p.cfg["scratch"]) / "rocksdb-miss")
    store = _prefilled_rocksdb(p, de, path, p.data["miss_ids"].ravel())
    _tiered_miss(p, de, store, "rocksdb")
    store.close()
    shutil.rmtree(path, ignore_errors=True)


def phase_redis_miss(p: Phase) -> None:
    """Every lookup misses memory and reads its row from Redis (and evicts one)."""
    from dynembed.testing import RedisServer
    de = _dynembed(p)
    _jit_warmup(p, de, p.cfg)
    with RedisServer() as srv:
        store = de.storage.RedisStore(srv.url, namespace="bench")
        store.bind(p.cfg["dim"], p.cfg["dim"])
        _prefill_store(p, de, store, p.data["miss_ids"].ravel())
        _tiered_miss(p, de, store, "redis")
        store.close()


def _keys_of(ids: np.ndarray) -> list[bytes]:
    from dynembed.storage.rows import encode_ids
    return encode_ids(np.ascontiguousarray(ids))


def phase_raw_rocksdb(p: Phase) -> None:
    """rocksdict batch get + WriteBatch put of the miss-path rows: the ceiling."""
    import rocksdict
    de = _dynembed(p)
    cfg = p.cfg
    ids = p.data["miss_ids"].ravel()
    keys, values = _encoded(de, cfg, ids)
    p.info["raw_value_bytes"] = len(values[0])
    p.info["raw_key_bytes"] = len(keys[0])
    path = str(Path(cfg["scratch"]) / "rocksdb-raw")
    from dynembed.storage.rocksdb import rocksdb_options
    options = rocksdb_options()  # exactly the store's options
    db = rocksdict.Rdict(path, options)
    t = time.perf_counter()
    for s in range(0, len(keys), 65_536):
        wb = rocksdict.WriteBatch(raw_mode=True)
        collections.deque(map(wb.put, keys[s:s + 65_536], values[s:s + 65_536]), maxlen=0)
        db.write(wb)
    p.info[f"prefill_{len(keys)}_rows_s"] = round(time.perf_counter() - t, 2)
    db.close()  # at rest, as the tiered store: closed, compacted, reopened
    t = time.perf_counter()
    _compact(path)
    p.info["prefill_compaction_s"] = round(time.perf_counter() - t, 2)
    db = rocksdict.Rdict(path, options)
    batches = [_keys_of(b) for b in p.data["miss_batches"]]
    prev = {"k": batches[-1], "v": db.get(batches[-1])}

    def get_put(bk):
        got = db.get(bk)
        wb = rocksdict.WriteBatch(raw_mode=True)
        collections.deque(map(wb.put, prev["k"], prev["v"]), maxlen=0)
        db.write(wb)
        prev["k"], prev["v"] = bk, got

    p.time("raw_rocksdb_get_put_rows_per_s", get_put, batches, keys_per_batch=cfg["batch"],
           repeats=cfg["repeats"], warmup=1)
    p.info["raw_rocksdb_all_found"] = all(v is not None for v in db.get(batches[0]))
    db.close()
    shutil.rmtree(path, ignore_errors=True)


def phase_raw_redis(p: Phase) -> None:
    """redis-py MGET + MSET of the miss-path rows (the ceiling), and the hash layout."""
    import redis

    from dynembed.testing import RedisServer
    de = _dynembed(p)
    cfg = p.cfg
    ids = p.data["miss_ids"].ravel()
    keys, values = _encoded(de, cfg, ids)
    batches = [_keys_of(b) for b in p.data["miss_batches"]]
    with RedisServer() as srv:
        client = redis.Redis.from_url(srv.url)
        t = time.perf_counter()
        for s in range(0, len(keys), 65_536):
            client.mset(dict(zip(keys[s:s + 65_536], values[s:s + 65_536])))
        p.info[f"prefill_{len(keys)}_rows_s"] = round(time.perf_counter() - t, 2)
        prev = {"k": batches[-1], "v": client.mget(batches[-1])}

        def get_put(bk):
            got = client.mget(bk)
            client.mset(dict(zip(prev["k"], prev["v"])))
            prev["k"], prev["v"] = bk, got

        p.time("raw_redis_mget_mset_rows_per_s", get_put, batches,
               keys_per_batch=cfg["batch"], repeats=cfg["repeats"], warmup=1)
        p.info["raw_redis_all_found"] = all(v is not None for v in client.mget(batches[0]))
        client.flushall()

        # The RedisStore layout: fields of 64 hashes; reads pipelined HMGET (no transaction:
        # a read needs none), writes pipelined HSET in MULTI/EXEC (all or nothing).
        shards = 64
        hkeys = [f"raw:{{{s:x}}}".encode() for s in range(shards)]
        value_of = dict(zip(keys, values))
        grouped = []
        for b, bk in zip(p.data["miss_batches"], batches):
            shard = (np.ascontiguousarray(b).view(np.uint64) % np.uint64(shards)).astype(np.int64)
            groups = [[] for _ in range(shards)]
            for s, k in zip(shard.tolist(), bk):
                groups[s].append(k)
            grouped.append([(s, g) for s, g in enumerate(groups) if g])
        pipe = client.pipeline(transaction=True)
        for s in range(shards):
            pipe.delete(hkeys[s])
        pipe.execute()
        for groups in grouped:
            pipe = client.pipeline(transaction=True)
            for s, g in groups:
                pipe.hset(hkeys[s], mapping={k: value_of[k] for k in g})
            pipe.execute()
        hprev = {"g": grouped[-1], "v": None}

        def hash_get_put(groups):
            pipe = client.pipeline(transaction=False)
            for s, g in groups:
                pipe.hmget(hkeys[s], g)
            got = pipe.execute()
            pipe = client.pipeline(transaction=True)
            vals = hprev["v"] or [[value_of[k] for k in g] for _, g in hprev["g"]]
            for (s, g), v in zip(hprev["g"], vals):
                pipe.hset(hkeys[s], mapping=dict(zip(g, v)))
            pipe.execute()
            hprev["g"], hprev["v"] = groups, got

        p.time("raw_redis_hash_pipeline_rows_per_s", hash_get_put, grouped,
               keys_per_batch=cfg["batch"], repeats=cfg["repeats"], warmup=1)
        client.close()
    # The ceiling is the faster of the two ways.
    best = max(("raw_redis_mget_mset_rows_per_s", "raw_redis_hash_pipeline_rows_per_s"),
               key=p.metrics.get)
    p.metrics["raw_redis_get_put_rows_per_s"] = p.metrics[best]
    p.spread["raw_redis_get_put_rows_per_s"] = p.spread[best]
    p.info["raw_redis_ceiling"] = best


# --------------------------------------------------------------------------------- 95% hits


def phase_memory_hot(p: Phase) -> None:
    """The hot-set stream on an unbounded in-memory table already holding every row."""
    import torch
    de = _dynembed(p)
    cfg = p.cfg
    _jit_warmup(p, de, cfg)
    emb = _make_emb(de, cfg)
    ids = p.data["hot_ids"]
    emb.table.reserve(ids.shape[0])
    for s in range(0, ids.shape[0], 65_536):
        emb.table.find_or_insert(torch.from_numpy(ids[s:s + 65_536]))
    _train_stream(p, emb, "memory_hot", _steps(p.data, "hot_batches"),
                  cfg["hot_segment_steps"], cfg["hot_warmup_segments"], _grad(cfg))


def _hit_rate(de, cfg: dict, batches: list, budget: int, grad) -> float:
    """Hit rate over the timed segments of a bounded table without a store."""
    emb = _make_emb(de, cfg, max_rows=budget)
    warm_steps = cfg["hot_warmup_segments"] * cfg["hot_segment_steps"]
    for b in batches[:warm_steps]:
        emb(b).backward(grad)
    t0 = emb.table.stats().totals
    for b in batches[warm_steps:]:
        emb(b).backward(grad)
    t1 = emb.table.stats().totals
    return (t1.hits - t0.hits) / max(t1.keys - t0.keys, 1)


def calibrate_budget(p: Phase, de, batches: list, grad) -> tuple[int, float]:
    """The budget (rows) whose hit rate over the timed segments is within HIT_TOLERANCE of
    HIT_TARGET: a bracketing search on log(budget), interpolating the hit rate."""
    cfg = p.cfg
    n = cfg["hot_ids"]
    lo_b = 4 * int(cfg["hot_max_distinct_per_batch"])
    lo, hi = (lo_b, None), (n, 1.0)  # (budget, hit rate); hi holds every id
    b = int(min(n, max(lo_b, cfg["hot_budget_guess"])))
    trace = []
    best = None
    t = time.perf_counter()
    for _ in range(10):
        h = _hit_rate(de, cfg, batches, b, grad)
        trace.append([b, round(h, 5)])
        p.log(f"calibration: budget {b:,} rows ({100 * b / n:.1f}% of ids) -> hit rate {h:.4f}")
        if best is None or abs(h - HIT_TARGET) < abs(best[1] - HIT_TARGET):
            best = (b, h)
        if abs(h - HIT_TARGET) <= HIT_TOLERANCE:
            break
        if h < HIT_TARGET:
            lo = (b, h)
        else:
            hi = (b, h)
        if lo[1] is None:  # no lower hit rate known yet: step down
            nb = max(lo_b, int(b / 2))
        else:
            x0, x1 = np.log(lo[0]), np.log(hi[0])
            f = (HIT_TARGET - lo[1]) / max(hi[1] - lo[1], 1e-9)
            f = min(0.85, max(0.15, f))  # stay strictly inside the bracket
            nb = round(float(np.exp(x0 + f * (x1 - x0))))
        if nb == b or hi[0] - lo[0] <= 1:
            break
        b = nb
    p.info["hot_calibration"] = trace
    p.info["hot_calibration_s"] = round(time.perf_counter() - t, 1)
    return best


def phase_rocksdb_hot(p: Phase, prefetch: bool = False) -> None:
    """The hot-set stream over RocksDB (every row stored) at a budget giving ~95% hits."""
    de = _dynembed(p)
    cfg = p.cfg
    _jit_warmup(p, de, cfg)
    grad = _grad(cfg)
    batches = _steps(p.data, "hot_batches")
    budget, hit = calibrate_budget(p, de, batches, grad)
    if not prefetch:
        p.metrics["hot_budget_rows"] = budget
    p.info["hot_budget_rows"] = budget
    p.info["hot_calibrated_hit_rate"] = hit
    settle()
    path = str(Path(cfg["scratch"]) / "rocksdb-hot")
    store = _prefilled_rocksdb(p, de, path, p.data["hot_ids"])
    emb = _make_emb(de, cfg, max_rows=budget, store=store)
    _train_stream(p, emb, "rocksdb_hot_prefetch" if prefetch else "rocksdb_hot", batches,
                  cfg["hot_segment_steps"], cfg["hot_warmup_segments"], grad,
                  prefetch=prefetch)
    del emb
    store.close()
    shutil.rmtree(path, ignore_errors=True)


PHASE_FUNCS = {
    "memory": phase_memory, "rocksdb": phase_rocksdb, "redis": phase_redis,
    "rocksdb_prefetch": lambda p: phase_rocksdb(p, prefetch=True),
    "redis_prefetch": lambda p: phase_redis(p, prefetch=True),
    "rocksdb_hot_prefetch": lambda p: phase_rocksdb_hot(p, prefetch=True),
    "raw_rocksdb": phase_raw_rocksdb, "rocksdb_miss": phase_rocksdb_miss,
    "raw_redis": phase_raw_redis, "redis_miss": phase_redis_miss,
    "memory_hot": phase_memory_hot, "rocksdb_hot": phase_rocksdb_hot,
}


# ============================================================================================
# Parent: workload, orchestration, report
# ============================================================================================


def build_config(args) -> dict:
    base = run_sizes(args, FULL, QUICK, {"ids": "ids", "repeats": "repeats"})
    batch = 4096
    return {
        "quick": bool(args.quick),
        "ids": int(base["ids"]),
        "dim": 32,
        "batch": batch,
        "optimizer": "Adagrad",
        "lr": 0.05,
        "zipf_a": 1.1,
        "seed": int(args.seed),
        "budget_share": 0.05,
        "segment_steps": int(base["segment_steps"]),
        "warmup_segments": int(base["warmup_segments"]),
        "repeats": int(base["repeats"]),
        "warmup": 1,
        "min_warmup_s": 0.0,
        "miss_rows": int(base["miss_rows"]),
        "miss_budget_rows": 4 * batch,
        "hot_ids": int(base["hot_ids"]),
        "hot_segment_steps": int(base["hot_segment_steps"]),
        "hot_warmup_segments": int(base["hot_warmup_segments"]),
        "hit_target": HIT_TARGET,
        "hit_tolerance": HIT_TOLERANCE,
        "id_mapping": "Zipf rank r -> id splitmix64(r - 1 + salt) as int64 (a bijection: hot "
                      "ids scattered over the int64 range); each workload has its own salt",
        "train_step": "out = emb(ids); out.backward(grad)  (fused Adagrad update in backward); "
                      "grad a fixed N(0,1)*1e-3 (batch, dim) tensor",
        "timing": "training streams: untimed warm-up segments, then `repeats` timed segments "
                  "of new batches, median keys/s; miss path and raw stores: the same batches "
                  "every pass, 1 untimed pass then `repeats` timed passes, median; gc off "
                  "while timed; one child process per system",
        "main_workload": "Zipf(1.1) over `ids` ids; max_rows = budget_share * distinct ids "
                         "of the whole stream (warm-up + timed)",
        "miss_path": "store pre-filled with miss_rows rows (RocksDB: then closed, compacted, "
                     "reopened; the raw one too); batches = a permutation of them "
                     "in 4096-id chunks; max_rows = 4 batches; timed: train-mode emb(ids) "
                     "under no_grad; rate = rows loaded per second",
        "raw_ceiling": "per batch: one batched get of its 4096 8-byte keys + one batched "
                       "write of 4096 RowCodec-encoded rows (those read one batch earlier); "
                       "keys and values built before timing. RocksDB: Rdict.get(list) + "
                       "WriteBatch with the store's options; Redis: the faster of MGET + MSET "
                       "and HMGET (pipelined) + HSET (MULTI/EXEC) on 64 hashes",
        "hot_workload": "Zipf(1.1) over hot_ids ids, every row pre-stored (RocksDB) or "
                        "pre-inserted (in memory); budget calibrated on a storeless bounded "
                        "table to a hit rate of hit_target +- hit_tolerance",
        "storage_bytes": "RocksDB: disk_bytes()/rows after table.flush() (SST + WAL), and "
                         "after close + flush + full compaction; Redis: INFO used_memory "
                         "growth since server start / rows",
    }


def _zipf_ids(rng, a: float, n: int, size: int, salt: int) -> np.ndarray:
    return splitmix64(zipf_ranks(rng, a, n, size) - 1 + salt)


def make_data(cfg: dict) -> dict:
    rng = np.random.default_rng(cfg["seed"])
    bsz = cfg["batch"]
    t = time.perf_counter()
    steps = (cfg["warmup_segments"] + cfg["repeats"]) * cfg["segment_steps"]
    main = _zipf_ids(rng, cfg["zipf_a"], cfg["ids"], steps * bsz, 0).reshape(steps, bsz)
    uniq = np.unique(main)
    cfg["main_steps"] = steps
    cfg["distinct_ids"] = int(uniq.size)
    cfg["budget_rows"] = max(1, round(cfg["budget_share"] * uniq.size))
    per_batch = [np.unique(b).size for b in main]
    cfg["distinct_per_batch_mean"] = float(np.mean(per_batch))
    cfg["distinct_per_batch_max"] = int(np.max(per_batch))
    warm = cfg["warmup_segments"] * cfg["segment_steps"]
    seen = np.unique(main[:warm])
    timed = main[warm:].ravel()
    first = np.zeros(timed.size, dtype=bool)
    # first touches in the timed part: not seen in warm-up and first occurrence in timed part
    _, first_pos = np.unique(timed, return_index=True)
    first[first_pos] = True
    first &= ~np.isin(timed, seen)
    cfg["first_touch_share_timed"] = float(first.mean())
    del uniq, seen, timed, first

    miss_ids = splitmix64(np.arange(cfg["miss_rows"], dtype=np.int64) + (3 << 40))
    miss_batches = rng.permutation(miss_ids).reshape(-1, bsz)

    hot_steps = (cfg["hot_warmup_segments"] + cfg["repeats"]) * cfg["hot_segment_steps"]
    hot_salt = 5 << 40
    hot = _zipf_ids(rng, cfg["zipf_a"], cfg["hot_ids"], hot_steps * bsz, hot_salt)
    hot = hot.reshape(hot_steps, bsz)
    hot_ids = splitmix64(np.arange(cfg["hot_ids"], dtype=np.int64) + hot_salt)
    cfg["hot_steps"] = hot_steps
    cfg["hot_max_distinct_per_batch"] = int(max(np.unique(b).size for b in hot))
    # Starting guess of the calibration: the smallest budget that could hold 95% of the
    # probability mass of the truncated Zipf (an LRU cache needs more).
    ranks = np.arange(1, cfg["hot_ids"] + 1, dtype=np.float64)
    mass = np.cumsum(ranks ** -cfg["zipf_a"])
    ideal = int(np.searchsorted(mass / mass[-1], HIT_TARGET)) + 1
    cfg["hot_budget_ideal"] = ideal
    cfg["hot_budget_guess"] = int(1.6 * ideal)
    cfg["workload_gen_s"] = round(time.perf_counter() - t, 1)
    return {"main": main, "miss_ids": miss_ids, "miss_batches": miss_batches,
            "hot_batches": hot, "hot_ids": hot_ids}


def compute_ratios(metrics: dict) -> tuple[dict, dict]:
    ratios = {name: ratio_of(metrics, num, den) for name, (num, den) in RATIOS.items()}
    per_backend = {be: ratios[f"tiered_miss_path_vs_raw_store_{be}"] for be in MISS_PATH_BACKENDS}
    known = {be: v for be, v in per_backend.items() if v is not None}
    worst = min(known, key=known.get) if known else None
    # The headline is the worse backend; with a backend missing it is not decided.
    ratios["tiered_miss_path_vs_raw_store"] = (known[worst] if len(known) == len(per_backend)
                                               else None)
    targets = {name: evaluate_target(op, thr, ratios[name]) for name, (op, thr) in TARGETS.items()}
    targets["tiered_miss_path_vs_raw_store"]["backend"] = (worst if len(known) == len(per_backend)
                                                          else None)
    targets["tiered_miss_path_vs_raw_store"]["per_backend"] = {
        be: {"value": v, "pass": None if v is None else v >= TARGETS[
            "tiered_miss_path_vs_raw_store"][1]} for be, v in per_backend.items()}
    return ratios, targets


def render(report: dict) -> str:
    m, cfg, sp = report["metrics"], report["config"], report["config"].get("spread", {})
    info = cfg.get("phase_info", {})
    L: list[str] = []

    def row(label, key, kind="rate", note=""):
        v = m.get(key)
        if kind == "rate":
            val = fmt_rate(v)
        elif kind == "pct":
            val = f"{100 * v:.2f} %" if isinstance(v, (int, float)) else fmt_num(v)
        else:
            val = fmt_num(v) if not isinstance(v, float) else f"{v:,.1f}"
        L.append(metric_row(label, val, sp.get(key), 58, note))

    def per_key(phase, prefix):
        ph = info.get(phase, {})
        lk, ins, wr = (ph.get(f"{prefix}_loaded_per_key"), ph.get(f"{prefix}_inserts_per_key"),
                       ph.get(f"{prefix}_store_writes_per_key"))
        if isinstance(lk, (int, float)):
            L.append(f"  {'':<4s}per key: {lk:.3f} rows loaded from the store, {ins:.3f} new "
                     f"rows, {wr:.3f} rows written to the store")

    def tier_rows(tier, where, prefix):
        """Section 1's rows of one store: keys/s of both loops, hit rate, per-key I/O."""
        row(f"{tier}{where}, with prefetch: keys/s", f"{prefix}_prefetch_train_keys_per_s")
        row(f"{tier}{where}, no prefetch: keys/s", f"{prefix}_train_keys_per_s")
        row(f"{tier}: hit rate", f"{prefix}_hit_rate", "pct")
        per_key(prefix, prefix)

    mach = report["machine"]
    L.extend(report_header(
        report,
        f"dynembed storage-tier benchmark   dim={cfg['dim']}  batch={cfg['batch']:,}  "
        f"Adagrad  Zipf({cfg['zipf_a']})  median of {cfg['repeats']}"
        + ("  [quick]" if cfg["quick"] else ""),
        f"rocksdict {mach.get('rocksdict') or '-'}, redis-py "
        f"{mach.get('redis_py') or '-'}, {mach.get('redis_server') or 'redis-server ?'}",
        96))
    L.append("-" * 96)
    L.append(f"1) Training, Zipf over {cfg['ids']:,} ids: {cfg['main_steps']:,} steps "
             f"({cfg['warmup_segments']} warm-up + {cfg['repeats']} timed segments of "
             f"{cfg['segment_steps']}), {cfg['distinct_ids']:,} distinct ids, budget "
             f"max_rows = {cfg['budget_rows']:,} (5%)")
    L.append(f"   {cfg['distinct_per_batch_mean']:,.0f} distinct ids per batch; "
             f"{100 * cfg['first_touch_share_timed']:.1f}% of timed keys are first touches")
    row("in memory (unbounded): keys/s", "memory_train_keys_per_s")
    row("in memory: hit rate (misses = first touches)", "memory_hit_rate", "pct")
    tier_rows("RocksDB tier", "", "rocksdb")
    row("RocksDB: bytes on disk per row after flush (SST + WAL)", "rocksdb_disk_bytes_per_row", "num")
    row("RocksDB: bytes on disk per row after full compaction", "rocksdb_disk_bytes_per_row_compacted", "num")
    tier_rows("Redis tier", " (loopback)", "redis")
    row("Redis: used_memory per row", "redis_memory_bytes_per_row", "num")
    L.append(f"   (one stored record: {cfg.get('record_bytes', '-')} B value + 8 B key)")
    L.append(f"2) Miss path: every lookup misses memory ({cfg['miss_rows']:,} stored rows cycled, "
             f"budget {cfg['miss_budget_rows']:,}); rows/s")
    row("RocksDB tier: train-mode lookup, rows loaded/s", "rocksdb_miss_path_rows_per_s")
    row("raw rocksdict: get + WriteBatch put, rows/s", "raw_rocksdb_get_put_rows_per_s")
    row("RocksDB tier: training step at 100% misses, keys/s", "rocksdb_all_miss_train_keys_per_s")
    row("Redis tier: train-mode lookup, rows loaded/s", "redis_miss_path_rows_per_s")
    row("raw redis-py: MGET + MSET, rows/s", "raw_redis_mget_mset_rows_per_s")
    row("raw redis-py: HMGET + HSET (MULTI/EXEC), 64 hashes, rows/s", "raw_redis_hash_pipeline_rows_per_s")
    L.append(f"  {'':<4s}raw Redis ceiling = the faster: "
             f"{info.get('raw_redis', {}).get('raw_redis_ceiling', '-')}")
    row("Redis tier: training step at 100% misses, keys/s", "redis_all_miss_train_keys_per_s")
    L.append(f"3) ~95% hits: Zipf over {cfg['hot_ids']:,} ids, all rows pre-stored, "
             f"{cfg['hot_steps']:,} steps")
    row("calibrated budget (rows)", "hot_budget_rows", "num")
    row("in memory (every row): keys/s", "memory_hot_train_keys_per_s")
    row("RocksDB tier, with prefetch: keys/s", "rocksdb_hot_prefetch_train_keys_per_s")
    row("RocksDB tier, with prefetch: hit rate", "rocksdb_hot_prefetch_hit_rate", "pct")
    row("RocksDB tier, no prefetch: keys/s", "rocksdb_hot_train_keys_per_s")
    row("RocksDB tier, no prefetch: hit rate", "rocksdb_hot_hit_rate", "pct")
    per_key("rocksdb_hot", "rocksdb_hot")
    L.append("-" * 96)
    L.append(f"{'Ratios':<52s} {'value':>10s}   {'target':>7s}   result")
    for name, t in report["targets"].items():
        v = t["value"]
        val = "-" if v is None else f"{v:.3f}"
        extra = f"   (worse backend: {t['backend']})" if t.get("backend") else ""
        L.append(f"  {name:<50s} {val:>10s}   {t['target']:>7s}   {verdict(t['pass'])}{extra}")
        for be, bv in t.get("per_backend", {}).items():
            val = "-" if bv["value"] is None else f"{bv['value']:.3f}"
            L.append(f"    {be:<48s} {val:>10s}   {t['target']:>7s}   {verdict(bv['pass'])}")
    for name in REFERENCE_RATIOS:
        v = report["ratios"].get(name)
        L.append(f"  {name:<50s} {'-' if v is None else f'{v:.3f}':>10s}   {'':>7s}   (reference)")
    L.extend(report_footer(report, 96))
    return "\n".join(L)


def _tier_versions() -> dict:
    import importlib.metadata
    out = {}
    for key, dist in (("rocksdict", "rocksdict"), ("redis_py", "redis")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    exe = shutil.which("redis-server")
    if exe:
        try:
            r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30,
                               check=False)
            out["redis_server"] = r.stdout.strip().split(" sha=")[0]
        except (OSError, subprocess.SubprocessError):
            out["redis_server"] = None
    else:
        out["redis_server"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (smaller streams and stores)")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")
    ap.add_argument("--ids", type=int, help="id space of the training stream (default 100M)")
    ap.add_argument("--repeats", type=int, help="timed segments / passes per measurement (>= 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of: {','.join(PHASES)}")
    add_harness_args(ap, timeout_s=900, quick_timeout_s=300)
    args = ap.parse_args(argv)
    if args._phase:
        return run_phase(args._phase, Path(args._workdir), lambda p: PHASE_FUNCS[p.name](p))
    phases = parse_phases(ap, args.phases, PHASES)
    cfg = build_config(args)
    record_run_options(cfg, phases, args)
    cfg["loadavg_start"] = loadavg()
    cfg["record_bytes"] = 28 + 4 * 2 * cfg["dim"]  # RowCodec: header + weights + Adagrad state
    t_start = time.perf_counter()
    check_quiet_at_start(cfg, args.wait_quiet)
    eprint(f"generating workloads: {cfg['ids']:,}-id stream, miss path over "
           f"{cfg['miss_rows']:,} rows, hot set of {cfg['hot_ids']:,} ids ...")
    data = make_data(cfg)
    eprint(f"  stream: {cfg['main_steps']:,} batches, {cfg['distinct_ids']:,} distinct ids -> "
           f"budget {cfg['budget_rows']:,} rows; {cfg['workload_gen_s']}s")
    results = run_phases(MODULE, cfg, data, phases, prefix="dynembed-tiers-",
                         timeout=args.phase_timeout or (300 if cfg["quick"] else 900),
                         wait_quiet_s=args.wait_quiet, retries=args.retries, scratch=True)

    ratios, targets = compute_ratios(results.metrics)
    report = build_report(MODULE, argv, cfg, results, t_start, ratios, targets,
                          machine_extra=_tier_versions())
    write_report(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
