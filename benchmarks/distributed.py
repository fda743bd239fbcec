"""Distributed benchmark: elastic training on torchrun (issue 5).

Measures training throughput at 1 and 2 processes, the bytes the row exchange moves per
step against the distinct keys per step, the time from a worker's death to the first step
completed after torchrun restarts the job (``recovery_s``), and the time of the first step
after a restart from a checkpoint of 1M and 10M rows (it must not grow with table size).

Run from the repository root::

    python -m benchmarks.distributed                  # full run (about 5 minutes on 2 cores)
    python -m benchmarks.distributed --quick          # short run (under 2 minutes)
    python -m benchmarks.distributed --json bench-results/distributed.json   # also write JSON
    python -m benchmarks.distributed --phases throughput,recovery            # a subset

Each part runs in its own child process (``--_phase``), which starts the training jobs:
the script :mod:`benchmarks.distributed_worker`, alone (``python -m``) or as the ranks of
``python -m torch.distributed.run --nnodes=1 --nproc-per-node=N --rdzv-backend=c10d
--rdzv-endpoint=localhost:0 --monitor-interval=0.1`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
(``dynembed.train.launch.TORCHRUN_ENV``), in the repository root with it first on
``PYTHONPATH``. Every job runs in its own session with a timeout (``--job-timeout``, and
within the phase's timeout); a job that overruns is stopped (SIGTERM to torchrun, which
stops its workers, then SIGKILL; a worker whose launcher is gone exits by itself), and a
failed job's error names the last lines of its workers' logs. Everything runs on this machine (gloo over loopback), so
"2 processes" share its cores: on a 2-core machine they cannot scale, and the numbers say
what distribution costs, not what it gains on real hardware.

1. **Throughput** (``throughput``). A CTR-like model: an ``EmbeddingCollection`` with two
   sharded tables, ``user`` and ``item`` (dim 32, ``de.optim.Adagrad``), and three
   features, the user id, the item id and a mean-pooled bag of ``history`` (8) item ids
   (10 keys per sample), concatenated into an MLP (96 -> 64 -> 1, Adam, DDP). A click log
   of ``samples`` (2**20) rows is generated once (Zipf(1.1) ranks over 10M user ids and
   1M item ids, scattered over the int64 range by SplitMix64; random labels) and
   memory-mapped by every rank. The loop is the one of ``de.train.Runtime``'s docstring:
   ``rt.batch_indices(step, 4096, samples)`` (global batch 4,096 samples, each rank its
   part), forward, BCE loss, backward, ``opt.step()``; no checkpoints. After
   ``warmup_steps`` untimed steps (numba kernels loaded, tables filled past their first
   growth), ``repeats`` segments of ``segment_steps`` steps are timed (every rank meets at
   a barrier at each segment boundary). Three launches, in ``rounds`` rounds whose order
   rotates: **1 process** (the worker run directly: no torchrun, no process group; numba
   and torch use both cores), **2 processes** (torchrun as a user runs it: torchrun sets
   ``OMP_NUM_THREADS=1``, the Runtime gives each rank's kernels its share of the cores)
   and **2 processes, 1 thread each** (also ``NUMBA_NUM_THREADS=1``, so numba's OpenMP
   layer cannot raise torch's thread count back). Each run records the torch and dynembed
   thread counts its ranks ended with. Samples/s and key occurrences/s (10 per sample)
   are medians over every segment of every round; ``throughput_2_vs_1`` = 2-process /
   1-process samples/s and ``throughput_2_1thread_vs_1`` (informational). Also reported:
   the seconds per step spent in ``rt.batch_indices`` (the data position).

2. **Bytes exchanged per step** (from the 2-process runs). ``rt.plan.traffic`` of every
   rank (bytes sent to other ranks by the row exchange: id requests, rows and gradients;
   DDP's all-reduce of the dense gradients is not in it), reset when the timing starts,
   summed over the ranks and divided by the timed steps: ``bytes_per_step``. Against it:
   ``unique_keys_per_step`` (distinct keys of the global batch, per table, summed over the
   tables: the rows the owners look up and update) and ``rank_unique_keys_per_step`` (the
   same summed over each rank's part: a key in both parts is requested twice);
   ``bytes_per_unique_key`` = bytes_per_step / unique_keys_per_step. The payload per
   remote key is an (id, count, table) request of 24 B (int64 each) plus a row and a
   gradient of 4 x dim B each (280 B at dim 32); about half of each rank's distinct keys
   live on the other rank (``bytes_per_remote_key`` = bytes_per_step /
   (rank_unique_keys_per_step / 2) compares with it).

3. **Recovery after a worker's death** (``recovery``, ``recovery_runs`` runs). A 2-rank
   job (``--max-restarts=1``) of the same model and data, checkpointing every
   ``recovery_every`` (10) steps, ``recovery_steps`` (20) steps in all. After step
   ``recovery_kill_step`` (15) rank 1 writes ``time.time()`` to a marker file and SIGKILLs
   itself (once). torchrun notices, stops rank 0, restarts both, and they restore the
   checkpoint of step 10 (lazily) and go on. ``recovery_s`` = the wall-clock time at which
   rank 0 of the restarted attempt completes its first step minus the time of the kill,
   median over the runs. The split, from timestamps rank 0 writes: ``restart`` (kill to
   the new rank 0 process's first line: failure detection, stopping the survivor,
   rendezvous, spawn), ``startup`` (``imports`` of torch and dynembed, then
   ``process_group``: ``rt.start``), ``prepare`` (``build``: the model; ``shard``:
   ``rt.prepare``, i.e. ``shard_model`` and DDP), ``restore`` (``rt.restore``) and
   ``first_step``. The restarted processes load numba's cached kernels on first use,
   inside these times.

4. **First step after a restart vs table size** (``first_step_<N>``, one child per size of
   ``sizes``: 1M and 10M rows; 1M and 3M with ``--quick``: at 100k rows the file has fewer
   pages than a step has keys, so nearly all of it is read and the ratio measures page
   sharing, not flatness). A checkpoint of a model
   with one sharded SGD table (dim 16) and a linear layer is written as a 1-process job's
   checkpoint ``step-0000000100`` would be, the rows file a chunk at a time with
   :mod:`benchmarks.checkpoint`'s synthetic writer approach (row i has bucket hash
   ``(i + 1/2) * 2**64 / N``: evenly spread, no N-row table in memory; 84 MiB at 1M rows,
   841 MiB at 10M). One 2-rank torchrun job then warms up every code path on a tiny model
   (a sharded step, a save, a lazy restore and a step on it) and restarts
   ``restarts`` times per mode: a new model, ``rt.prepare``, ``rt.restore`` (lazy, the
   Runtime's default: each rank opens its buckets of the 1-process checkpoint) and
   ``timed_steps`` (3) training steps, each on a global batch of 4,096 distinct random
   existing ids (new every restart). Warm restarts run first (the checkpoint in the page
   cache: it is read once before the job), then cold ones (rank 0 evicts every file of the
   checkpoint from the page cache, ``posix_fadvise(DONTNEED)``, before each). Times are
   the slowest rank's, the steps timed from a barrier after the restore;
   ``first_step_s_<N>`` is the median over the cold restarts of the first step's seconds
   (``restore_s_<N>``: of ``rt.restore``), ``first_step_warm_s_<N>`` the same warm;
   ``later_steps_s_<N>``: the median of the next steps (cold); ``share_read_<N>``: the
   share of the checkpoint's pages in the page cache after a cold restart (``mincore``;
   it is checked to be about 0 right after the eviction, which needs the previous
   restart's model and autograd graph, and so its mappings of the file, gone first). Every
   id of every step must come from the checkpoint (no inserts). Deviation from the
   issue's sketch: the restarts happen inside one 2-rank process pair per size instead of
   one torchrun job each (a fresh process spends about 2 s importing torch, starting the
   process group and loading numba's cached kernels whatever the table size; that is in
   ``recovery_s``), so the difference between sizes is the table-size-dependent part.

Target: ``first_step_<large>_vs_<small>`` (e.g. ``first_step_10M_vs_1M``) <= 2: the first step
after a restart is flat in the table size (the issue's "must not grow with table size", read
as this benchmark's other flatness targets are). Everything else is reported without a
target. Temporary files (click log, checkpoints, logs) are removed at the end.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import (
    REPO_ROOT,
    Phase,
    add_harness_args,
    build_report,
    check_quiet_at_start,
    child_env,
    eprint,
    evaluate_target,
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
    splitmix64,
    targets_table,
    write_report,
    zipf_ranks,
)
from benchmarks.checkpoint import (
    _counts,
    _evict,
    _files,
    _need_disk,
    _resident_share,
    _tree_bytes,
    fill_synthetic_rows,
)

MODULE = "benchmarks.distributed"
WORKER = "benchmarks.distributed_worker"

FULL = {"repeats": 5, "segment_steps": 40, "warmup_steps": 30, "rounds": 3,
        "recovery_runs": 5, "sizes": [1_000_000, 10_000_000], "restarts": 5}
QUICK = {"repeats": 5, "segment_steps": 10, "warmup_steps": 10, "rounds": 1,
         "recovery_runs": 1, "sizes": [1_000_000, 3_000_000], "restarts": 3}

PHASES = ("throughput", "recovery", "first_step")
LAUNCHES = {  # name: (processes, extra environment)
    "1proc": (1, {}),
    "2proc": (2, {}),
    "2proc_1thread": (2, {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}),
}
FIRST_STEP_TARGET = 2.0
REQUEST_BYTES = 24  # a routed id's request: (id, count, table), int64 each
MONITOR_INTERVAL = 0.1  # torchrun's default, given explicitly (recovery_s depends on it)

# ============================================================================================
# Child-process helpers
# ============================================================================================


def _label(n: int) -> str:
    """1_000_000 -> "1M", 100_000 -> "100k" (metric names)."""
    for div, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def _scratch(cfg: dict, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cfg["scratch"]))


def _tail_logs(log_dir: Path, lines: int = 6) -> str:
    """The last lines of every worker log under ``log_dir`` (torchrun's ``--log-dir``)."""
    out = []
    for f in sorted(log_dir.rglob("*.log")):
        text = f.read_text(errors="replace").strip().splitlines()
        if text:
            out.append(f"{f.relative_to(log_dir)}: " + " | ".join(text[-lines:]))
    return " || ".join(out)[-3000:]


def _stop(proc: subprocess.Popen) -> None:
    """Stops a job: SIGTERM to its session (torchrun passes it on to the workers, which run
    in sessions of their own), SIGKILL after 20 s. Workers whose launcher is gone exit by
    themselves (their parent-watch thread, :mod:`benchmarks.distributed_worker`)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(nproc: int, worker_args: list[str], *, log_dir: Path, timeout: float,
           max_restarts: int = 0, env_extra: dict | None = None, direct: bool = False
           ) -> dict:
    """Runs the worker: directly (``direct``: one process, no torchrun) or as ``nproc``
    torchrun ranks. Returns ``{"rc", "wall_s", "error"}``; a job past ``timeout`` is stopped
    (:func:`_stop`; rc None)."""
    from dynembed.train.launch import TORCHRUN_ENV
    log_dir.mkdir(parents=True, exist_ok=True)
    if direct:
        cmd = [sys.executable, "-m", WORKER, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
               f"--monitor-interval={MONITOR_INTERVAL}", f"--log-dir={log_dir}",
               "--redirects=3", "-m", WORKER, *worker_args]
    env = child_env({**TORCHRUN_ENV, **(env_extra or {})})
    t = time.perf_counter()
    with open(log_dir / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as e:  # timeout, Ctrl-C, SIGTERM (SystemExit, see run_system)
            _stop(proc)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            rc = None
    wall = time.perf_counter() - t
    error = None
    if rc != 0:
        what = f"timed out after {timeout:.0f}s" if rc is None else f"exit code {rc}"
        error = f"{what}: {_tail_logs(log_dir)}"
    return {"rc": rc, "wall_s": wall, "error": error}


def _run(p: Phase, name: str, nproc: int, worker_args: list[str], folder: Path, **kw) -> dict:
    """``launch`` with the phase's job timeout; raises on failure (the log tail in it)."""
    p.log(f"{name}: {nproc} process(es) " + ("directly" if kw.get("direct") else "on torchrun"))
    # within the phase's own timeout: the harness kills the phase child, not the jobs (they
    # run in their own sessions)
    left = p.cfg["_deadline"] - time.monotonic()
    if left < 10:
        raise RuntimeError(f"job {name}: the phase's timeout is (nearly) reached")
    r = launch(nproc, worker_args, log_dir=folder / "logs",
               timeout=min(p.cfg["job_timeout"], left), **kw)
    if r["error"]:
        raise RuntimeError(f"job {name} failed: {r['error']}")
    return r


def _record(p: Phase, metric: str, values: list[float], *, rate: float | None = None) -> None:
    """Records the median of ``values`` (seconds) as ``metric``, or ``rate`` / that median;
    with its spread ((max - min) / median) and every sample."""
    med = statistics.median(values)
    if rate is None:
        p.metrics[metric] = med
        p.spread[metric] = (max(values) - min(values)) / med if med > 0 else None
    else:
        p.metrics[metric] = rate / med
        p.spread[metric] = (rate / min(values) - rate / max(values)) / (rate / med)
    p.samples[metric] = list(values)


def _make_click_log(cfg: dict, folder: Path) -> Path:
    """Writes the synthetic click log (``.npy`` files the workers memory-map)."""
    data = folder / "data"
    data.mkdir()
    rng = np.random.default_rng(cfg["seed"])
    n, h = cfg["samples"], cfg["history"]
    users = splitmix64(zipf_ranks(rng, 1.1, cfg["user_ids"], n))
    items = splitmix64(zipf_ranks(rng, 1.1, cfg["item_ids"], n * (1 + h)) + (1 << 40))
    np.save(data / "user.npy", users)
    np.save(data / "item.npy", items[:n])
    np.save(data / "history.npy", items[n:].reshape(n, h))
    np.save(data / "label.npy", (rng.random(n) < 0.25).astype(np.float32))
    return data


def _common_args(cfg: dict, dim: int | None = None) -> list[str]:
    return ["--dim", str(dim or cfg["dim"]), "--batch", str(cfg["batch"]),
            "--seed", str(cfg["seed"]), "--timeout", str(cfg["collective_timeout"])]


def _payload_bytes(dim: int) -> int:
    """Bytes a remote key costs on the wire: its request plus its row there and its
    gradient back."""
    return REQUEST_BYTES + 2 * 4 * dim


# ============================================================================================
# Child-process phases
# ============================================================================================


def phase_throughput(p: Phase) -> None:
    """1 process, 2 processes, 2 processes of 1 thread: samples/s; traffic per step."""
    cfg = p.cfg
    folder = _scratch(cfg, "throughput")
    try:
        t = time.perf_counter()
        data = _make_click_log(cfg, folder)
        p.info["click_log_s"] = round(time.perf_counter() - t, 1)
        names = list(LAUNCHES)
        seg: dict[str, list[float]] = {k: [] for k in names}
        runs: dict[str, list[dict]] = {k: [] for k in names}
        for rnd in range(cfg["rounds"]):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                nproc, env = LAUNCHES[name]
                out = folder / f"{name}-{rnd}"
                args = ["--mode", "throughput", "--data", str(data), "--out", str(out),
                        "--warmup-steps", str(cfg["warmup_steps"]),
                        "--segments", str(cfg["repeats"]),
                        "--segment-steps", str(cfg["segment_steps"]), *_common_args(cfg)]
                r = _run(p, f"{name} round {rnd}", nproc, args, out, env_extra=env,
                         direct=nproc == 1)
                res = json.loads((out / "throughput.json").read_text())
                res["wall_s"] = round(r["wall_s"], 1)
                runs[name].append(res)
                seg[name].extend(res["segments_s"])
                step_ms = 1000 * statistics.median(res["segments_s"]) / cfg["segment_steps"]
                p.log(f"{name} round {rnd}: {step_ms:.1f} ms/step, batch_indices "
                      f"{1000 * res['data_s'] / res['timed_steps']:.1f} ms/step, threads "
                      f"torch {res['torch_threads']} / dynembed {res['dynembed_threads']}")
        first = runs["1proc"][0]
        per_sample = first["keys_per_sample"]
        samples_per_seg = cfg["batch"] * cfg["segment_steps"]
        for name in names:
            _record(p, f"samples_per_s_{name}", seg[name], rate=samples_per_seg)
            _record(p, f"keys_per_s_{name}", seg[name], rate=samples_per_seg * per_sample)
            p.metrics[f"step_s_{name}"] = statistics.median(seg[name]) / cfg["segment_steps"]
            p.metrics[f"batch_indices_s_per_step_{name}"] = statistics.median(
                r["data_s"] / r["timed_steps"] for r in runs[name])
        two = runs["2proc"]
        steps = two[0]["timed_steps"]
        p.metrics["bytes_per_step"] = statistics.median(r["bytes_sent"] / steps for r in two)
        p.metrics["exchanges_per_step"] = two[0]["exchanges"] / steps
        p.metrics["unique_keys_per_step"] = first["unique_keys_per_step"]
        p.metrics["rank_unique_keys_per_step"] = two[0]["rank_unique_keys_per_step"]
        p.metrics["keys_per_step"] = cfg["batch"] * per_sample
        p.metrics["bytes_per_unique_key"] = (p.metrics["bytes_per_step"]
                                             / p.metrics["unique_keys_per_step"])
        # each rank's distinct keys live on the other rank with probability (W-1)/W
        remote = p.metrics["rank_unique_keys_per_step"] / 2
        p.metrics["bytes_per_remote_key"] = p.metrics["bytes_per_step"] / remote
        p.info.update(runs=runs, payload_bytes_per_remote_key=_payload_bytes(cfg["dim"]),
                      keys_per_sample=per_sample)
        p.log(f"1 process {fmt_rate(p.metrics['samples_per_s_1proc']).strip()} samples, "
              f"2 processes {fmt_rate(p.metrics['samples_per_s_2proc']).strip()}, 2 x 1 thread "
              f"{fmt_rate(p.metrics['samples_per_s_2proc_1thread']).strip()}; "
              f"{p.metrics['bytes_per_step'] / 2**20:.2f} MiB exchanged per step for "
              f"{p.metrics['unique_keys_per_step']:,.0f} distinct keys "
              f"({p.metrics['bytes_per_unique_key']:.0f} B/key)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def phase_recovery(p: Phase) -> None:
    """SIGKILL of rank 1: seconds until the restarted job's first step."""
    cfg = p.cfg
    folder = _scratch(cfg, "recovery")
    try:
        data = _make_click_log(cfg, folder)
        parts: dict[str, list[float]] = collections.defaultdict(list)
        lost = []
        for run in range(cfg["recovery_runs"]):
            out, ckpt = folder / f"run-{run}", folder / f"ckpt-{run}"
            args = ["--mode", "recovery", "--data", str(data), "--out", str(out),
                    "--ckpt", str(ckpt), "--every", str(cfg["recovery_every"]),
                    "--steps", str(cfg["recovery_steps"]), "--kill-rank", "1",
                    "--kill-step", str(cfg["recovery_kill_step"]), *_common_args(cfg)]
            r = _run(p, f"recovery run {run}", 2, args, out, max_restarts=1)
            kill = json.loads((out / "killed.json").read_text())
            a1 = json.loads((out / "attempt-1-rank-0.json").read_text())
            other = json.loads((out / "attempt-1-rank-1.json").read_text())
            tt, t_kill = a1["times"], kill["time"]
            if a1["final_step"] != cfg["recovery_steps"]:
                raise RuntimeError(f"the restarted job ended at step {a1['final_step']}")
            split = {"recovery": tt["first_step"] - t_kill,
                     "restart": tt["main"] - t_kill,
                     "startup": tt["started"] - tt["main"],
                     "imports": tt["imported"] - tt["main"],
                     "process_group": tt["started"] - tt["imported"],
                     "prepare": tt["prepared"] - tt["started"],
                     "build": tt["built"] - tt["started"],
                     "shard": tt["prepared"] - tt["built"],
                     "restore": tt["restored"] - tt["prepared"],
                     "first_step": tt["first_step"] - tt["restored"],
                     "recovery_rank1": other["times"]["first_step"] - t_kill}
            for k, v in split.items():
                parts[k].append(v)
            lost.append(kill["step"] - a1["restored_step"])
            parts["job_wall"].append(r["wall_s"])
            p.log(f"run {run}: recovery {split['recovery']:.2f}s = restart "
                  f"{split['restart']:.2f} + startup {split['startup']:.2f} + prepare "
                  f"{split['prepare']:.2f} + restore {split['restore']:.2f} + first step "
                  f"{split['first_step']:.2f}; resumed at step {a1['restored_step']} "
                  f"(killed after {kill['step']})")
        _record(p, "recovery_s", parts["recovery"])
        for k in ("restart", "startup", "imports", "process_group", "prepare", "build",
                  "shard", "restore", "first_step"):
            _record(p, f"recovery_{k}_s", parts[k])
        p.metrics["recovery_steps_lost"] = statistics.median(lost)
        p.info.update(runs=cfg["recovery_runs"], recovery_rank1_s=parts["recovery_rank1"],
                      job_wall_s=parts["job_wall"], steps_lost=lost)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_checkpoint(cfg: dict, path: Path, n: int) -> int:
    """A 1-process job's checkpoint of the first-step model with an n-row table, without
    building it: ``save`` of the empty model gives the dense and aux files and the
    manifest, then :func:`benchmarks.checkpoint.fill_synthetic_rows` writes the table's
    rows. Returns the rows file's bytes."""
    import torch

    import dynembed as de
    from benchmarks.distributed_worker import FIRST_STEP_TABLE, RESTORED_STEP, BigModel
    model = BigModel(cfg["first_step_dim"])
    opt = torch.optim.SGD(model.dense.parameters(), lr=0.01)
    de.checkpoint.save(path, model, opt, {"step": RESTORED_STEP, "world_size": 1, "user": {}})
    return fill_synthetic_rows(path, FIRST_STEP_TABLE, n, cfg["seed"] + 7)


def _read_all(path: Path) -> None:
    """Reads every file under ``path`` (into the page cache)."""
    for f in _files(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def phase_first_step(p: Phase, n: int) -> None:
    """Restores of an n-row checkpoint on 2 ranks: restore and first-step seconds."""
    from benchmarks.distributed_worker import RESTORED_STEP
    cfg = p.cfg
    label = _label(n)
    folder = _scratch(cfg, f"first-step-{label}")
    try:
        ckpt = folder / "ckpt"
        ckpt.mkdir()
        path = ckpt / f"step-{RESTORED_STEP:010d}"
        _need_disk(folder, n * (24 + 4 * cfg["first_step_dim"]) + (64 << 20),
                   f"a {n:,}-row checkpoint")
        t = time.perf_counter()
        nbytes = _write_checkpoint(cfg, path, n)
        write_s = time.perf_counter() - t
        p.metrics[f"checkpoint_bytes_{label}"] = _tree_bytes(path)
        p.info.update(rows=n, rows_file_bytes=nbytes, write_s=round(write_s, 1))
        p.log(f"wrote a {n:,}-row checkpoint ({nbytes / 2**20:,.1f} MiB) in {write_s:.1f}s")
        _read_all(path)
        p.info["resident_share_before_warm"] = _resident_share(path)
        out = folder / "out"
        args = ["--mode", "first_step", "--ckpt", str(ckpt), "--out", str(out),
                "--scratch", str(folder), "--rows", str(n),
                "--restarts", str(cfg["restarts"]), "--timed-steps", str(cfg["timed_steps"]),
                *_common_args(cfg, cfg["first_step_dim"])]
        r = _run(p, f"first step {label}", 2, args, out)
        res = json.loads((out / "first_step.json").read_text())
        recs = {m: [x for x in res["records"] if x["mode"] == m] for m in ("warm", "cold")}
        expected_hits = cfg["batch"] * cfg["timed_steps"]
        # every key is a hit in memory (read by an earlier step) or a row loaded from the
        # checkpoint; none is new
        bad = [x for x in res["records"]
               if x["inserts"] or x["hits"] + x["loaded"] != expected_hits]
        if bad:
            raise RuntimeError(f"a restart's steps did not find every id in the checkpoint: "
                               f"{bad[0]['inserts']} inserts, {bad[0]['hits']} hits + "
                               f"{bad[0]['loaded']} loaded of {expected_hits}")
        for mode, suffix in (("cold", ""), ("warm", "_warm")):
            _record(p, f"first_step{suffix}_s_{label}", [x["steps_s"][0] for x in recs[mode]])
            _record(p, f"restore{suffix}_s_{label}", [x["restore_s"] for x in recs[mode]])
            _record(p, f"prepare{suffix}_s_{label}", [x["prepare_s"] for x in recs[mode]])
            later = [s for x in recs[mode] for s in x["steps_s"][1:]]
            if later:
                _record(p, f"later_steps{suffix}_s_{label}", later)
        shares = [x["resident_share_after"] for x in recs["cold"]
                  if x["resident_share_after"] is not None]
        if shares:
            p.metrics[f"share_read_{label}"] = statistics.median(shares)
        p.info.update(job_wall_s=round(r["wall_s"], 1), warmup_s=round(res["warmup_s"], 2),
                      records=res["records"], torch_threads=res["torch_threads"],
                      dynembed_threads=res["dynembed_threads"])
        m = p.metrics
        p.log(f"{n:,} rows: cold restore {m[f'restore_s_{label}']:.3f}s, first step "
              f"{m[f'first_step_s_{label}']:.3f}s (later steps "
              f"{m.get(f'later_steps_s_{label}', float('nan')):.3f}s); warm restore "
              f"{m[f'restore_warm_s_{label}']:.3f}s, first step "
              f"{m[f'first_step_warm_s_{label}']:.3f}s")
    finally:
        for f in _files(folder):  # do not leave the big file's pages behind either
            try:
                _evict(f)
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def run_system(p: Phase) -> None:
    """Runs the phase named ``p.name`` (in the child process)."""
    import dynembed as de

    def stop(signum, frame):  # a running job is killed on the way out (see launch)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    p.cfg["_deadline"] = time.monotonic() + p.cfg["phase_timeout"] - 20
    p.record_dynembed(de)
    if p.name == "throughput":
        phase_throughput(p)
    elif p.name == "recovery":
        phase_recovery(p)
    elif p.name.startswith("first_step_"):
        phase_first_step(p, int(p.name[len("first_step_"):]))
    else:
        raise ValueError(f"unknown phase {p.name!r}")


# ============================================================================================
# Parent: configuration, orchestration, report
# ============================================================================================


def build_config(args) -> dict:
    base = run_sizes(args, FULL, QUICK, {"repeats": "repeats", "sizes": "sizes",
                                         "rounds": "rounds", "recovery_runs": "recovery_runs",
                                         "restarts": "restarts"})
    for key in ("rounds", "recovery_runs", "restarts"):
        if base[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1")
    if len(base["sizes"]) < 2:
        raise SystemExit("--sizes needs at least two sizes (the ratio compares them)")
    return {
        "quick": bool(args.quick),
        "seed": int(args.seed),
        "repeats": int(base["repeats"]),
        "segment_steps": int(base["segment_steps"]),
        "warmup_steps": int(base["warmup_steps"]),
        "rounds": int(base["rounds"]),
        "batch": 4096,
        "dim": 32,
        "history": 8,
        "samples": 1 << 20,
        "user_ids": 10_000_000,
        "item_ids": 1_000_000,
        "recovery_runs": int(base["recovery_runs"]),
        "recovery_every": 10,
        "recovery_kill_step": 15,
        "recovery_steps": 20,
        "sizes": [int(x) for x in base["sizes"]],
        "restarts": int(base["restarts"]),
        "timed_steps": 3,
        "first_step_dim": 16,
        "collective_timeout": 120,
        "job_timeout": float(args.job_timeout),
        "phase_timeout": float(args.phase_timeout or (600 if args.quick else 1800)),
        "monitor_interval_s": MONITOR_INTERVAL,
        "launches": {k: {"processes": n, "env": env} for k, (n, env) in LAUNCHES.items()},
        "cores": os.cpu_count(),
        "throughput": "CTR model (EmbeddingCollection: sharded Adagrad tables user and item, "
                      "dim 32; features user, item, mean-pooled bag of 8 history items = 10 "
                      "keys/sample; MLP 96-64-1, Adam, DDP) on de.train.Runtime without "
                      "checkpoints; global batch 4096 via rt.batch_indices over a 2**20-sample "
                      "memory-mapped Zipf(1.1) click log (10M user ids, 1M item ids); "
                      "warmup_steps untimed, then `repeats` segments of segment_steps steps "
                      "(barrier at each boundary); launches 1proc (direct), 2proc (torchrun), "
                      "2proc_1thread (torchrun + NUMBA_NUM_THREADS=1) rotated over `rounds` "
                      "rounds; medians over all segments",
        "traffic": "2proc runs: rt.plan.traffic sent bytes summed over ranks / timed steps "
                   "(row exchange only: requests, rows, gradients; not DDP); unique keys = "
                   "distinct keys per table per global batch, summed over tables; rank unique "
                   "= the same per rank part, summed over ranks",
        "recovery": "2 ranks, --max-restarts=1, checkpoint every 10 steps, rank 1 SIGKILLs "
                    "itself after step 15 (marker file: once), job of 20 steps; recovery_s = "
                    "time.time() when rank 0 of attempt 1 completes its first step - kill "
                    "time; split from rank 0's timestamps",
        "first_step": "per size N: 1-process checkpoint step-100 of a model with one sharded "
                      "SGD table (dim 16) + Linear, rows file written by the rows-file writer "
                      "in 1M-row chunks; one 2-rank torchrun job: warm-up on a tiny model, "
                      "then `restarts` warm restarts (file in page cache) and `restarts` cold "
                      "ones (rank 0 evicts the checkpoint first): new model + rt.prepare + "
                      "rt.restore (lazy) + timed_steps steps of 4096 distinct random "
                      "existing ids; slowest rank's seconds; medians",
    }


def compute_ratios(metrics: dict, cfg: dict) -> tuple[dict, dict]:
    ratio = functools.partial(ratio_of, metrics)
    small, large = _label(min(cfg["sizes"])), _label(max(cfg["sizes"]))
    ratios = {
        "throughput_2_vs_1": ratio("samples_per_s_2proc", "samples_per_s_1proc"),
        "throughput_2_1thread_vs_1": ratio("samples_per_s_2proc_1thread",
                                           "samples_per_s_1proc"),
        f"first_step_{large}_vs_{small}": ratio(f"first_step_s_{large}",
                                                f"first_step_s_{small}"),
        f"first_step_warm_{large}_vs_{small}": ratio(f"first_step_warm_s_{large}",
                                                     f"first_step_warm_s_{small}"),
        f"restore_{large}_vs_{small}": ratio(f"restore_s_{large}", f"restore_s_{small}"),
        "bytes_per_unique_key": metrics.get("bytes_per_unique_key"),
    }
    name = f"first_step_{large}_vs_{small}"
    targets = {name: evaluate_target("<=", FIRST_STEP_TARGET, ratios[name])}
    return ratios, targets


def _secs(x) -> str:
    return f"{x:.3f} s" if isinstance(x, (int, float)) else "-"


def _ms(x) -> str:
    return f"{1000 * x:.1f} ms" if isinstance(x, (int, float)) else "-"


def _num(x, div: float, fmt: str, unit: str = "") -> str:
    return f"{x / div:{fmt}}{unit}" if isinstance(x, (int, float)) else "-"


def render(report: dict) -> str:
    m, cfg, sp = report["metrics"], report["config"], report["config"].get("spread", {})
    W = 96
    L: list[str] = []

    def row(label, key, fmt):
        L.append(metric_row(label, fmt(m.get(key)), sp.get(key), 58))

    mach = report["machine"]
    L.extend(report_header(
        report,
        f"dynembed distributed benchmark   batch={cfg['batch']}  {cfg['cores']} cores, all "
        "ranks on this machine" + ("  [quick]" if cfg["quick"] else ""),
        f"dynembed kernel threads {mach.get('dynembed_num_threads', '-')}", W))
    L.append("-" * W)
    L.append(f"1) Training throughput: CTR model, 2 sharded Adagrad tables (dim {cfg['dim']}), "
             f"10 keys/sample; median of {cfg['repeats']} x {cfg['rounds']} segments of "
             f"{cfg['segment_steps']} steps")
    for name, what in (("1proc", "1 process (direct, no torchrun)"),
                       ("2proc", "2 processes (torchrun)"),
                       ("2proc_1thread", "2 processes, 1 thread each (NUMBA_NUM_THREADS=1)")):
        row(f"{what}, samples/s", f"samples_per_s_{name}", fmt_rate)
        L.append(f"      keys/s {fmt_rate(m.get(f'keys_per_s_{name}')).strip()}, "
                 f"{_ms(m.get(f'step_s_{name}'))}/step, of which rt.batch_indices "
                 f"{_ms(m.get(f'batch_indices_s_per_step_{name}'))}")
    L.append("2) Row exchange per step (2 processes; DDP's dense all-reduce not counted)")
    payload = f"payload {_payload_bytes(cfg['dim'])} B"
    for label, text in (
            ("bytes exchanged per step (sum over ranks)",
             _num(m.get("bytes_per_step"), 2**20, ".2f", " MiB")),
            ("key occurrences / distinct keys / distinct per rank, sum",
             " / ".join(_num(m.get(k), 1, ",.0f") for k in (
                 "keys_per_step", "unique_keys_per_step", "rank_unique_keys_per_step"))),
            (f"bytes per distinct key / per remote key ({payload})",
             " / ".join(_num(m.get(k), 1, ".0f") for k in (
                 "bytes_per_unique_key", "bytes_per_remote_key"))),
            ("payload collectives per step", _num(m.get("exchanges_per_step"), 1, ".0f"))):
        L.append(f"  {label:<58s} {text:>12s}")
    L.append(f"3) Recovery after SIGKILL of rank 1 (2 ranks, checkpoint every "
             f"{cfg['recovery_every']} steps), median of {cfg['recovery_runs']}")
    row("recovery_s: kill -> first step of the restarted job", "recovery_s", _secs)
    for k, what in (("restart", "torchrun: detect, stop, rendezvous, spawn"),
                    ("startup", "startup"), ("imports", "  imports (torch, dynembed)"),
                    ("process_group", "  process group (rt.start)"),
                    ("prepare", "model + shard + DDP"), ("build", "  model built"),
                    ("shard", "  rt.prepare: shard_model + DDP"),
                    ("restore", "rt.restore (lazy)"), ("first_step", "first step")):
        row(f"  ... {what}", f"recovery_{k}_s", _secs)
    L.append(f"4) First step after a restart vs table size: 2 ranks, SGD dim "
             f"{cfg['first_step_dim']}, {cfg['batch']:,} random existing ids, median of "
             f"{cfg['restarts']}")
    L.append(f"  {'rows':>12s} {'MiB':>8s} {'restore':>9s} {'1st step':>9s} {'later':>9s} "
             f"{'read':>7s} {'restore':>9s} {'1st step':>9s}")
    L.append(f"  {'':>12s} {'':>8s} {'cold':>9s} {'cold':>9s} {'cold':>9s} {'':>7s} "
             f"{'warm':>9s} {'warm':>9s}")
    for n in cfg["sizes"]:
        lb = _label(n)
        nb = m.get(f"checkpoint_bytes_{lb}")
        share = m.get(f"share_read_{lb}")
        L.append(f"  {n:>12,} {nb / 2**20 if nb else float('nan'):>8,.0f} "
                 f"{_secs(m.get(f'restore_s_{lb}')):>9s} "
                 f"{_secs(m.get(f'first_step_s_{lb}')):>9s} "
                 f"{_secs(m.get(f'later_steps_s_{lb}')):>9s} "
                 f"{(f'{100 * share:.1f}%' if share is not None else '-'):>7s} "
                 f"{_secs(m.get(f'restore_warm_s_{lb}')):>9s} "
                 f"{_secs(m.get(f'first_step_warm_s_{lb}')):>9s}")
    L.append("-" * W)
    L.extend(targets_table(report, [n for n in report["ratios"] if n not in report["targets"]],
                           "(informational)"))
    L.extend(report_footer(report, W))
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short run (sizes 1M,3M; 1 round, 1 recovery run, 3 restarts)")
    ap.add_argument("--json", "--out", dest="json", metavar="PATH",
                    help="write results as JSON to PATH")
    ap.add_argument("--sizes", type=_counts, metavar="N,N",
                    help="checkpoint rows for the first-step test (default 1M,10M; quick "
                         "1M,3M)")
    ap.add_argument("--repeats", type=int, help="timed segments per throughput run (>= 5)")
    ap.add_argument("--rounds", type=int, help="throughput rounds (default 3, quick 1)")
    ap.add_argument("--recovery-runs", type=int, help="kill-and-restart runs (default 5, "
                                                      "quick 1)")
    ap.add_argument("--restarts", type=int,
                    help="restarts per mode and size in the first-step test (default 5, "
                         "quick 3)")
    ap.add_argument("--job-timeout", type=float, default=300.0,
                    help="seconds one training job may run before it is killed with its "
                         "processes (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of: {','.join(PHASES)}")
    add_harness_args(ap, timeout_s=1800, quick_timeout_s=600)
    args = ap.parse_args(argv)
    if args._phase:
        return run_phase(args._phase, Path(args._workdir), run_system)
    phases = parse_phases(ap, args.phases, PHASES)
    cfg = build_config(args)
    record_run_options(cfg, phases, args)
    cfg["loadavg_start"] = loadavg()
    t_start = time.perf_counter()
    check_quiet_at_start(cfg, args.wait_quiet)
    run = [x for ph in phases
           for x in ([f"first_step_{n}" for n in cfg["sizes"]] if ph == "first_step"
                     else [ph])]
    eprint(f"distributed benchmark on {os.cpu_count()} cores: throughput (1 and 2 processes), "
           f"recovery ({cfg['recovery_runs']} runs), first step at "
           f"{', '.join(f'{n:,}' for n in cfg['sizes'])} rows")
    results = run_phases(MODULE, cfg, {}, run, prefix="dynembed-dist-",
                         timeout=cfg["phase_timeout"],
                         wait_quiet_s=args.wait_quiet, retries=args.retries, scratch=True)
    ratios, targets = compute_ratios(results.metrics, cfg)
    report = build_report(MODULE, argv, cfg, results, t_start, ratios, targets)
    write_report(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
