"""The launcher's environment as a worker reads it: variables checked and named before the
process group starts, and the machine's cores shared between the ranks it runs."""

from __future__ import annotations

import os

import torch

from dynembed.distributed.process_group import JobEnv
from dynembed.kernels._threads import get_num_threads, set_num_threads


def env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    """The integer in environment variable ``name`` (``default`` when unset or empty).

    Raises:
        ValueError: the variable is not an integer in ``[low, high]`` (named: ``int()``'s
            own message did not say which variable was wrong).
    """
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"environment variable {name} must be an integer {bound}, got "
                         f"{raw!r}; start workers with torchrun (or dynembed train), which "
                         "sets it")
    return value


def check_rendezvous_env() -> None:
    """Refuses a missing or malformed ``MASTER_ADDR``/``MASTER_PORT`` before the process
    group starts: torch named a missing one, but took ``MASTER_PORT=abc`` with a bare
    ``invalid literal for int()``.

    Raises:
        ValueError: a variable is missing or malformed (named, with the fix).
    """
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name, "").strip():
            raise ValueError(f"environment variable {name} is not set, but RANK and "
                             "WORLD_SIZE say this process is one of several: start workers "
                             "with torchrun (or dynembed train), which sets MASTER_ADDR and "
                             "MASTER_PORT, or set both to the address of rank 0")
    env_int("MASTER_PORT", 0, 1, 65535)


def share_cores(env: JobEnv) -> None:
    """Ranks on one machine split its cores between their compiled kernels (as torchrun sets
    OMP_NUM_THREADS=1 for torch), unless DYNEMBED_NUM_THREADS says otherwise."""
    local = env_int("LOCAL_WORLD_SIZE", 1, 1)
    if env.launched and local > 1 and "DYNEMBED_NUM_THREADS" not in os.environ:
        threads = max(1, min(get_num_threads(), (os.cpu_count() or 1) // local))
        set_num_threads(threads)
        torch.set_num_threads(min(torch.get_num_threads(), threads))
