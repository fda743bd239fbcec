"""What every rank of a job must have alike, checked together: one shared checkpoint
directory, and the settings that decide which collectives each rank runs.

Each check ends in an all-reduce, so every rank raises or none does: a rank that raised
alone left the others waiting in their next collective until its timeout.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import numpy as np

from dynembed.distributed.exchange import Exchange
from dynembed.errors import CheckpointError, ConfigMismatchError

logger = logging.getLogger(__name__)

SHARED_WAIT_S = 30.0
"""How long a rank looks for rank 0's probe, or a committed checkpoint, in
``checkpoint_dir`` before calling the directory not shared (a network file system may show
a new file late; the wait is spent only when the file does not come)."""


def check_writable(directory: Path, rank: int) -> None:
    """Refuses a checkpoint directory this process cannot write, before any training (it
    was found at the first save, and under torchrun every restart trained again first).

    Raises:
        PermissionError: a probe file cannot be made in ``directory`` (named).
    """
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{os.getpid()}-{rank}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"checkpoint_dir {directory}: cannot write there ({e.strerror});"
                              " give a directory this user may write") from None


def listed(directory: Path, *names: str, wait_s: float) -> Path | None:
    """The first of ``names`` listed in ``directory``, now or within ``wait_s`` seconds; None
    if none is. Listing, not ``exists()``: an NFS client keeps the "not found" of a name
    asked for before another node made it for its attribute-cache time (a save asks for
    the checkpoint's name before it commits), while opening the directory reads it anew."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            entries = set(os.listdir(directory))
        except FileNotFoundError:
            entries = set()
        for name in names:
            if name in entries:
                return directory / name
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _ranks_missing(control: Exchange | None, rank: int, world_size: int,
                   missing: bool) -> list[int]:
    """The ranks for which ``missing`` is true, the same list on every rank."""
    flags = np.zeros(world_size, dtype=np.int64)
    flags[rank] = missing
    if control is not None:
        flags = control.all_reduce_max(flags)
    return np.flatnonzero(flags).tolist()


def check_shared_directory(control: Exchange | None, directory: Path, rank: int,
                           world_size: int) -> None:
    """Refuses a ``checkpoint_dir`` the ranks do not all share, before any training.

    Each rank writes its part of a checkpoint there and the last one commits it, so with a
    directory per node (a node-local disk) no checkpoint was ever committed: training
    ended well, and every restart began again at step 0. Rank 0 writes a probe file and
    every rank looks for it. Nothing to check in a process alone.

    Raises:
        ValueError: some rank does not see the probe (the ranks are named), on every rank.
    """
    if control is None:
        return
    token = 0  # stays 0 where rank 0 could not write it: every rank raises
    if rank == 0:
        drawn = secrets.randbits(62) + 1
        try:
            (directory / f".shared-probe-{drawn:x}").write_bytes(b"")
            token = drawn
        except OSError as e:
            logger.error("rank 0: cannot write a probe in %s: %s", directory, e)
    token = int(control.all_reduce_max(np.array([token]))[0])
    probe = f".shared-probe-{token:x}"
    blind = _ranks_missing(control, rank, world_size,
                           token == 0 or listed(directory, probe, wait_s=SHARED_WAIT_S) is None)
    if rank == 0:
        (directory / probe).unlink(missing_ok=True)
    if blind:
        raise ValueError(
            f"checkpoint_dir {directory} is not shared by every rank: rank(s) {blind} do not "
            "see the file rank 0 wrote there. Every rank writes its part of each checkpoint "
            "into checkpoint_dir and the last one commits it; give all ranks one directory "
            "on shared storage (a network file system, a ReadWriteMany volume)")


def check_committed(control: Exchange | None, path: Path, step: int, rank: int,
                    world_size: int) -> Path:
    """The committed checkpoint ``path`` (or its ``-full`` twin) once every rank sees it.

    Raises:
        CheckpointError: on every rank, when some rank does not see it.
    """
    committed = listed(path.parent, path.name, path.name + "-full", wait_s=SHARED_WAIT_S)
    blind = _ranks_missing(control, rank, world_size, committed is None)
    if blind:
        raise CheckpointError(
            f"rank(s) {blind} do not see the checkpoint of step {step} committed in "
            f"{path.parent} after every rank wrote its part; checkpoint_dir must be one "
            "directory every rank shares, and nothing else may write there")
    return committed


def check_same_on_every_rank(control: Exchange | None, **values: int | None) -> None:
    """Raises ConfigMismatchError on every rank unless each value is the same on every
    rank: with different ``every_steps`` or ``total``, one rank waited in a checkpoint or
    a step the others never joined, and failed at the timeout naming neither."""
    if control is None:
        return
    mine = np.array([-1 if v is None else v for v in values.values()], dtype=np.int64)
    high = control.all_reduce_max(np.concatenate([mine, -mine]))
    shown = {-1: None}  # the encoding of None
    differ = [f"{name} (from {shown.get(-low, -low)} to {shown.get(top, top)})"
              for name, top, low in zip(values, high[:len(mine)], high[len(mine):])
              if top != -low]
    if differ:
        raise ConfigMismatchError(f"the ranks were given different {', '.join(differ)}; "
                                  "give every rank the same values")
