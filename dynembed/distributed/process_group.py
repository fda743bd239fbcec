"""The job a process belongs to: torchrun's environment, and the process group's start.

torchrun (torch.distributed.elastic) starts each worker with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` and ``TORCHELASTIC_RESTART_COUNT`` set. A
process started without them is a job of one.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEnv:
    """This process's place in its job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0
    """How many times torchrun restarted the workers (failures and membership changes)."""
    launched: bool = False
    """Started by torchrun (or another launcher that sets ``RANK`` and ``WORLD_SIZE``)."""

    @classmethod
    def from_environ(cls, environ=None) -> JobEnv:
        """Reads the launcher's variables (``os.environ`` by default).

        Raises:
            ValueError: a variable is set but not a valid number, or only one of ``RANK``
                and ``WORLD_SIZE`` is set.
        """
        env = os.environ if environ is None else environ
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        if "RANK" not in env or "WORLD_SIZE" not in env:  # each process would train alone
            given, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
            raise ValueError(f"environment variable {given} is set but {missing} is not; a "
                             "launcher sets both (start workers with torchrun or dynembed "
                             f"train), or unset {given} to run one process")
        values = {}
        for key, name in (("RANK", "rank"), ("WORLD_SIZE", "world_size"),
                          ("LOCAL_RANK", "local_rank"),
                          ("TORCHELASTIC_RESTART_COUNT", "restart_count")):
            raw = env.get(key, "0")
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {key} must be an integer, got "
                                 f"{raw!r}; start workers with torchrun") from None
        if values["world_size"] < 1 or not 0 <= values["rank"] < values["world_size"]:
            raise ValueError(f"RANK={values['rank']} and WORLD_SIZE={values['world_size']} "
                             "do not describe a job (need 0 <= RANK < WORLD_SIZE)")
        for key, name in (("LOCAL_RANK", "local_rank"),
                          ("TORCHELASTIC_RESTART_COUNT", "restart_count")):
            if values[name] < 0:  # a negative local rank would pick a device from the end
                raise ValueError(f"environment variable {key} must be >= 0, got "
                                 f"{values[name]}; start workers with torchrun")
        return cls(launched=True, **values)


def init_process_group(env: JobEnv, *, backend: str | None = None,
                       timeout: float = 300.0) -> bool:
    """Starts the default process group for a launched job of more than one process.

    Args:
        env: the job (see :meth:`JobEnv.from_environ`).
        backend: "gloo" or "nccl"; None picks gloo (tables live on the CPU).
        timeout: seconds any collective may wait for other ranks before raising, so a dead
            or mismatched peer fails the job instead of hanging it.

    Returns:
        True if it started a group (False for a job of one, or if one was already started).
    """
    if env.world_size == 1 or dist.is_initialized():
        return False
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        logger.warning(
            "torchrun shares its rendezvous store with the workers; after a restart they may "
            "read the old workers' addresses and fail to connect (pytorch/pytorch#135712). "
            "Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (dynembed "
            "train does).")
    dist.init_process_group(backend=backend or "gloo", rank=env.rank,
                            world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    return True
