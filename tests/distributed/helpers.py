"""Running the test worker alone, under torchrun, or through `dynembed train` (with timeouts);
running a function on spawned gloo ranks."""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynembed.train.launch import TORCHRUN_ENV

WORKER = str(Path(__file__).with_name("train_worker.py"))
TIMEOUT = 240


def run_alone(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def run_torchrun(nproc: int, *args: str, max_restarts: int = 0, log_dir: Path | None = None,
                 cli: bool = False) -> subprocess.CompletedProcess:
    """Runs the worker on ``nproc`` local ranks with c10d rendezvous on a free port."""
    if cli:
        cmd = [sys.executable, "-m", "dynembed", "train", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", "--no-progress"]
        if log_dir is not None:
            cmd.append(f"--log-dir={log_dir}")
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
               "--monitor-interval=0.2"]
        if log_dir is not None:
            cmd += [f"--log-dir={log_dir}", "--redirects=3"]
    return subprocess.run([*cmd, WORKER, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=dict(os.environ, **TORCHRUN_ENV), check=False)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}"
                                    f"\nstderr:\n{result.stderr[-6000:]}")


def rows_union(files: list[Path], table: str) -> dict[int, np.ndarray]:
    """id -> concatenated (weights, optimizer state) over the ranks' dumps of a table."""
    out: dict[int, np.ndarray] = {}
    for file in files:
        rows = torch.load(file, weights_only=True)["rows"][table]
        values = torch.cat([rows["weights"], rows["state"]], dim=1).numpy()
        for i, key in enumerate(rows["ids"].tolist()):
            assert key not in out or table == "country", f"id {key} on two ranks"
            out[key] = values[i]
    return out


def assert_same_rows(a: dict[int, np.ndarray], b: dict[int, np.ndarray], *, exact: bool,
                     atol: float = 2e-5) -> None:
    assert set(a) == set(b), f"{len(set(a) ^ set(b))} ids differ ({len(a)} vs {len(b)})"
    keys = sorted(a)
    left = np.stack([a[k] for k in keys])
    right = np.stack([b[k] for k in keys])
    if exact:
        np.testing.assert_array_equal(left, right)
    else:
        np.testing.assert_allclose(left, right, rtol=1e-4, atol=atol)


def _rank_main(rank: int, body, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result, error = body(rank), None
    except BaseException:  # noqa: BLE001 - reported to the test
        result, error = None, traceback.format_exc()
    with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump((result, error), f)
    dist.destroy_process_group()


def run_ranks(body, folder: Path, world: int = 2) -> list:
    """``body(rank)`` on ``world`` spawned processes joined in a gloo group (``body`` must
    be a module-level function); the results by rank. Fails with a rank's traceback."""
    mp.start_processes(_rank_main, args=(body, world, str(folder)), nprocs=world, join=True,
                       start_method="spawn")
    results = []
    for rank in range(world):
        with open(folder / f"rank{rank}.pkl", "rb") as f:
            result, error = pickle.load(f)
        assert error is None, error
        results.append(result)
    return results
