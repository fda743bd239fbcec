"""The process's global random generators, saved with a checkpoint and given back at a
resume, so that dropout and other draws from them go on as in a run that never stopped."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def rng_state() -> dict:
    """This process's global random generators (torch, CUDA once used, numpy, Python) as
    plain tensors and numbers, so a checkpoint holds them and loads with weights_only."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(cached)},
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                        "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Puts back what :func:`rng_state` took."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def gather_rng_states(group, rank: int, world_size: int) -> list | None:
    """Every rank's random generators, on rank 0 (which writes a checkpoint's ``extra``);
    else None. A collective over ``group`` (None: one process, no collective)."""
    state = rng_state()
    if group is None:
        return [state]
    states = [None] * world_size if rank == 0 else None
    dist.gather_object(state, states, dst=0, group=group)
    return states


def restore_rank_rng(states: list | None, rank: int, world_size: int) -> None:
    """Gives this rank the random generators it had at the restored step, so dropout
    masks, sampled negatives, ... continue as in a run that never stopped (a restarted
    script seeds them as at step 0, and drew step 0's numbers again). At another world
    size the ranks' streams cannot continue: the script's own seeding stays.

    Args:
        states: every rank's generators saved with the checkpoint (None or empty: it was
            written without them).
        rank, world_size: this process's place in the job.
    """
    if not states:
        return
    if len(states) != world_size:
        logger.info("rank %d: random generators left as seeded: the checkpoint holds "
                    "those of %d ranks, this job has %d", rank, len(states), world_size)
        return
    set_rng_state(states[rank])
