"""The training script of :mod:`benchmarks.distributed`: run alone or as a rank of torchrun.

    python -m benchmarks.distributed_worker --mode throughput --data DIR --out DIR ...
    python -m torch.distributed.run --nproc-per-node=2 ... -m benchmarks.distributed_worker \\
        --mode recovery --data DIR --out DIR --ckpt DIR --every 10 --kill-rank 1 --kill-step 15

Modes (see :mod:`benchmarks.distributed` for what is measured and why):

- ``throughput``: the CTR model (two sharded Adagrad tables, dim 32: ``user`` and ``item``;
  features user id, item id and a mean-pooled bag of ``--history`` item ids; an MLP) trained
  with :class:`dynembed.train.Runtime` on the memory-mapped synthetic click log in
  ``--data``; ``--warmup-steps`` untimed steps, then ``--segments`` timed segments of
  ``--segment-steps`` steps (every rank meets at a barrier at each segment boundary). Rank 0
  writes ``throughput.json``: seconds per segment, the row-exchange traffic of the timed
  steps summed over the ranks, the distinct keys per global step, and the seconds spent in
  ``rt.batch_indices`` (the data position).
- ``recovery``: the same model and data, checkpoints every ``--every`` steps; rank
  ``--kill-rank`` writes ``time.time()`` to ``killed.json`` and SIGKILLs itself once after
  step ``--kill-step`` (the file is the marker that keeps the restarted attempt alive).
  Every rank of every attempt writes ``attempt-<a>-rank-<r>.json``: wall-clock times of the
  process start (before ``import torch``), the runtime started (process group up), the
  model prepared, the checkpoint restored and the first step completed.
- ``first_step``: a model with one sharded SGD table ``big`` (dim 16) and a linear layer;
  the benchmark wrote a checkpoint of ``--rows`` rows (the ids of :mod:`benchmarks.checkpoint`'s synthetic checkpoints) into
  ``--ckpt``. After a warm-up of every code path on a tiny model (a sharded training step,
  a save and a lazy restore of it, a step on the restored rows: numba kernels loaded, gloo
  connections made), it restarts ``--restarts`` times per mode, warm (checkpoint in the
  page cache) then cold (rank 0 evicts every checkpoint file from the page cache first): a
  new model, ``rt.prepare``, ``rt.restore`` (lazy) and ``--timed-steps`` training steps of
  ``--batch`` distinct random existing ids (new ones every restart). Rank 0 writes
  ``first_step.json`` with the slowest rank's seconds of each.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: a restarted process's start

import argparse
import gc
import itertools
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import dynembed as de
from benchmarks.checkpoint import _evict, _resident_share, _synthetic_ids
from dynembed.train.data import global_batch, rank_part

T_IMPORTED = time.time()

CTR_TABLES = ("user", "item")
FIRST_STEP_TABLE = "embeddings.tables.big"
"""The name of the first-step model's table in its checkpoints."""
RESTORED_STEP = 100
"""The step of the synthetic checkpoint the first-step test restores."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class CTRModel(nn.Module):
    """user id, item id and a mean-pooled bag of history item ids -> concatenated -> MLP."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        self.embeddings = de.EmbeddingCollection(
            tables={"user": de.TableConfig(dim=dim, optimizer=de.optim.Adagrad(lr=0.05),
                                           seed=seed),
                    "item": de.TableConfig(dim=dim, optimizer=de.optim.Adagrad(lr=0.05),
                                           seed=seed + 1)},
            features={"user": "user", "item": "item",
                      "history": de.FeatureConfig(table="item", pooling="mean")})
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.embeddings({"user": torch.from_numpy(batch["user"]),
                             "item": torch.from_numpy(batch["item"]),
                             "history": torch.from_numpy(batch["history"])}, concat=True)
        return self.mlp(x).squeeze(1)


class BigModel(nn.Module):
    """One sharded SGD table (one id per sample) and a linear layer."""

    def __init__(self, dim: int, seed: int = 1) -> None:
        super().__init__()
        self.embeddings = de.EmbeddingCollection(
            tables={"big": de.TableConfig(dim=dim, optimizer=de.optim.SGD(lr=0.1), seed=seed)},
            features={"item": "big"})
        self.dense = nn.Linear(dim, 1)

    def forward(self, ids: np.ndarray) -> torch.Tensor:
        return self.dense(self.embeddings({"item": torch.from_numpy(ids)}, concat=True)
                          ).squeeze(1)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def load_data(folder: str) -> dict[str, np.ndarray]:
    """The click log the benchmark wrote (``.npy`` files, memory-mapped)."""
    return {k: np.load(Path(folder) / f"{k}.npy", mmap_mode="r")
            for k in ("user", "item", "history", "label")}


def batch_of(data: dict, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[idx]) for k, v in data.items()}


def all_max(rt, values) -> np.ndarray:
    """Element-wise maximum over the ranks (float64)."""
    t = torch.tensor(np.asarray(values, dtype=np.float64))
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.numpy()


