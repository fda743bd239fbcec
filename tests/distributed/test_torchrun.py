"""Real torchrun jobs on loopback (gloo, CPU): equivalence, failures, elasticity, mismatches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dynembed.checkpoint.manager import CheckpointManager
from dynembed.testing.redis_server import free_port
from dynembed.train.launch import TORCHRUN_ENV
from dynembed.train.progress import read_progress
from tests.distributed.helpers import (
    WORKER,
    assert_same_rows,
    check,
    rows_union,
    run_alone,
    run_torchrun,
)


def _final(out, world_size):
    return sorted(out.glob(f"final-w{world_size}-r*.pt"))


def test_two_ranks_train_like_one_process(tmp_path):
    """Same data, seeds and global batch: 2 ranks (through `dynembed train`) give the rows,
    the dense weights and the losses of 1 process."""
    check(run_alone("--out", str(tmp_path / "one"), "--steps", "12"))
    check(run_torchrun(2, "--out", str(tmp_path / "two"), "--steps", "12", cli=True,
                       log_dir=tmp_path / "logs"))
    one, two = tmp_path / "one", tmp_path / "two"
    for table in ("ids", "country", "bag"):
        assert_same_rows(rows_union(_final(one, 1), table),
                         rows_union(_final(two, 2), table), exact=False)
    # the replicated table is the same on both ranks, bit for bit
    r0 = torch.load(_final(two, 2)[0], weights_only=True)["rows"]["country"]
    assert_same_rows(rows_union([_final(two, 2)[0]], "country"),
                     rows_union([_final(two, 2)[1]], "country"), exact=True)
    assert r0["ids"].shape[0] == 8
    # the sharded table holds every id exactly once, each on its owner
    ids0, ids1 = (set(torch.load(f, weights_only=True)["rows"]["ids"]["ids"].tolist())
                  for f in _final(two, 2))
    assert ids0 and ids1 and not ids0 & ids1
    dense1 = torch.load(_final(one, 1)[0], weights_only=True)["dense"]
    for f in _final(two, 2):
        dense2 = torch.load(f, weights_only=True)["dense"]
        for name in dense1:
            torch.testing.assert_close(dense1[name], dense2[name], rtol=1e-4, atol=2e-5)
    loss1 = [json.loads(line)["loss"] for line in (one / "loss.jsonl").read_text().splitlines()]
    loss2 = [json.loads(line)["loss"] for line in (two / "loss.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loss1, loss2, rtol=1e-4)
    progress = json.loads((tmp_path / "logs" / "progress.json").read_text())
    assert progress["state"] == "done" and progress["step"] == 12
    assert progress["world_size"] == 2


def test_sigkill_of_a_worker_restarts_and_completes(tmp_path):
    """Rank 1 is SIGKILLed at step 13; torchrun restarts the group, which resumes from the
    checkpoint of step 10 (at most one interval lost) and finishes all 30 steps."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    result = run_torchrun(2, "--out", str(out), "--ckpt", str(ckpt), "--steps", "30",
                          "--every", "5", "--kill-rank", "1", "--kill-step", "13",
                          max_restarts=2, log_dir=tmp_path / "logs")
    check(result)
    assert (out / "killed").read_text() == "13"
    restored = {f.name: torch.load(f, weights_only=True)["step"]
                for f in out.glob("restored-*.pt")}
    assert restored["restored-w2-r0-a0.pt"] == 0
    assert restored["restored-w2-r0-a1.pt"] == restored["restored-w2-r1-a1.pt"] == 10
    assert 13 - restored["restored-w2-r1-a1.pt"] <= 5
    for f in _final(out, 2):
        assert torch.load(f, weights_only=True)["step"] == 30
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()
              if line]
    assert losses[-1]["step"] == 30 and losses[-1]["attempt"] == 1
    by_step = {r["step"]: r["loss"] for r in losses}  # the restarted attempt's, at the end
    assert sorted(by_step) == list(range(1, 31))
    first, last = np.mean([by_step[s] for s in range(1, 6)]), \
        np.mean([by_step[s] for s in range(26, 31)])
    assert last < first - 0.02, (first, last)
    # nothing corrupt on disk: no partial directory, and the newest checkpoint loads
    assert not list(ckpt.glob("*.partial"))
    manager = CheckpointManager(ckpt)
    assert manager.latest().name.startswith("step-0000000030")


