"""Serving benchmark: dynembed's server against TorchServe 0.12 on the same CTR model.

Run from the repository root::

    python -m benchmarks.serving                  # full run (~10 min; installs TorchServe once)
    python -m benchmarks.serving --quick          # small tables, short loads (~3 min)
    python -m benchmarks.serving --json bench-results/serving.json

The model (``benchmarks/serving_peer/ctr_model.py``): five dynamic string features (user,
item, category, tags mean-pooled, hour), dim 16 each, into an MLP 80 -> 64 -> 32 -> 1 with a
sigmoid; 1M users and 100k items (10k / 1k with ``--quick``); requests are single examples
as JSON objects, Zipf keys, 1% of users and items unseen.

- **dynembed**: the collection and MLP exported with ``de.serving.export_package`` and
  served by ``dynembed serve`` (a child process): tables opened lazily and read-only from
  the package's checkpoint, the MLP as a torch.export program.
- **TorchServe 0.12** (the peer, in its own venv, see ``serving_peer/torchserve_peer.py``):
  the same MLP (TorchScript) over the same rows held as Python dicts key -> row of a tensor,
  with a handler doing the same work (parse, look up, pool, MLP, sigmoid). Token
  authorization and per-request logs are off, as for dynembed.

Both first answer the same 256 requests, checked against the reference scores. Each server
gets the best of a small sweep (``--sweep``: batch size / max delay / processes, measured at
concurrency 64), torch on one thread. "Processes" is dynembed's ``--processes`` (event
loops answering the port; the tables are read into memory at registration, ``--preload``,
as the peer holds its rows in Python dicts) and TorchServe's backend workers (its Java
frontend already uses every core for HTTP). Then for each concurrency of ``--concurrency``
(1, 8, 64) the two servers take ``--duration`` seconds of closed-loop load each
(``benchmarks.loadgen``:
wrk with a Lua script if installed, else a Python client in its own process), alternating
which goes first, ``--repeats`` times; the report has medians of requests/s and of p50/p99
latency. Target: ``throughput_vs_torchserve_c64`` >= 2 with ``p99_vs_torchserve_c64`` <= 1.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks._common import REPO_ROOT, eprint, git_commit, machine_info, write_report
from benchmarks.loadgen import run_load
from benchmarks.serving_peer import ctr_model
from benchmarks.serving_peer.torchserve_peer import (
    build_archive,
    ensure_torchserve,
    start_torchserve,
)

MODULE = "benchmarks.serving"
SWEEP = ((8, 2, 1), (32, 2, 1), (64, 2, 1), (32, 2, 2), (64, 2, 2))
"""(batch size, max batch delay ms, processes) tried by each server."""


class DynembedServer:
    """``dynembed serve`` in a child process on free loopback ports."""

    def __init__(self, store: Path, *, batch_size: int, max_batch_delay_ms: int,
                 processes: int = 1, workers: int = 1) -> None:
        cmd = [sys.executable, "-m", "dynembed", "serve", "--model-store", str(store),
               "--models", "ctr=ctr-1.0", "--inference-address", "127.0.0.1:0",
               "--management-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
               "--key-file", str(store.parent / "key_file.json"), "--workers", str(workers),
               "--batch-size", str(batch_size), "--max-batch-delay", str(max_batch_delay_ms),
               "--preload", "--processes", str(processes)]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        self.urls: dict[str, str] = {}
        self._lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("dynembed serve exited:\n" + "".join(self._lines[-30:]))
            if len(self.urls) == 3:
                try:
                    ready = httpx.get(self.urls["inference"] + "/v2/models/ctr/ready")
                    if ready.status_code == 200:
                        self.predict_url = self.urls["inference"] + "/predictions/ctr"
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("dynembed serve did not start")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._lines.append(line)
            match = re.match(r"(\w+) API on (http://\S+)", line)
            if match:
                self.urls[match.group(1)] = match.group(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _check_answers(url: str, requests: list[dict], want: np.ndarray, name: str) -> None:
    with httpx.Client(timeout=60) as client:
        got = [client.post(url, json=r).json() for r in requests]
    got = np.array([g[0] if isinstance(g, list) else g for g in got], dtype=np.float64)
    worst = float(np.max(np.abs(got - want)))
    if worst > 1e-5:
        raise RuntimeError(f"{name} answers differ from the reference by up to {worst}")
    eprint(f"  {name}: {len(requests)} answers match the reference (max diff {worst:.1e})")


def _load(url: str, bodies, concurrency: int, args) -> dict:
    return run_load(url, bodies, concurrency, args.duration, args.warmup)


def _sweep(start, bodies, args, name: str) -> tuple[tuple[int, int, int], dict]:
    """The (batch size, delay, processes) setting with the most requests/s at concurrency
    64."""
    best = None
    for batch_size, delay, processes in args.sweep:
        with contextlib.closing(start(batch_size, delay, processes)) as server:
            r = run_load(server.predict_url, bodies, 64, args.sweep_duration, args.warmup)
        eprint(f"  {name} batch {batch_size} / {delay} ms / {processes} processes: "
               f"{r['requests_per_s']:,.0f} req/s, p99 {r['p99_ms']:.1f} ms, "
               f"errors {r['errors']}")
        if r["errors"] == 0 and (best is None or r["requests_per_s"] > best[1]["requests_per_s"]):
            best = ((batch_size, delay, processes), r)
    if best is None:
        raise RuntimeError(f"{name}: every batching setting had errors")
    return best


def _parse_sweep(text: str) -> list[tuple[int, int, int]]:
    settings = []
    for part in text.split(","):
        size, delay, *processes = part.split("/")
        settings.append((int(size), int(delay), int(processes[0]) if processes else 1))
    return settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small tables, short loads")
    ap.add_argument("--json", "--out", dest="json", metavar="PATH", help="write JSON here")
    ap.add_argument("--concurrency", default="1,8,64", help="comma-separated (default 1,8,64)")
    ap.add_argument("--duration", type=float, help="seconds of load per run (default 10, quick 4)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each run")
    ap.add_argument("--repeats", type=int, help="runs per server and concurrency (default 3, "
                                                "quick 1)")
    ap.add_argument("--sweep", type=_parse_sweep,
                    default=list(SWEEP), help="batch/delay_ms/processes settings tried "
                                              "(default 8/2/1,32/2/1,64/2/1,32/2/2,64/2/2)")
    ap.add_argument("--sweep-duration", type=float, default=None,
                    help="seconds per sweep run (default 5, quick 3)")
    ap.add_argument("--torchserve-venv", help="TorchServe venv (default ~/.cache/dynembed/...)")
    args = ap.parse_args(argv)
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.sweep_duration = args.sweep_duration or (3.0 if args.quick else 5.0)
    levels = [int(c) for c in args.concurrency.split(",")]
    workload = (ctr_model.Workload(n_users=10_000, n_items=1_000) if args.quick
                else ctr_model.Workload())
    t_start = time.perf_counter()
    env = ensure_torchserve(args.torchserve_venv)
    requests = ctr_model.make_requests(20_000, seed=1, workload=workload)
    bodies = ctr_model.request_bodies(requests)
    with tempfile.TemporaryDirectory(prefix="dynembed-serving-") as tmp:
        tmp = Path(tmp)
        eprint(f"serving benchmark: {workload.n_users:,} users, {workload.n_items:,} items")
        from dynembed.serving import export_package
        store = tmp / "dynembed-store"
        store.mkdir()
        export_package(store / "ctr-1.0", embeddings=ctr_model.dynembed_collection(workload),
                       dense=ctr_model.make_dense(workload), name="ctr", version="1.0",
                       output="sigmoid")
        mar = build_archive(tmp / "ts-store", env, workload=workload)
        tables = ctr_model.PeerTables.load(_artifacts(tmp, workload))
        check = requests[:256]
        want = np.asarray(ctr_model.reference_scores(check, tables, ctr_model.make_dense(
            workload)), dtype=np.float64).ravel()

        def start_dynembed(batch_size, delay, processes):
            server = DynembedServer(store, batch_size=batch_size, max_batch_delay_ms=delay,
                                    processes=processes)
            server.close = server.stop
            return server

        def start_peer(batch_size, delay, workers):
            server = start_torchserve(mar, env, batch_size=batch_size,
                                      max_batch_delay_ms=delay, workers=workers)
            server.close = server.stop
            return server

        eprint("batching sweep at concurrency 64:")
        ours_cfg, _ = _sweep(start_dynembed, bodies, args, "dynembed")
        peer_cfg, _ = _sweep(start_peer, bodies, args, "torchserve")
        results = {"dynembed": {c: [] for c in levels}, "torchserve": {c: [] for c in levels}}
        ours = start_dynembed(*ours_cfg)
        peer = start_peer(*peer_cfg)
        try:
            _check_answers(ours.predict_url, check, want, "dynembed")
            _check_answers(peer.predict_url, check, want, "torchserve")
            for repeat in range(args.repeats):
                for c in levels:
                    order = [("dynembed", ours), ("torchserve", peer)]
                    if repeat % 2:
                        order.reverse()
                    for name, server in order:
                        r = _load(server.predict_url, bodies, c, args)
                        results[name][c].append(r)
                        eprint(f"  {name:<10s} c={c:<3d} {r['requests_per_s']:>9,.0f} req/s  "
                               f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                               f"errors {r['errors']}")
        finally:
            ours.stop()
            peer.stop()
    report = _report(argv, args, workload, levels, results, ours_cfg, peer_cfg, env, t_start)
    write_report(report, _render(report), args.json)
    return 0


def _artifacts(tmp: Path, workload) -> Path:
    folder = tmp / "reference"
    if not folder.exists():
        ctr_model.write_artifacts(folder, workload)
    return folder


def _report(argv, args, workload, levels, results, ours_cfg, peer_cfg, env, t_start) -> dict:
    metrics, errors = {}, {}
    for name, by_level in results.items():
        for c, runs in by_level.items():
            metrics[f"{name}_rps_c{c}"] = statistics.median(r["requests_per_s"] for r in runs)
            metrics[f"{name}_p50_ms_c{c}"] = statistics.median(r["p50_ms"] for r in runs)
            metrics[f"{name}_p99_ms_c{c}"] = statistics.median(r["p99_ms"] for r in runs)
            errors[f"{name}_c{c}"] = sum(r["errors"] for r in runs)
    ratios = {}
    for c in levels:
        ratios[f"throughput_vs_torchserve_c{c}"] = (metrics[f"dynembed_rps_c{c}"]
                                                    / metrics[f"torchserve_rps_c{c}"])
        ratios[f"p99_vs_torchserve_c{c}"] = (metrics[f"dynembed_p99_ms_c{c}"]
                                             / metrics[f"torchserve_p99_ms_c{c}"])
    targets = {}
    if 64 in levels:
        # answers with errors count in requests/s: a cell with errors decides nothing
        clean = not errors.get("dynembed_c64") and not errors.get("torchserve_c64")
        targets["throughput_vs_torchserve_c64"] = {
            "target": ">= 2", "value": ratios["throughput_vs_torchserve_c64"],
            "met": clean and ratios["throughput_vs_torchserve_c64"] >= 2}
        targets["p99_vs_torchserve_c64"] = {
            "target": "<= 1", "value": ratios["p99_vs_torchserve_c64"],
            "met": clean and ratios["p99_vs_torchserve_c64"] <= 1}
        if not clean:
            for entry in targets.values():
                entry["note"] = "not met: requests failed at concurrency 64 (see errors)"
    commit, dirty = git_commit(REPO_ROOT)
    engine = next(iter(results["dynembed"].values()))[0].get("engine")
    return {"benchmark": MODULE, "metrics": metrics, "ratios": ratios, "targets": targets,
            "errors": errors, "machine": machine_info(), "commit": commit,
            "command": " ".join(["python", "-m", MODULE, *(argv or sys.argv[1:])]),
            "config": {"quick": args.quick, "duration_s": args.duration,
                       "warmup_s": args.warmup, "repeats": args.repeats,
                       "concurrency": levels, "load_engine": engine,
                       "dynembed_batching": {"batch_size": ours_cfg[0],
                                             "max_batch_delay_ms": ours_cfg[1],
                                             "processes": ours_cfg[2]},
                       "torchserve_batching": {"batch_size": peer_cfg[0],
                                               "max_batch_delay_ms": peer_cfg[1],
                                               "workers": peer_cfg[2]},
                       "sweep": args.sweep, "model_workers": 1,
                       "workload": {"users": workload.n_users, "items": workload.n_items},
                       "torchserve": env.versions, "git_dirty": dirty,
                       "wall_s": round(time.perf_counter() - t_start, 1),
                       "samples": {name: {str(c): [round(r["requests_per_s"]) for r in runs]
                                          for c, runs in by_level.items()}
                                   for name, by_level in results.items()}}}


def _render(report: dict) -> str:
    m, lines = report["metrics"], []
    cfg = report["config"]
    lines.append(f"serving benchmark ({'quick' if cfg['quick'] else 'full'}), load: "
                 f"{cfg['load_engine']}, {cfg['repeats']} x {cfg['duration_s']:.0f} s per cell")
    lines.append(f"  batching: dynembed {cfg['dynembed_batching']}, torchserve "
                 f"{cfg['torchserve_batching']}")
    lines.append(f"  {'concurrency':>11s} {'dynembed req/s':>15s} {'p50':>7s} {'p99':>7s}   "
                 f"{'torchserve req/s':>16s} {'p50':>7s} {'p99':>7s}   ratio")
    for c in cfg["concurrency"]:
        lines.append(
            f"  {c:>11d} {m[f'dynembed_rps_c{c}']:>15,.0f} {m[f'dynembed_p50_ms_c{c}']:>7.2f} "
            f"{m[f'dynembed_p99_ms_c{c}']:>7.2f}   {m[f'torchserve_rps_c{c}']:>16,.0f} "
            f"{m[f'torchserve_p50_ms_c{c}']:>7.2f} {m[f'torchserve_p99_ms_c{c}']:>7.2f}   "
            f"{report['ratios'][f'throughput_vs_torchserve_c{c}']:.2f}x")
    for name, t in report["targets"].items():
        lines.append(f"  target {name} {t['target']}: {t['value']:.2f} "
                     f"({'met' if t['met'] else 'NOT met'})")
    if any(report["errors"].values()):
        lines.append(f"  errors: {report['errors']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
