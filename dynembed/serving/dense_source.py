"""Where a package's dense weights live in the training model, so a server that follows
the training job's checkpoints serves each checkpoint's dense layers with its tables.

Tables and dense layers are trained together: the tables of step 9,000 under the dense
layers of step 1,000 (the package's) are a model nobody trained. At export the package
records, for each entry of the dense part's ``state_dict()``, its name in the training
model's (found by identity: ``serving_parts()`` may wrap the model's layers in a new
module). A followed checkpoint's ``dense.pt`` holds the model's ``state_dict()``, from
which :func:`dense_state_from_checkpoint` takes the dense program's weights, and
:class:`DenseCopies` gives the copies of the program they are served in.
"""

from __future__ import annotations

import collections
import copy
import os
import warnings
import weakref

import torch
from torch import nn

from dynembed.checkpoint.api import read_dense_model
from dynembed.errors import CheckpointError
from dynembed.nn._base import without_tables

FIELD = "state_from_model"
"""The manifest's ``dense`` field: dense state name -> the training model's state name."""


def dense_state_names(dense: nn.Module, model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """Names each entry of ``dense.state_dict()`` by its name in ``model.state_dict()``.

    Args:
        dense: the dense part being exported.
        model: the whole trained model ``dense`` is (made of) a part of.

    Returns:
        ``(names, unmatched)``: dense name -> model name for the entries that are the
        model's own tensors, and the dense names that are not (built for serving: they
        stay as exported).
    """
    with without_tables():  # the names only: not a copy of every table's rows
        model_state = model.state_dict(keep_vars=True)
    dense_state = dense.state_dict(keep_vars=True)  # both kept alive: ids stay unique
    owners = {}
    for name, tensor in model_state.items():
        owners.setdefault(id(tensor), name)  # a tied weight: its first name, as saved
    names, unmatched = {}, []
    for name, tensor in dense_state.items():
        if id(tensor) in owners:
            names[name] = owners[id(tensor)]
        else:
            unmatched.append(name)
    return names, unmatched


_WRAPPERS = frozenset({"_orig_mod", "module"})
"""Name segments that wrappers add to a saved state's names: ``torch.compile``'s and
DDP's (a job that saves its wrapped model itself; Runtime saves the model unwrapped)."""


def _unwrapped(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def check_state_names(names, dense: nn.Module, where: str) -> None:
    """Checks a manifest's :data:`FIELD` against the loaded dense program.

    Raises:
        ValueError: not an object of string -> string, or naming state the program lacks.
    """
    if not isinstance(names, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ValueError(f"{where} must be an object of dense state name -> model state "
                         f"name, got {type(names).__name__}")
    unknown = sorted(set(names) - set(dense.state_dict()))
    if unknown:
        raise ValueError(f"{where} names state {unknown[:5]} that the dense program does not "
                         "have; re-export the package")


def dense_state_from_checkpoint(dense: nn.Module, names: dict[str, str],
                                checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of the training checkpoint ``checkpoint`` for the program ``dense``.

    Args:
        dense: the package's dense program (not changed).
        names: dense state name -> the training model's state name (:data:`FIELD`).
        checkpoint: a checkpoint of the training job, saved with ``model=``.

    Returns:
        Dense state name -> a tensor of that entry's shape and dtype (mapped from the
        checkpoint's file: load it into a program, which copies it), for the entries in
        ``names``; the others keep the package's values.

    Raises:
        CheckpointError: the checkpoint holds no model state, or lacks an entry, or holds
            one of another shape (named).
        CheckpointCorruptError: its dense state's file is damaged.
    """
    saved = read_dense_model(checkpoint)
    if saved is None:
        raise CheckpointError(f"checkpoint {checkpoint} holds no dense model state (it was "
                              "saved without model=), but this package serves the dense "
                              "layers of the checkpoint it follows; save the training "
                              "job's checkpoints with model= (Runtime does)")
    current = dense.state_dict()
    if not all(m in saved for m in names.values()):  # saved from a wrapped model?
        saved = {_unwrapped(k): v for k, v in saved.items()}
        names = {k: _unwrapped(v) for k, v in names.items()}
    missing = sorted(m for m in names.values() if m not in saved)
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint}: its model state lacks {missing[:5]}, "
                              "which the package's dense part takes; the training model "
                              "changed since the export: export a new package")
    state = {}
    for name, source in names.items():
        value = saved[source]
        if value.shape != current[name].shape:
            raise CheckpointError(f"checkpoint {checkpoint}: {source} has shape "
                                  f"{tuple(value.shape)}, the package's dense {name} "
                                  f"{tuple(current[name].shape)}; export a new package")
        state[name] = value.to(current[name].dtype)
    return state


class DenseCopies:
    """Copies of a package's dense program (with their float64 twins) for the weights of
    the checkpoints a handler follows, made once and used again.

    A refresh once deep-copied the program for every checkpoint; each copy of a
    ``torch.export`` program compiles its code again and leaves an entry in torch.fx's
    code cache and in ``linecache`` that is never freed, so a server following a job grew
    with every checkpoint (and with every retry of one that did not fit). A copy goes back
    to the pool once nothing serves it any more: not the live model, not the one kept to
    fall back to, no batch still running on it.

    Args:
        program: the package's dense program (the template; never written to).
        float64: also keep a float64 twin of each copy (see the handler's ``_Served``).
    """

    def __init__(self, program: nn.Module, *, float64: bool) -> None:
        self.program, self.float64 = program, float64
        # no lock: give_back runs in a finalizer, which the garbage collector may call in
        # any thread at any allocation (a lock held there would deadlock); deque's append
        # and pop are atomic
        self._idle: collections.deque[tuple[nn.Module, nn.Module | None]] = \
            collections.deque()
        self.made = 0
        """Copies made so far (about three in all: live, fall-back, a batch outliving both)."""

    def take(self, state: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module | None]:
        """A copy (and its float64 twin, or None) holding ``state``; the package's values
        elsewhere. Call :meth:`release_when_unused` with the object that serves it."""
        try:
            pair = self._idle.pop()
        except IndexError:
            with warnings.catch_warnings():  # torch's deprecation notes on copying a program
                warnings.simplefilter("ignore")
                dense = copy.deepcopy(self.program)
                pair = (dense, copy.deepcopy(dense).double() if self.float64 else None)
            self.made += 1
        try:
            with torch.no_grad():
                for module in pair:
                    if module is not None:  # load_state_dict casts to the module's dtypes
                        module.load_state_dict(state, strict=False)
        except BaseException:
            self.give_back(pair)  # nothing serves it: not lost to the pool
            raise
        return pair

    def give_back(self, pair: tuple[nn.Module, nn.Module | None]) -> None:
        """Returns a copy nothing serves."""
        self._idle.append(pair)

    def release_when_unused(self, server: object, pair: tuple[nn.Module, nn.Module | None]
                            ) -> None:
        """Gives ``pair`` back once ``server`` (the served model holding it) is gone."""
        weakref.finalize(server, self.give_back, pair)
