"""The training runtime under real torchrun (gloo on loopback): what a restart resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dynembed.train.launch import TORCHRUN_ENV

WORKER = str(Path(__file__).with_name("rng_worker.py"))
TIMEOUT = 240


def _run(nproc: int, *args: str) -> None:
    """The worker on ``nproc`` ranks under torchrun (alone for 1), checked to succeed."""
    if nproc == 1:
        cmd = [sys.executable, WORKER]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc-per-node={nproc}", "--max-restarts=0", "--rdzv-backend=c10d",
               "--rdzv-endpoint=localhost:0", "--monitor-interval=0.2", WORKER]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT,
                            env=dict(os.environ, **TORCHRUN_ENV), check=False)
    assert result.returncode == 0, (f"exit {result.returncode}\nstdout:\n"
                                    f"{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}")


def _draws(out: Path, rank: int) -> dict[int, list]:
    """step -> what rank ``rank`` drew in it (the last attempt's, for a step run twice)."""
    lines = (out / f"draws-r{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r["drawn"] for r in map(json.loads, lines)}


def test_each_rank_resumes_its_own_random_stream(tmp_path):
    """Two ranks stopped at step 3 and restarted draw at steps 3..5 what a job that never
    stopped draws (each rank its own numbers); the checkpoint once held no generator state,
    and each restarted rank drew its step-0 numbers again. At another world size the
    streams cannot continue: the job resumes with the script's seeding."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(2, "--ckpt", str(whole / "ckpt"), "--out", str(whole), "--steps", "6")
    _run(2, "--ckpt", str(resumed / "ckpt"), "--out", str(resumed), "--steps", "3")
    _run(2, "--ckpt", str(resumed / "ckpt"), "--out", str(resumed), "--steps", "6")
    for rank in (0, 1):
        assert sorted(_draws(resumed, rank)) == list(range(6))
        assert _draws(resumed, rank) == _draws(whole, rank)
    assert _draws(whole, 0)[3] != _draws(whole, 1)[3]  # the ranks' streams differ
    _run(1, "--ckpt", str(resumed / "ckpt"), "--out", str(resumed), "--steps", "8")
    assert sorted(_draws(resumed, 0)) == list(range(8))  # 2 -> 1 rank: resumed at step 6
