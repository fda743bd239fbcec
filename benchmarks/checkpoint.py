"""Checkpoint benchmark: save/load vs raw I/O, first lookup after a restart, delta sizes.

Measures save and load throughput against raw sequential I/O of the same bytes, the time to
the first lookup after a restart, and delta checkpoint size against the rows changed.

Run from the repository root::

    python -m benchmarks.checkpoint                 # full run (several minutes, ~5 GB of disk)
    python -m benchmarks.checkpoint --quick         # short run (under a minute)
    python -m benchmarks.checkpoint --json bench-results/checkpoint.json   # also write JSON
    python -m benchmarks.checkpoint --sizes 1M,10M --dir /mnt/fast    # other sizes / disk

Tables have ``dim=16``. Each part runs in its own child process (``--_phase``), which first
runs every checkpoint code path once on tiny checkpoints in a scratch folder (numba kernels
compiled or loaded from their cache, first-use allocations), so the timings are of I/O and
search, not compilation. Checkpoints and raw files are written to a temporary folder under
``--dir`` (default: the system's temporary folder), the disk being measured, and removed as
soon as they have been measured.

1. **Save / load throughput** (``throughput``). A table of ``--rows`` rows (4M; 300k with
   ``--quick``) with Adagrad (``state width = dim``; random weights and state) is saved as a
   full checkpoint with ``de.checkpoint.save`` (rows file, aux and dense files, manifest,
   every file fsync'd), and the same number of bytes (the whole checkpoint folder) is then
   written to one new file with plain sequential ``os.write`` calls of a 64 MiB buffer and
   one ``fsync``. Both are read back: the raw file sequentially with ``readinto`` into a
   new ``numpy`` buffer in 64 MiB pieces, the checkpoint with an eager
   ``de.checkpoint.load`` into a fresh table. The reads run twice: right after the writes,
   with both files in the page cache (reference ``load_vs_raw_read_page_cache``: the
   software cost over a copy from memory), then after evicting both files from the page
   cache (``posix_fadvise(DONTNEED)`` after an fsync; ``mincore`` checks it worked), so both
   read from the disk as the save and the raw write (fsync'd) write to it: the headline
   ``load_vs_raw_read``. Each pair alternates which one goes first. Throughputs are bytes/s,
   medians of ``--repeats`` rounds.

2. **Time to first lookup after a restart** (``first_lookup``, one child per size of
   ``--sizes``: 1M, 10M, 50M rows; 100k, 300k, 1M with ``--quick``). An SGD table's
   checkpoint of N rows is written directly with the low-level rows-file writer, a chunk at
   a time (no N-row table in memory): row i has bucket hash ``(i + 1/2) * 2**64 / N`` and
   the id that has it, so the rows are in the file's order and spread evenly over the
   buckets, with random weights; the manifest, aux and dense files come from a real
   ``save`` of an empty table, patched with the rows file's size and counts. A restart is:
   a new table object, ``de.checkpoint.load(path, tables=..., lazy=True)``, and
   ``table.find(ids)`` of ``--batch`` (1,024) distinct random existing ids (new ones every
   restart); ``first_lookup_s_<N>`` is the seconds from before the table is built to the
   end of that lookup, median over ``--repeats`` restarts, with every file of the
   checkpoint evicted from the page cache before each restart (cold: a restart on a machine
   that has not read the checkpoint yet). Also reported: the same with the checkpoint in
   the page cache (warm: a process restart right after the save), a cold restart whose
   first lookup is ``find_or_insert`` (faults the rows into memory, as training does), and
   the share of the checkpoint's pages in the page cache after a cold restart
   (``first_lookup_share_read_<N>``: what the restart read from the disk, readahead
   included).

3. **Delta checkpoints** (``delta``). A table of ``--delta-rows`` rows (2M; 300k with
   ``--quick``), Adagrad, is saved in full; then a delta with no change (its size is the
   fixed overhead: offsets, block alignment, aux file, manifest) and, for each k of
   ``--changes`` (10k, 100k, 1M), a delta after ``insert_or_assign`` of k distinct random
   existing ids, each delta against the checkpoint before it. Reported per k: rows in the
   delta, bytes (whole folder), bytes per changed row beyond the empty delta, save seconds.
   The deltas are proportional when bytes per changed row is the same for every k:
   ``delta_bytes_per_row_max_deviation`` = max |b_k - mean| / mean. The last delta's chain
   is restored (lazily) and checked against the values written.

Targets: ``save_vs_raw_write`` >= 0.5, ``load_vs_raw_read`` (cold) >= 0.5, ``first_lookup_s_<N>``
<= 1 s at every size, and flat: ``first_lookup_largest_vs_smallest`` (largest size over
smallest) <= 2 (this benchmark's reading of "flat"), ``delta_bytes_per_row_max_deviation``
<= 0.2.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
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
    targets_table,
    write_report,
)

MODULE = "benchmarks.checkpoint"

FULL = {"rows": 4_000_000, "sizes": [1_000_000, 10_000_000, 50_000_000],
        "delta_rows": 2_000_000, "changes": [10_000, 100_000, 1_000_000], "repeats": 5}
QUICK = {"rows": 300_000, "sizes": [100_000, 300_000, 1_000_000],
         "delta_rows": 300_000, "changes": [3_000, 30_000, 100_000], "repeats": 5}

PHASES = ("throughput", "first_lookup", "delta")

# name: (numerator metric, denominator metric)
RATIOS = {
    "save_vs_raw_write": ("ckpt_save_bytes_per_s", "raw_write_bytes_per_s"),
    # Reads from the disk: both files evicted from the page cache first.
    "load_vs_raw_read": ("ckpt_load_bytes_per_s", "raw_read_bytes_per_s"),
    # Reference: both files in the page cache (the software cost over a memory copy).
    "load_vs_raw_read_page_cache": ("ckpt_load_page_cache_bytes_per_s",
                                    "raw_read_page_cache_bytes_per_s"),
}
REFERENCE_RATIOS = ("load_vs_raw_read_page_cache",)
# name: (op, threshold); first_lookup_s_<N> for every size is added at run time
TARGETS = {
    "save_vs_raw_write": (">=", 0.5),
    "load_vs_raw_read": (">=", 0.5),
    "first_lookup_largest_vs_smallest": ("<=", 2.0),
    "delta_bytes_per_row_max_deviation": ("<=", 0.2),
}
FIRST_LOOKUP_TARGET_S = 1.0

RAW_CHUNK = 64 << 20  # bytes per os.write / readinto of the raw baselines
FILL_CHUNK = 1 << 20  # rows per insert_or_assign / synthetic rows-file append
WARMUP_ROWS = 4096
ROW_META_BYTES = 24  # id, count, last step (int64 each) per row in a rows file

# ============================================================================================
# Child-process helpers
# ============================================================================================


def _dynembed(p: Phase):
    import dynembed as de
    p.record_dynembed(de)
    return de


def _table(de, cfg: dict, optimizer: str):
    opt = de.optim.Adagrad(lr=0.05) if optimizer == "adagrad" else de.optim.SGD(lr=0.1)
    return de.DynamicTable(de.TableConfig(dim=cfg["dim"], optimizer=opt, seed=cfg["seed"]))


def _fill(table, n: int, salt: int, seed: int) -> np.ndarray:
    """Fills ``table`` with rows of ids ``splitmix64(salt + 0..n-1)``: random weights and
    (when the optimizer keeps any) random optimizer state. Returns the ids."""
    import torch
    rng = np.random.default_rng(seed)
    ids = splitmix64(np.arange(n, dtype=np.int64) + salt)
    width = table.arena.state_width
    for s in range(0, n, FILL_CHUNK):
        part = ids[s:s + FILL_CHUNK]
        values = torch.from_numpy(rng.standard_normal((part.shape[0], table.dim), np.float32))
        state = (torch.from_numpy(rng.random((part.shape[0], width), np.float32))
                 if width else None)
        table.insert_or_assign(part, values, optimizer_state=state)
    return ids


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(Path(root) / f for root, _, files in os.walk(path) for f in files)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in _files(path))


def _evict(path: Path) -> None:
    """Drops the pages of every file under ``path`` from the page cache (written back
    first, so they are clean and can go)."""
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident_share(path: Path) -> float | None:
    """Share of the pages of the files under ``path`` that are in the page cache
    (``mincore`` on a private mapping, which faults nothing in); None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        total = resident = 0
        for f in _files(path):
            size = f.stat().st_size
            if size == 0:
                continue
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as m:
                buf = (ctypes.c_char * size).from_buffer(m)
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size),
                                  vec)
                del buf
                if rc != 0:
                    return None
                resident += int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))
                total += pages
        return resident / total if total else None
    except (OSError, AttributeError, TypeError, ValueError):
        return None


