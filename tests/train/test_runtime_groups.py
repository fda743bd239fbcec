"""The training runtime inside a process group its caller started (spawned gloo ranks)."""

from __future__ import annotations

import functools
import os

from dynembed.train.runtime import Runtime
from tests.distributed.helpers import run_ranks


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _runtimes_one_after_another(rank: int) -> tuple[int, int]:
    """Open files after one runtime, and after five more, in the caller's process group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # as a launcher sets them
    counts = []
    for cycle in range(6):
        with Runtime(None, timeout=60) as rt:
            assert rt.distributed and not rt._owns_group
            rt.barrier()
        if cycle in (0, 5):
            counts.append(_open_files())
    return counts[0], counts[1]


def test_runtimes_in_the_callers_process_group_leave_no_groups_behind(tmp_path):
    """close() ended only a default group it had started itself: in one the caller started,
    every runtime left its two gloo groups (sockets to every rank, threads) open, so a
    process running one job after another ran out of file descriptors."""
    for first, last in run_ranks(_runtimes_one_after_another, tmp_path):
        # five more runtimes each left ten here; a file or two more is not a group
        assert last - first < 5, (first, last)


def _peer_sigterm_and_unshared_dir(rank: int, folder: str) -> dict:
    """Runtimes refused for what differs by rank (a directory of its own, every_steps,
    total), then one in which rank 0 alone gets SIGTERM at step 2."""
    import signal

    import torch

    from dynembed.errors import CheckpointError, ConfigMismatchError
    from dynembed.train import rank_checks, runtime
    from tests.train.test_runtime import Tiny, _train

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", TORCHELASTIC_RUN_ID="test")
    rank_checks.SHARED_WAIT_S = 0.5  # how long a missing file is waited for
    out = {}
    try:
        Runtime(f"{folder}/own-{rank}", timeout=60).start()
    except ValueError as e:
        out["unshared"] = str(e)
    probe = rank_checks.check_shared_directory
    rank_checks.check_shared_directory = lambda *args: None  # the save's own check, then
    try:
        with Runtime(f"{folder}/own-{rank}", timeout=60) as rt:
            rt.prepare(Tiny())
            rt.restore()
            rt.checkpoint()
    except CheckpointError as e:
        out["uncommitted"] = str(e)
    finally:
        rank_checks.check_shared_directory = probe
    try:
        Runtime(f"{folder}/every", every_steps=10 + rank, timeout=60).start()
    except ConfigMismatchError as e:
        out["every"] = str(e)
    with Runtime(f"{folder}/total", timeout=60) as rt:
        rt.prepare(Tiny())
        rt.restore()
        try:
            next(iter(rt.steps(5 + rank)))
        except ConfigMismatchError as e:
            out["total"] = str(e)
    rt = Runtime(f"{folder}/shared", every_steps=100, timeout=60).start()
    try:
        model = Tiny()
        net = rt.prepare(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rt.restore(opt)
        try:
            _train(rt, net, opt, 50, on_step=lambda s: rank == 0 and s == 2
                   and os.kill(os.getpid(), signal.SIGTERM))
            out["exit"] = None
        except SystemExit as e:
            out["exit"] = e.code
        out.update(step=rt.step, preempted=rt.preempted, peer_code=runtime.PEER_PREEMPTED_EXIT)
    finally:
        rt.close()
    return out


def test_what_differs_by_rank_is_refused_and_a_sigterm_to_one_rank_restarts_the_rest(tmp_path):
    """Under torchrun's elastic agent, a rank stopped by another's SIGTERM exited 0: its
    agent took the job for done, and a scaled-down job ended as a success part way through.
    A checkpoint_dir per node committed no checkpoint at all, silently, and ranks given
    different every_steps or totals failed at the collective timeout, naming neither."""
    results = run_ranks(functools.partial(_peer_sigterm_and_unshared_dir, folder=str(tmp_path)),
                        tmp_path)
    for rank, out in enumerate(results):
        assert "is not shared by every rank: rank(s) [1] do not see" in out["unshared"]
        assert "rank(s) [0, 1] do not see the checkpoint of step 0 committed" \
            in out["uncommitted"]
        assert "different every_steps (from 10 to 11" in out["every"]
        assert "different total (from 5 to 6" in out["total"]
        assert out["step"] == 3 and out["preempted"]
        assert out["exit"] == (None if rank == 0 else out["peer_code"])
    assert (tmp_path / "shared" / "step-0000000003").is_dir()  # committed
    assert not list((tmp_path / "own-0").glob(".shared-probe-*"))