def test_world_size_2_3_1_keeps_every_vector(tmp_path):
    """A job restarted with 3 ranks, then 1, takes its buckets from the latest checkpoint:
    each key's vector and optimizer state right after the change equal those before."""
    ckpt = tmp_path / "ckpt"
    common = ["--ckpt", str(ckpt), "--every", "5"]
    check(run_torchrun(2, "--out", str(tmp_path / "a"), "--steps", "10", *common))
    check(run_torchrun(3, "--out", str(tmp_path / "b"), "--steps", "20", *common))
    check(run_alone("--out", str(tmp_path / "c"), "--steps", "30", *common))
    for before, after, w_before, w_after in (("a", "b", 2, 3), ("b", "c", 3, 1)):
        restored = sorted((tmp_path / after).glob(f"restored-w{w_after}-r*-a0.pt"))
        assert len(restored) == w_after
        for f in restored:
            assert torch.load(f, weights_only=True)["step"] == (10 if after == "b" else 20)
        for table in ("ids", "country", "bag"):
            want = rows_union(_final(tmp_path / before, w_before), table)
            got = rows_union(restored, table)
            assert len(want) > (100 if table == "ids" else 7)
            assert_same_rows(want, got, exact=True)
    assert torch.load(_final(tmp_path / "c", 1)[0], weights_only=True)["step"] == 30


def test_mismatched_tables_fail_fast_on_every_rank(tmp_path):
    """Rank 1 builds its table with dim 9: both ranks stop with the same clear error well
    before the collective timeout, instead of hanging."""
    started = time.monotonic()
    result = run_torchrun(2, "--out", str(tmp_path / "out"), "--dim-on-rank-1", "9",
                          "--timeout", "120", log_dir=tmp_path / "logs")
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 100, elapsed
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert sorted(logs) == ["0", "1"], logs.keys()
    for text in logs.values():
        assert "ConfigMismatchError" in text
        assert "table 'embeddings.tables.ids': dim is 8 on rank 0 but 9 on rank 1" in text


def test_an_unexpected_restore_error_on_one_rank_stops_every_rank_at_once(tmp_path):
    """Rank 1's restore hits an I/O error (not a damaged checkpoint): rank 1 raises it,
    rank 0 raises a CheckpointError naming rank 1, both well before the collective timeout,
    and the checkpoint is not set aside (it is not damaged)."""
    ckpt = tmp_path / "ckpt"
    check(run_torchrun(2, "--out", str(tmp_path / "a"), "--ckpt", str(ckpt), "--steps", "5",
                       "--every", "5"))
    started = time.monotonic()
    result = run_torchrun(2, "--out", str(tmp_path / "b"), "--ckpt", str(ckpt), "--steps",
                          "10", "--fail-restore-rank", "1", "--timeout", "120",
                          log_dir=tmp_path / "logs")
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 100, elapsed
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert sorted(logs) == ["0", "1"], logs.keys()
    assert "OSError: [Errno 5] injected I/O error reading the checkpoint" in logs["1"]
    assert "CheckpointError: restoring" in logs["0"]
    assert "failed on rank 1" in logs["0"]
    assert not list((tmp_path / "b").glob("restored-*.pt"))  # no rank went on to train
    assert [p.name for p in ckpt.iterdir()] == ["step-0000000005"]