def all_sum(rt, values) -> np.ndarray:
    """Element-wise sum over the ranks (int64)."""
    t = torch.tensor(np.asarray(values, dtype=np.int64))
    if rt.distributed:
        dist.all_reduce(t)
    return t.numpy()


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def threads() -> dict:
    return {"torch_threads": torch.get_num_threads(),
            "dynembed_threads": de.get_num_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}


def train_step(net, opt, batch: dict, loss_fn) -> float:
    loss = loss_fn(net(batch), torch.from_numpy(batch["label"]))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def run_throughput(args) -> None:
    data = load_data(args.data)
    n = data["label"].shape[0]
    loss_fn = nn.BCEWithLogitsLoss()
    torch.manual_seed(args.seed)
    total = args.warmup_steps + args.segments * args.segment_steps
    bounds = [args.warmup_steps + k * args.segment_steps for k in range(args.segments + 1)]
    marks: list[float] = []
    data_s = 0.0
    with de.train.Runtime(None, timeout=args.timeout) as rt:
        model = CTRModel(args.dim, args.seed)
        net = rt.prepare(model)
        opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
        rt.restore(opt)
        for step in rt.steps(total):
            if step in bounds:
                rt.barrier()
                marks.append(time.perf_counter())
                if step == bounds[0]:
                    data_s = 0.0
                    if rt.plan is not None:
                        rt.plan.traffic.reset()
            t = time.perf_counter()
            batch = batch_of(data, rt.batch_indices(step, args.batch, n, seed=args.seed))
            data_s += time.perf_counter() - t
            rt.log(loss=train_step(net, opt, batch, loss_fn))
        rt.barrier()
        marks.append(time.perf_counter())
        traffic = rt.plan.traffic if rt.plan is not None else None
        sums = all_sum(rt, [traffic.sent if traffic else 0, traffic.received if traffic else 0,
                            traffic.exchanges if traffic else 0,
                            *(model.embeddings.tables[t].size() for t in CTR_TABLES)])
        data_max = float(all_max(rt, [data_s])[0])
        if rt.rank != 0:
            return
        # distinct keys per global step (what the owners look up) and per rank part (what
        # the ranks route: a key in both ranks' parts travels twice)
        unique, rank_unique = [], []
        for step in range(bounds[0], bounds[-1]):
            idx = global_batch(step, args.batch, n, seed=args.seed)
            g, r = 0, 0
            for part in [idx, *(rank_part(idx, k, rt.world_size) for k in range(rt.world_size))]:
                b = batch_of(data, part)
                count = (np.unique(b["user"]).shape[0]
                         + np.unique(np.concatenate([b["item"], b["history"].ravel()])).shape[0])
                if part is idx:
                    g = count
                else:
                    r += count
            unique.append(g)
            rank_unique.append(r)
        segments = [b - a for a, b in itertools.pairwise(marks)]
        write_json(Path(args.out) / "throughput.json", {
            "world_size": rt.world_size, "segments_s": segments,
            "segment_steps": args.segment_steps, "batch": args.batch,
            "keys_per_sample": 2 + data["history"].shape[1],
            "timed_steps": bounds[-1] - bounds[0],
            "bytes_sent": int(sums[0]), "bytes_received": int(sums[1]),
            "exchanges": int(sums[2]),
            "rows": {t: int(x) for t, x in zip(CTR_TABLES, sums[3:])},
            "unique_keys_per_step": float(np.mean(unique)),
            "rank_unique_keys_per_step": float(np.mean(rank_unique)),
            "data_s": data_max, **threads()})


def run_recovery(args) -> None:
    data = load_data(args.data)
    n = data["label"].shape[0]
    loss_fn = nn.BCEWithLogitsLoss()
    out = Path(args.out)
    marker = out / "killed.json"
    torch.manual_seed(args.seed)
    times = {"main": T_START, "imported": T_IMPORTED, "data": time.time()}
    with de.train.Runtime(args.ckpt, every_steps=args.every, timeout=args.timeout) as rt:
        times["started"] = time.time()
        model = CTRModel(args.dim, args.seed)
        times["built"] = time.time()
        net = rt.prepare(model)
        opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
        times["prepared"] = time.time()
        rt.restore(opt)
        times["restored"] = time.time()
        restored_step = rt.step
        for step in rt.steps(args.steps):
            batch = batch_of(data, rt.batch_indices(step, args.batch, n, seed=args.seed))
            rt.log(loss=train_step(net, opt, batch, loss_fn))
            if "first_step" not in times:
                times["first_step"] = time.time()
            if rt.rank == args.kill_rank and step + 1 == args.kill_step and not marker.exists():
                write_json(marker, {"time": time.time(), "step": step + 1})
                os.kill(os.getpid(), signal.SIGKILL)
        times["end"] = time.time()
        write_json(out / f"attempt-{rt.env.restart_count}-rank-{rt.rank}.json", {
            "attempt": rt.env.restart_count, "rank": rt.rank, "world_size": rt.world_size,
            "restored_step": restored_step, "final_step": rt.step, "times": times,
            **threads()})


