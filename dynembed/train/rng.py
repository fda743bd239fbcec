"""The process's global random generators, saved with a checkpoint and given back at a
resume, so that dropout and other draws from them go on as in a run that never stopped."""

from __future__ import annotations

import random

import numpy as np
import torch


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