def _wait_for_step(progress_file, step: int) -> dict:
    """The job's progress once it reached ``step`` (fails after 120 s)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = read_progress(progress_file)
        if progress is not None and progress["step"] >= step:
            return progress
        time.sleep(0.1)
    raise AssertionError("the job made no progress")


def _train_cli(out, ckpt, logs, step_sleep: str) -> list[str]:
    """`dynembed train` of the worker on 2 ranks for 400 steps, checkpointing only at a stop."""
    return [sys.executable, "-m", "dynembed", "train", "--nproc-per-node=2", "--no-progress",
            f"--log-dir={logs}", WORKER, "--out", str(out), "--ckpt", str(ckpt),
            "--steps", "400", "--every", "1000", "--step-sleep", step_sleep]


def _torchrun_of(launcher: subprocess.Popen) -> int:
    """The pid of the torchrun a `dynembed train` started (its session's leader)."""
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
        return int(f.read().split()[0])


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "ctrl-c twice", "every process"])
def test_sigterm_checkpoints_the_current_step_and_resume_loses_nothing(tmp_path, how):
    """`dynembed train` passes SIGTERM to torchrun, which passes it to the workers: they
    agree on a step boundary, checkpoint it and stop; the next run resumes at that step.
    A Ctrl-C (SIGINT to the terminal's whole process group) does the same: it once reached
    the workers directly, and they died before checkpointing. So did a second Ctrl-C, and
    SIGTERM to every process of the job at once (systemd, SLURM): a worker took the second
    SIGTERM (its own and torchrun's) for "stop now"."""
    out, ckpt, logs = tmp_path / "out", tmp_path / "ckpt", tmp_path / "logs"
    twice = how in ("ctrl-c twice", "every process")  # the second signal lands mid-step
    first_step = 2 if twice else 5
    cmd = _train_cli(out, ckpt, logs, "1.0" if twice else "0.05")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a terminal's process group of its own
    try:
        _wait_for_step(logs / "progress.json", first_step)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif how == "every process":
            torchrun = _torchrun_of(proc)  # the leader of the workers' group
            proc.send_signal(signal.SIGTERM)
            os.killpg(torchrun, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
            if how == "ctrl-c twice":
                time.sleep(0.1)
                os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + (signal.SIGINT if "ctrl-c" in how else signal.SIGTERM)
    assert "asking the workers to stop (SIGTERM)" in err
    progress = read_progress(logs / "progress.json")
    assert progress["state"] == "preempted"
    stopped = progress["step"]
    assert first_step <= stopped < 400
    saved = CheckpointManager(ckpt).latest()
    assert saved is not None and saved.name == f"step-{stopped:010d}"
    assert not list(ckpt.glob("*.partial"))
    assert not list(out.glob("final-*.pt"))  # preempted: the script stopped after the save
    check(run_torchrun(2, "--out", str(out), "--ckpt", str(ckpt), "--steps",
                       str(stopped + 3), "--every", "1000"))
    restored = [torch.load(f, weights_only=True)["step"]
                for f in out.glob("restored-w2-r*-a0.pt")]
    assert restored == [stopped, stopped]


def test_a_save_longer_than_the_collective_timeout_does_not_fail_the_job(tmp_path):
    """Rank 0 compacts a chain alone while the others wait after the save: the wait took
    the collective timeout (300 s), and a compaction longer than that failed the job (one
    restart per compaction)."""
    result = run_torchrun(2, "--out", str(tmp_path / "out"), "--ckpt", str(tmp_path / "c"),
                          "--steps", "6", "--every", "3", "--timeout", "2",
                          "--slow-save", "4")
    check(result)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "step-0000000003", "step-0000000006"]


def test_a_launcher_killed_outright_stops_the_job_with_a_checkpoint(tmp_path):
    """torchrun runs in a session of its own: a `dynembed train` killed with SIGKILL (or by
    the OOM killer) left torchrun and its workers running, and the same command run again
    raced them for the checkpoints."""
    out, ckpt, logs = tmp_path / "out", tmp_path / "ckpt", tmp_path / "logs"
    proc = subprocess.Popen(_train_cli(out, ckpt, logs, "0.05"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    torchrun = None
    try:
        _wait_for_step(logs / "progress.json", 5)
        torchrun = _torchrun_of(proc)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and os.path.exists(f"/proc/{torchrun}"):
            time.sleep(0.2)
        assert not os.path.exists(f"/proc/{torchrun}"), "the job outlived its launcher"
    finally:
        if torchrun is not None and os.path.exists(f"/proc/{torchrun}"):
            os.killpg(torchrun, signal.SIGKILL)
    assert read_progress(logs / "progress.json")["state"] == "preempted"
    saved = CheckpointManager(ckpt).latest()
    assert saved is not None and not list(ckpt.glob("*.partial"))


def test_a_node_joining_scales_the_job_up_without_losing_a_step(tmp_path):
    """Two torchrun agents (two 'nodes' on loopback) with --nnodes=1:2: the first trains
    alone; when the second joins, torchrun stops the workers (SIGTERM: they checkpoint),
    and the group of 2 resumes at that very step and finishes the job."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2",
           "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           "--rdzv-id=scale-up", "--rdzv-conf=last_call_timeout=1", "--max-restarts=3",
           "--monitor-interval=0.2", WORKER, "--out", str(out), "--ckpt", str(ckpt),
           "--steps", "150", "--every", "1000", "--step-sleep", "0.05"]
    env = dict(os.environ, **TORCHRUN_ENV, DYNEMBED_PROGRESS_FILE=str(tmp_path / "p.json"))
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    second = None
    try:
        assert _wait_for_step(tmp_path / "p.json", 5)["world_size"] == 1
        second = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        for proc in (first, second):
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-4000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert torch.load(out / "restored-w1-r0-a0.pt", weights_only=True)["step"] == 0
    resumed = [torch.load(out / f"restored-w2-r{r}-a0.pt", weights_only=True)["step"]
               for r in (0, 1)]
    assert resumed[0] == resumed[1] >= 5
    for f in _final(out, 2):
        assert torch.load(f, weights_only=True)["step"] == 150
    steps = [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))  # every step ran once: nothing lost, nothing redone