def _first_step_warmup(rt, args, scratch: Path) -> None:
    """Every timed code path once on a tiny model: a sharded training step that inserts,
    a save at this world size, a lazy restore into a new sharded model and a step on the
    restored rows (numba kernels compiled or loaded from their cache, gloo connections)."""
    rng = np.random.default_rng([args.seed, 99, rt.rank])
    warm = BigModel(args.dim)
    if rt.distributed:
        de.distributed.shard_model(warm, timeout=args.timeout)
    opt = torch.optim.SGD(warm.dense.parameters(), lr=0.01)
    ids = rng.integers(0, 1 << 62, 4096 // rt.world_size)
    for _ in range(2):
        loss = warm(ids).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "warmup-ckpt"
    de.checkpoint.save(path, warm, opt, {"step": 0}, rank=rt.rank, world_size=rt.world_size)
    rt.barrier()
    again = BigModel(args.dim)
    if rt.distributed:
        de.distributed.shard_model(again, timeout=args.timeout)
    opt = torch.optim.SGD(again.dense.parameters(), lr=0.01)
    de.checkpoint.load(path, again, opt, lazy=True, rank=rt.rank, world_size=rt.world_size)
    loss = again(ids).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    rt.barrier()


def run_first_step(args) -> None:
    out = Path(args.out)
    ckpt = Path(args.ckpt)
    scratch = Path(args.scratch) / "warmup"  # the same on every rank
    records = []
    with de.train.Runtime(args.ckpt, timeout=args.timeout) as rt:
        t = time.perf_counter()
        _first_step_warmup(rt, args, scratch)
        warmup_s = time.perf_counter() - t
        restart = 0
        for mode in ("warm", "cold"):
            for _ in range(args.restarts):
                restart += 1
                rt.barrier()
                t0 = time.perf_counter()
                model = BigModel(args.dim)
                net = rt.prepare(model)  # the runtime lets go of the previous model here
                opt = torch.optim.SGD(model.dense.parameters(), lr=0.01)
                prepare_s = time.perf_counter() - t0
                gc.collect()  # the previous restart's mappings of the checkpoint closed
                rt.barrier()
                before = None
                if mode == "cold" and rt.rank == 0:  # mapped pages could not be evicted
                    _evict(ckpt)
                    before = _resident_share(ckpt)
                rt.barrier()
                t1 = time.perf_counter()
                rt.restore(opt)
                t2 = time.perf_counter()
                rt.barrier()  # the steps are timed from a common start
                if rt.step != RESTORED_STEP:
                    raise RuntimeError(f"restored step {rt.step}, expected {RESTORED_STEP}")
                rng = np.random.default_rng([args.seed, restart])
                steps = []
                for i, _step in enumerate(rt.steps(RESTORED_STEP + args.timed_steps)):
                    positions = rng.choice(args.rows, min(args.rows, args.batch), replace=False)
                    ids = _synthetic_ids(rank_part(positions, rt.rank, rt.world_size),
                                        args.rows)
                    s = time.perf_counter()
                    loss = net(ids).square().mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    steps.append(time.perf_counter() - s)
                    if i + 1 == args.timed_steps:
                        break  # leaves the generator: no final checkpoint
                table = model.embeddings.tables["big"]
                totals = table.stats().totals
                mx = all_max(rt, [prepare_s, t2 - t1, *steps])
                sums = all_sum(rt, [totals.inserts, totals.hits, totals.loaded,
                                    table.size()])
                rt.barrier()
                share = _resident_share(ckpt) if rt.rank == 0 and mode == "cold" else None
                records.append({
                    "mode": mode, "prepare_s": float(mx[0]), "restore_s": float(mx[1]),
                    "steps_s": [float(x) for x in mx[2:]],
                    "restore_s_rank": t2 - t1, "steps_s_rank": steps,
                    "inserts": int(sums[0]), "hits": int(sums[1]), "loaded": int(sums[2]),
                    "rows_in_memory": int(sums[3]), "resident_share_before": before,
                    "resident_share_after": share})
                del net, model, opt, table, loss  # the graph holds the table too
        if rt.rank == 0:
            write_json(out / "first_step.json", {
                "world_size": rt.world_size, "rows": args.rows, "batch": args.batch,
                "warmup_s": warmup_s, "records": records, **threads()})
        rt.barrier()
        if rt.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)


def _exit_with_parent() -> None:
    """Exits when the launcher (torchrun, or the benchmark) is gone: torchrun starts each
    worker in a session of its own, so a launcher killed outright would leave it running."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed_worker",
                                description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("throughput", "recovery", "first_step"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data")
    p.add_argument("--ckpt")
    p.add_argument("--scratch", default=None)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="global batch (samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--segments", type=int, default=5)
    p.add_argument("--segment-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--kill-step", type=int, default=15)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--timed-steps", type=int, default=3)
    args = p.parse_args(argv)
    _exit_with_parent()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"throughput": run_throughput, "recovery": run_recovery,
     "first_step": run_first_step}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
