"""The training runtime inside a process group its caller started (spawned gloo ranks)."""

from __future__ import annotations

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