def _raw_write(path: Path, nbytes: int, buf: np.ndarray) -> float:
    """Seconds to write ``nbytes`` to a new file with sequential ``os.write`` calls of
    ``buf`` (64 MiB) and one fsync."""
    view = memoryview(buf).cast("B")
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, view[:min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def _raw_read(path: Path) -> float:
    """Seconds to read the file sequentially into a new buffer, 64 MiB at a time."""
    t = time.perf_counter()
    size = path.stat().st_size
    out = np.empty(size, np.uint8)
    view = memoryview(out)
    with open(path, "rb", buffering=0) as f:
        at = 0
        while at < size:
            got = f.readinto(view[at:at + RAW_CHUNK])
            if not got:
                raise OSError(f"{path}: short read at {at} of {size} bytes")
            at += got
    elapsed = time.perf_counter() - t
    del view, out
    return elapsed


def _workdir(cfg: dict) -> Path:
    return Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=cfg.get("dir") or cfg["scratch"]))


def _need_disk(folder: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < 1.1 * nbytes + (256 << 20):
        raise RuntimeError(f"{what} needs about {nbytes / 2**30:.1f} GiB in {folder}, only "
                           f"{free / 2**30:.1f} GiB is free; use --dir or smaller sizes")


def _record(p: Phase, metric: str, seconds: list[float], work: float | None = None) -> None:
    """Records the median of ``seconds`` as ``metric`` (``work`` None), or ``work`` over it
    (a rate), with the spread ((max - min) / median) and every sample."""
    med = statistics.median(seconds)
    if work is None:
        p.metrics[metric] = med
        p.spread[metric] = (max(seconds) - min(seconds)) / med if med > 0 else None
    else:
        p.metrics[metric] = work / med
        p.spread[metric] = (med / min(seconds) - med / max(seconds))
    p.samples[metric] = list(seconds)


# ------------------------------------------------------------------- synthetic checkpoints


def _synthetic_ids(positions: np.ndarray, n: int) -> np.ndarray:
    """Ids of rows ``positions`` of an n-row synthetic checkpoint: row i has bucket hash
    ``(i + 1/2) * 2**64 / n``, so rows in order are in the rows file's (bucket-hash) order,
    spread evenly over the buckets."""
    from dynembed.keys.buckets import id_of_hash
    step = np.uint64((1 << 64) // n)
    return id_of_hash(np.asarray(positions, dtype=np.uint64) * step + step // np.uint64(2))


def _synthetic_bytes(de, cfg: dict, n: int) -> int:
    """Bytes of the rows file of an n-row synthetic (SGD) checkpoint."""
    from dynembed.checkpoint.rows_file import BLOCK, Layout
    from dynembed.keys.buckets import NUM_BUCKETS
    return Layout.plan(BLOCK, cfg["dim"], 0, NUM_BUCKETS, n, 0).file_bytes


def _write_synthetic(de, cfg: dict, path: Path, n: int) -> int:
    """Writes a committed checkpoint of an n-row SGD table ``"t"`` without building it:
    ``save`` of an empty table gives the dense and aux files and the manifest, then
    :func:`fill_synthetic_rows` writes the rows. Returns the rows file's bytes."""
    de.checkpoint.save(path, tables={"t": _table(de, cfg, "sgd")}, extra={"step": 1})
    return fill_synthetic_rows(path, "t", n, cfg["seed"] + 7)


def fill_synthetic_rows(path: Path, table: str, n: int, seed: int) -> int:
    """Replaces the (empty) rows file of ``table`` in the committed one-shard checkpoint at
    ``path`` by one of n synthetic rows (:func:`_synthetic_ids`, random weights and state),
    written a chunk at a time, and gives the manifest its size and row counts. Returns the
    rows file's bytes."""
    from dynembed.checkpoint import manifest as mf
    from dynembed.checkpoint.rows_file import RowsFileWriter
    from dynembed.storage.rows import RowBlock
    manifest = mf.read(path)
    entry = manifest["tables"][table]
    shard = entry["shards"][0]
    rows_file = path / shard["rows_file"]
    rows_file.unlink()
    dim, width = entry["dim"], entry["state_width"]
    writer = RowsFileWriter(str(rows_file), dim=dim, width=width,
                            num_buckets=manifest["num_buckets"], rows=n)
    rng = np.random.default_rng(seed)
    try:
        for s in range(0, n, FILL_CHUNK):
            c = min(FILL_CHUNK, n - s)
            writer.append(RowBlock(_synthetic_ids(np.arange(s, s + c), n),
                                   rng.standard_normal((c, dim), np.float32),
                                   rng.random((c, width), np.float32),
                                   np.ones(c, np.int64), np.zeros(c, np.int64)))
        nbytes = writer.commit()
    except BaseException:
        writer.abort()
        raise
    shard.update(rows=n, live_change=n)
    entry.update(rows=n, live_rows=n)
    manifest["files"][shard["rows_file"]]["bytes"] = nbytes
    mf.write_atomic(path / mf.MANIFEST, mf.encode(manifest))
    return nbytes


def _restart(de, cfg: dict, path: Path, ids: np.ndarray, *, train: bool) -> tuple:
    """A restart: new table, lazy load, first lookup of ``ids``. Returns (seconds to the
    end of the lookup, seconds of table + load, all ids found)."""
    t0 = time.perf_counter()
    table = _table(de, cfg, "sgd")
    de.checkpoint.load(path, tables={"t": table}, lazy=True)
    t1 = time.perf_counter()
    if train:
        found = ~table.find_or_insert(ids).inserted
    else:
        found = table.find(ids).found
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0, bool(found.all())


def _jit_warmup(p: Phase, de, cfg: dict, folder: Path) -> None:
    """Runs every timed code path once on tiny checkpoints (kernels compiled or loaded from
    numba's cache, first-use allocations) before anything is timed."""
    t = time.perf_counter()
    w = folder / "warmup"
    w.mkdir()
    for opt in ("sgd", "adagrad"):
        table = _table(de, cfg, opt)
        ids = _fill(table, WARMUP_ROWS, 1 << 50, cfg["seed"])
        full, delta = w / f"{opt}-full", w / f"{opt}-delta"
        de.checkpoint.save(full, tables={"t": table}, extra={"step": 0})
        _fill(table, WARMUP_ROWS // 8, 1 << 50, cfg["seed"] + 1)
        de.checkpoint.save(delta, tables={"t": table}, parent=full, extra={"step": 1})
        for path in (full, delta):
            eager = _table(de, cfg, opt)
            de.checkpoint.load(path, tables={"t": eager})
            eager.find(ids[:64])
            for train in (False, True):
                lazy = _table(de, cfg, opt)
                de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
                (lazy.find_or_insert if train else lazy.find)(ids[:64])
    syn = w / "synthetic"
    _write_synthetic(de, cfg, syn, WARMUP_ROWS)
    _evict(syn)
    _resident_share(syn)
    ids = _synthetic_ids(np.arange(0, WARMUP_ROWS, 7), WARMUP_ROWS)
    for train in (False, True):
        _restart(de, cfg, syn, ids, train=train)
    raw = w / "raw.bin"
    _raw_write(raw, 1 << 20, np.zeros(1 << 20, np.uint8))
    _raw_read(raw)
    shutil.rmtree(w)
    settle()
    p.info["jit_warmup_s"] = round(time.perf_counter() - t, 2)
    p.log(f"warm-up on tiny checkpoints (JIT, first use) {p.info['jit_warmup_s']}s")


# ============================================================================================
# Child-process phases
# ============================================================================================


def phase_throughput(p: Phase) -> None:
    """Full save and eager load of an Adagrad table vs raw sequential write / read."""
    de = _dynembed(p)
    cfg = p.cfg
    n = cfg["rows"]
    folder = _workdir(cfg)
    try:
        _jit_warmup(p, de, cfg, folder)
        table = _table(de, cfg, "adagrad")
        width = table.arena.state_width
        t = time.perf_counter()
        ids = _fill(table, n, 0, cfg["seed"])
        p.info["fill_s"] = round(time.perf_counter() - t, 2)
        payload = ROW_META_BYTES + 4 * (cfg["dim"] + width)
        p.info["payload_bytes_per_row"] = payload
        _need_disk(folder, 2 * n * payload, "the throughput test")
        buf = np.random.default_rng(cfg["seed"]).integers(0, 256, RAW_CHUNK, dtype=np.uint8)
        check = ids[np.random.default_rng(cfg["seed"] + 1).choice(n, min(n, 4096), replace=False)]
        expected = table.find(check).values
        s: dict[str, list[float]] = {k: [] for k in (
            "save", "write", "read", "load", "read_cold", "load_cold")}
        nbytes_all, resident = [], {}
        for rep in range(cfg["repeats"]):
            ck, raw = folder / f"full-{rep}", folder / f"raw-{rep}.bin"

            def save(ck=ck, rep=rep) -> None:
                settle()
                t = time.perf_counter()
                de.checkpoint.save(ck, tables={"t": table}, extra={"step": rep})
                s["save"].append(time.perf_counter() - t)
                nbytes_all.append(_tree_bytes(ck))

            def write(raw=raw) -> None:  # as many bytes as the (same-sized) saves write
                settle()
                s["write"].append(_raw_write(raw, nbytes_all[-1], buf))

            # which goes first alternates (the first save gives the size to write)
            for step in ((save, write) if rep % 2 == 0 else (write, save)):
                step()

            def load(key: str, ck=ck) -> None:
                fresh = _table(de, cfg, "adagrad")
                settle()
                t = time.perf_counter()
                de.checkpoint.load(ck, tables={"t": fresh})
                s[key].append(time.perf_counter() - t)
                if fresh.size() != n or not bool((fresh.find(check).values == expected).all()):
                    raise RuntimeError(f"eager load of {ck} gave {fresh.size():,} rows, or "
                                       "values that differ from the saved table's")
                del fresh
                settle()

            def read(key: str, raw=raw) -> None:
                settle()
                s[key].append(_raw_read(raw))

            for cold in (False, True):
                suffix = "_cold" if cold else ""
                pair = [(read, "read" + suffix), (load, "load" + suffix)]
                for step, key in (pair if rep % 2 == 0 else pair[::-1]):
                    if cold:
                        _evict(ck)
                        _evict(raw)
                    resident.setdefault(key, []).append(
                        _resident_share(raw if key.startswith("read") else ck))
                    step(key)
            shutil.rmtree(ck)
            raw.unlink()
        nbytes = int(statistics.median(nbytes_all))
        p.info.update(checkpoint_bytes=nbytes_all, rows=n,
                      checkpoint_bytes_per_row=nbytes / n,
                      resident_share_before_reads=resident)
        p.metrics["checkpoint_bytes"] = nbytes
        for metric, key in (("ckpt_save_bytes_per_s", "save"), ("raw_write_bytes_per_s", "write"),
                            ("ckpt_load_bytes_per_s", "load_cold"),
                            ("raw_read_bytes_per_s", "read_cold"),
                            ("ckpt_load_page_cache_bytes_per_s", "load"),
                            ("raw_read_page_cache_bytes_per_s", "read")):
            _record(p, metric, s[key], nbytes)
        p.metrics["ckpt_save_rows_per_s"] = n / statistics.median(s["save"])
        p.metrics["ckpt_load_rows_per_s"] = n / statistics.median(s["load_cold"])
        mib = 2**20
        p.log(f"{n:,} rows, {nbytes / mib:.1f} MiB: save {nbytes / statistics.median(s['save']) / mib:.0f} "
              f"MiB/s vs raw write {nbytes / statistics.median(s['write']) / mib:.0f}; load "
              f"{nbytes / statistics.median(s['load']) / mib:.0f} vs raw read "
              f"{nbytes / statistics.median(s['read']) / mib:.0f} (page cache), "
              f"{nbytes / statistics.median(s['load_cold']) / mib:.0f} vs "
              f"{nbytes / statistics.median(s['read_cold']) / mib:.0f} (cold)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def phase_first_lookup(p: Phase, n: int) -> None:
    """Restarts from an n-row checkpoint: new table, lazy load, first lookup."""
    de = _dynembed(p)
    cfg = p.cfg
    folder = _workdir(cfg)
    try:
        _jit_warmup(p, de, cfg, folder)
        _need_disk(folder, _synthetic_bytes(de, cfg, n), f"a {n:,}-row checkpoint")
        path = folder / "ckpt"
        t = time.perf_counter()
        nbytes = _write_synthetic(de, cfg, path, n)
        write_s = time.perf_counter() - t
        p.info.update(rows=n, rows_file_bytes=nbytes, synthetic_write_s=round(write_s, 2),
                      batch=cfg["batch"])
        p.metrics[f"checkpoint_bytes_{n}"] = _tree_bytes(path)
        p.log(f"wrote a {n:,}-row checkpoint ({nbytes / 2**20:,.1f} MiB) in {write_s:.1f}s")
        rng = np.random.default_rng(cfg["seed"] + n)
        modes = (("warm", False, False), ("cold", True, False), ("cold_train", True, True))
        out = {m: ([], []) for m, _, _ in modes}
        resident, all_found, after = {m: [] for m, _, _ in modes}, True, []
        for mode, cold, train in modes:  # warm first: the file is cached since its write
            for _ in range(cfg["repeats"]):
                ids = _synthetic_ids(rng.choice(n, min(n, cfg["batch"]), replace=False), n)
                gc.collect()
                if cold:
                    _evict(path)
                resident[mode].append(_resident_share(path))
                total, opened, found = _restart(de, cfg, path, ids, train=train)
                out[mode][0].append(total)
                out[mode][1].append(opened)
                all_found &= found
                if mode == "cold":  # how much of the checkpoint the restart read
                    gc.collect()
                    after.append(_resident_share(path))
        if not all_found:
            p.log("WARNING: a first lookup did not find every id")
        p.info.update(all_found=all_found, resident_share_before=resident,
                      resident_share_after_cold_restart=after)
        known = [x for x in after if x is not None]
        if known:
            p.metrics[f"first_lookup_share_read_{n}"] = statistics.median(known)
        names = {"cold": "first_lookup", "warm": "first_lookup_warm",
                 "cold_train": "first_train_lookup"}
        for mode, name in names.items():
            _record(p, f"{name}_s_{n}", out[mode][0])
            _record(p, f"{name}_open_s_{n}", out[mode][1])
        p.log(f"first lookup of {cfg['batch']:,} ids after a restart: cold "
              f"{p.metrics[f'first_lookup_s_{n}']:.4f}s (open "
              f"{p.metrics[f'first_lookup_open_s_{n}']:.4f}s), warm "
              f"{p.metrics[f'first_lookup_warm_s_{n}']:.4f}s, cold find_or_insert "
              f"{p.metrics[f'first_train_lookup_s_{n}']:.4f}s; a cold restart left "
              + (f"{100 * statistics.median(known):.1f}%" if known else "?")
              + " of the checkpoint in the page cache")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def phase_delta(p: Phase) -> None:
    """Delta checkpoint bytes against the number of rows changed since the parent."""
    import torch
    de = _dynembed(p)
    cfg = p.cfg
    n = cfg["delta_rows"]
    folder = _workdir(cfg)
    try:
        _jit_warmup(p, de, cfg, folder)
        table = _table(de, cfg, "adagrad")
        payload = ROW_META_BYTES + 4 * (cfg["dim"] + table.arena.state_width)
        _need_disk(folder, n * payload + 2 * sum(cfg["changes"]) * payload, "the delta test")
        salt = 1 << 40
        ids = _fill(table, n, salt, cfg["seed"])
        prev = folder / "full"
        t = time.perf_counter()
        de.checkpoint.save(prev, tables={"t": table}, extra={"step": 0})
        p.info.update(rows=n, payload_bytes_per_row=payload,
                      full_save_s=round(time.perf_counter() - t, 3),
                      full_bytes=_tree_bytes(prev))
        rng = np.random.default_rng(cfg["seed"] + 3)
        table_info = []
        for step, k in enumerate([0, *cfg["changes"]]):
            changed = ids[rng.choice(n, k, replace=False)] if k else ids[:0]
            values = torch.from_numpy(rng.standard_normal((k, cfg["dim"]), np.float32))
            if k:
                table.insert_or_assign(changed, values)
            path = folder / f"delta-{k}"
            settle()
            t = time.perf_counter()
            de.checkpoint.save(path, tables={"t": table}, parent=prev, extra={"step": step + 1})
            save_s = time.perf_counter() - t
            manifest = json.loads((path / "MANIFEST.json").read_text())
            entry = manifest["tables"]["t"]
            nbytes = _tree_bytes(path)
            rows_file = entry["shards"][0]["rows_file"]
            table_info.append({"changed": k, "rows": entry["rows"], "deleted": entry["deleted"],
                               "bytes": nbytes,
                               "rows_file_bytes": manifest["files"][rows_file]["bytes"],
                               "save_s": save_s})
            if entry["rows"] != k or entry["deleted"]:
                p.log(f"WARNING: the delta after changing {k:,} rows holds {entry['rows']:,} "
                      f"rows and {entry['deleted']:,} deletions")
            prev = path
        # The chain restores to the values written last.
        check = changed[:4096]
        restored = _table(de, cfg, "adagrad")
        de.checkpoint.load(prev, tables={"t": restored}, lazy=True)
        got = restored.find(check)
        ok = bool(got.found.all()) and bool((got.values == values[:4096]).all())
        p.info["chain_restore_ok"] = ok
        if not ok:
            p.log("WARNING: the restored chain does not hold the values written last")
        overhead = table_info[0]["bytes"]
        per_row = []
        for row in table_info:
            k = row["changed"]
            row["bytes_per_row"] = (row["bytes"] - overhead) / k if k else None
            p.metrics[f"delta_bytes_{k}"] = row["bytes"]
            p.metrics[f"delta_rows_{k}"] = row["rows"]
            p.metrics[f"delta_save_s_{k}"] = row["save_s"]
            if k:
                p.metrics[f"delta_bytes_per_row_{k}"] = row["bytes_per_row"]
                per_row.append(row["bytes_per_row"])
        mean = statistics.mean(per_row)
        p.metrics["delta_bytes_empty"] = overhead
        p.metrics["delta_bytes_per_row_mean"] = mean
        p.metrics["delta_bytes_per_row_max_deviation"] = max(abs(b - mean) for b in per_row) / mean
        p.metrics["delta_bytes_per_row_vs_payload"] = mean / payload
        p.info["deltas"] = table_info
        for row in table_info:
            bpr = row["bytes_per_row"]
            p.log(f"delta after {row['changed']:>9,} changed rows: {row['rows']:>9,} rows, "
                  f"{row['bytes']:>13,} B" + (f", {bpr:.1f} B/changed row" if bpr else
                                                " (fixed overhead)")
                  + f", saved in {row['save_s']:.3f}s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_system(p: Phase) -> None:
    """Runs the phase named ``p.name`` (in the child process)."""
    if p.name == "throughput":
        phase_throughput(p)
    elif p.name.startswith("first_lookup_"):
        phase_first_lookup(p, int(p.name[len("first_lookup_"):]))
    elif p.name == "delta":
        phase_delta(p)
    else:
        raise ValueError(f"unknown phase {p.name!r}")


# ============================================================================================
# Parent: configuration, orchestration, report
# ============================================================================================


def _count(text: str) -> int:
    """A row count: digits with an optional k / M / G suffix (``50M``, ``1_000_000``)."""
    s = text.strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a row count: {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a row count >= 1: {text!r}")
    return int(value)


def _counts(text: str) -> list[int]:
    """A comma-separated list of row counts, e.g. ``1M,10M,50M``."""
    counts = sorted({_count(x) for x in text.split(",") if x.strip()})
    if not counts:
        raise argparse.ArgumentTypeError(f"no row counts in {text!r}")
    return counts


def _filesystem(path: str) -> str:
    """The file system ``path`` is on, from /proc/mounts."""
    path = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        return "unknown"
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


def build_config(args) -> dict:
    base = run_sizes(args, FULL, QUICK, {"rows": "rows", "repeats": "repeats",
                                         "delta_rows": "delta_rows", "sizes": "sizes",
                                         "changes": "changes"})
    if max(base["changes"]) > base["delta_rows"]:
        raise SystemExit(f"--changes {base['changes']} must not exceed --delta-rows "
                         f"{base['delta_rows']}")
    return {
        "quick": bool(args.quick),
        "dim": 16,
        "seed": int(args.seed),
        "repeats": int(base["repeats"]),
        "rows": int(base["rows"]),
        "sizes": [int(x) for x in base["sizes"]],
        "batch": int(args.batch),
        "delta_rows": int(base["delta_rows"]),
        "changes": [int(x) for x in base["changes"]],
        "dir": os.path.realpath(args.dir) if args.dir else None,
        "filesystem": _filesystem(args.dir or tempfile.gettempdir()),
        "warmup": "every phase first saves, loads (eager and lazy) and looks up tiny "
                  "checkpoints (full, delta, synthetic) so numba kernels are compiled or "
                  "loaded from their cache before anything is timed",
        "throughput": "Adagrad table of `rows` rows (random weights and state); per round: "
                      "de.checkpoint.save (full) of it, then os.write of the same number of "
                      "bytes (the checkpoint folder's) to a new file in 64 MiB calls + fsync; "
                      "then eager de.checkpoint.load into a fresh table and a sequential "
                      "readinto of the raw file into a new buffer (64 MiB calls), both with "
                      "the files in the page cache (right after the writes; reference "
                      "load_vs_raw_read_page_cache), then both again after fsync + "
                      "posix_fadvise(DONTNEED) of both files (cold, from the disk: the ratio "
                      "load_vs_raw_read); the order of each pair alternates; median bytes/s "
                      "over `repeats` rounds",
        "first_lookup": "per size N: an SGD checkpoint of N rows written with the rows-file "
                        "writer in 1M-row chunks (row i has bucket hash (i+1/2)*2**64/N; "
                        "manifest, aux and dense files from save() of an empty table, "
                        "patched); a restart = new DynamicTable + load(lazy=True) + "
                        "table.find(`batch` distinct random existing ids, new every "
                        "restart), timed from before the table is built to the end of the "
                        "lookup; first_lookup_s_<N>: every checkpoint file evicted from the "
                        "page cache before each restart (cold); _warm_: the file in the page "
                        "cache (warm runs first, right after the write); first_train_lookup: "
                        "cold, with find_or_insert; first_lookup_share_read: share of the "
                        "checkpoint's pages in the page cache after a cold restart (mincore); "
                        "medians over `repeats` restarts",
        "delta": "Adagrad table of `delta_rows` rows saved in full, then a delta with no "
                 "change (fixed overhead), then per k in `changes`: insert_or_assign of k "
                 "distinct random existing ids and a delta against the previous checkpoint; "
                 "bytes = whole checkpoint folder; bytes per row = (bytes - empty delta "
                 "bytes) / k; max deviation = max |b_k - mean| / mean",
    }


def compute_ratios(metrics: dict, cfg: dict) -> tuple[dict, dict]:
    ratios = {name: ratio_of(metrics, num, den) for name, (num, den) in RATIOS.items()}
    sizes = cfg["sizes"]
    first = {n: metrics.get(f"first_lookup_s_{n}") for n in sizes}
    lo, hi = first[min(sizes)], first[max(sizes)]
    ratios["first_lookup_largest_vs_smallest"] = (
        hi / lo if len(sizes) > 1 and isinstance(lo, (int, float)) and lo > 0
        and isinstance(hi, (int, float)) else None)
    dev = metrics.get("delta_bytes_per_row_max_deviation")
    ratios["delta_bytes_per_row_max_deviation"] = dev if isinstance(dev, (int, float)) else None
    targets = {}
    for name in ("save_vs_raw_write", "load_vs_raw_read"):
        targets[name] = evaluate_target(*TARGETS[name], ratios[name])
    for n in sizes:
        value = first[n] if isinstance(first[n], (int, float)) else None
        targets[f"first_lookup_s_{n}"] = evaluate_target("<=", FIRST_LOOKUP_TARGET_S, value)
    for name in ("first_lookup_largest_vs_smallest", "delta_bytes_per_row_max_deviation"):
        targets[name] = evaluate_target(*TARGETS[name], ratios[name])
    return ratios, targets


def _mib_s(x) -> str:
    return f"{x / 2**20:,.0f} MiB/s" if isinstance(x, (int, float)) else "-"


def _secs(x) -> str:
    return f"{x:.4f} s" if isinstance(x, (int, float)) else "-"


def _pct(x) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "-"


def render(report: dict) -> str:
    m, cfg, sp = report["metrics"], report["config"], report["config"].get("spread", {})
    info = cfg.get("phase_info", {})
    W = 96
    L: list[str] = []

    def row(label, key, fmt=_mib_s):
        L.append(metric_row(label, fmt(m.get(key)), sp.get(key), 56))

    mach = report["machine"]
    L.extend(report_header(
        report,
        f"dynembed checkpoint benchmark   dim={cfg['dim']}  median of {cfg['repeats']}"
        + ("  [quick]" if cfg["quick"] else ""),
        f"dynembed kernel threads {mach.get('dynembed_num_threads', '-')}",
        W))
    L.append(f"checkpoints written to {cfg.get('dir') or 'the temporary folder'}: "
             f"{cfg['filesystem']}")
    L.append("every phase first runs each code path on tiny checkpoints (JIT warm-up), "
             "so timings are I/O and search, not compilation")
    L.append("-" * W)
    tp = info.get("throughput", {})
    nbytes = m.get("checkpoint_bytes")
    L.append(f"1) Save / load throughput: {cfg['rows']:,} rows, Adagrad "
             f"({tp.get('payload_bytes_per_row', '-')} B/row of payload), full checkpoint "
             + (f"{nbytes / 2**20:,.1f} MiB" if isinstance(nbytes, (int, float)) else "-"))
    row("de.checkpoint.save, full (fsync'd)", "ckpt_save_bytes_per_s")
    row("raw sequential os.write + fsync, same bytes", "raw_write_bytes_per_s")
    row("de.checkpoint.load, eager (cold: files evicted)", "ckpt_load_bytes_per_s")
    row("raw sequential read (cold: file evicted)", "raw_read_bytes_per_s")
    row("de.checkpoint.load, eager (page cache)", "ckpt_load_page_cache_bytes_per_s")
    row("raw sequential read (page cache)", "raw_read_page_cache_bytes_per_s")
    L.append(f"2) Time to first lookup after a restart: new table + load(lazy=True) + "
             f"find({cfg['batch']:,} random existing ids); SGD, median of {cfg['repeats']}")
    L.append(f"  {'rows':>12s} {'file MiB':>10s} {'cold':>10s} {'(open)':>10s} "
             f"{'file read':>10s} {'warm':>10s} {'(open)':>10s} {'cold find_or_insert':>20s}")
    for n in cfg["sizes"]:
        fb = info.get(f"first_lookup_{n}", {}).get("rows_file_bytes")
        L.append(f"  {n:>12,} {fb / 2**20 if fb else float('nan'):>10,.1f} "
                 f"{_secs(m.get(f'first_lookup_s_{n}')):>10s} "
                 f"{_secs(m.get(f'first_lookup_open_s_{n}')):>10s} "
                 f"{_pct(m.get(f'first_lookup_share_read_{n}')):>10s} "
                 f"{_secs(m.get(f'first_lookup_warm_s_{n}')):>10s} "
                 f"{_secs(m.get(f'first_lookup_warm_open_s_{n}')):>10s} "
                 f"{_secs(m.get(f'first_train_lookup_s_{n}')):>20s}")
    deltas = info.get("delta", {}).get("deltas", [])
    L.append(f"3) Delta checkpoints: {cfg['delta_rows']:,}-row Adagrad table, k random rows "
             "reassigned, each delta against the previous checkpoint")
    L.append(f"  {'changed rows':>14s} {'rows in delta':>14s} {'bytes':>14s} "
             f"{'B/changed row':>14s} {'save':>10s}")
    for d in deltas:
        bpr = d.get("bytes_per_row")
        L.append(f"  {d['changed']:>14,} {d['rows']:>14,} {d['bytes']:>14,} "
                 f"{(f'{bpr:.1f}' if bpr else 'overhead'):>14s} {_secs(d['save_s']):>10s}")
    if deltas:
        L.append(f"  mean {m.get('delta_bytes_per_row_mean', 0):.1f} B per changed row = "
                 f"{m.get('delta_bytes_per_row_vs_payload', 0):.3f} x the row payload "
                 f"({info.get('delta', {}).get('payload_bytes_per_row', '-')} B); chain "
                 f"restore {'ok' if info.get('delta', {}).get('chain_restore_ok') else 'FAILED'}")
    L.append("-" * W)
    L.extend(targets_table(report, list(REFERENCE_RATIOS), "(reference)",
                           lambda name, v: f"{v:.4f}" if name.startswith("first_lookup_s_")
                           else f"{v:.3f}"))
    L.extend(report_footer(report, W))
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short run (sizes 100k,300k,1M; 300k-row tables)")
    ap.add_argument("--json", "--out", dest="json", metavar="PATH",
                    help="write results as JSON to PATH")
    ap.add_argument("--sizes", type=_counts, metavar="N,N,...",
                    help="checkpoint rows for the first-lookup test (default 1M,10M,50M; "
                         "quick 100k,300k,1M)")
    ap.add_argument("--rows", type=_count, help="rows of the throughput table (default 4M, "
                                                "quick 300k)")
    ap.add_argument("--delta-rows", type=_count,
                    help="rows of the delta test's table (default 2M, quick 300k)")
    ap.add_argument("--changes", type=_counts, metavar="K,K,...",
                    help="changed rows per delta (default 10k,100k,1M; quick 3k,30k,100k)")
    ap.add_argument("--batch", type=int, default=1024,
                    help="ids in the first lookup after a restart (default 1024)")
    ap.add_argument("--repeats", type=int, help="rounds / restarts per measurement (>= 5)")
    ap.add_argument("--dir", metavar="PATH",
                    help="folder to write checkpoints and raw files in (the disk measured; "
                         "default: the temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of: {','.join(PHASES)}")
    add_harness_args(ap, timeout_s=1800, quick_timeout_s=300)
    args = ap.parse_args(argv)
    if args._phase:
        return run_phase(args._phase, Path(args._workdir), run_system)
    phases = parse_phases(ap, args.phases, PHASES)
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    if args.dir and not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir}: no such folder")
    cfg = build_config(args)
    record_run_options(cfg, phases, args)
    cfg["loadavg_start"] = loadavg()
    t_start = time.perf_counter()
    check_quiet_at_start(cfg, args.wait_quiet)
    run = [x for ph in phases
           for x in ([f"first_lookup_{n}" for n in cfg["sizes"]] if ph == "first_lookup"
                     else [ph])]
    eprint(f"checkpoint benchmark: throughput on {cfg['rows']:,} rows, first lookup at "
           f"{', '.join(f'{n:,}' for n in cfg['sizes'])} rows, deltas of "
           f"{', '.join(f'{k:,}' for k in cfg['changes'])} rows of {cfg['delta_rows']:,}; "
           f"writing to {cfg['dir'] or tempfile.gettempdir()} ({cfg['filesystem']})")
    results = run_phases(MODULE, cfg, {}, run, prefix="dynembed-ckpt-",
                         timeout=args.phase_timeout or (300 if cfg["quick"] else 1800),
                         wait_quiet_s=args.wait_quiet, retries=args.retries, scratch=True)
    ratios, targets = compute_ratios(results.metrics, cfg)
    report = build_report(MODULE, argv, cfg, results, t_start, ratios, targets)
    write_report(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
