"""Runtime: one training script that runs alone or under torchrun, and survives restarts.

    with de.train.Runtime(checkpoint_dir="runs/ckpt", every_steps=500) as rt:
        model = rt.prepare(build_model())            # shard tables, DDP for dense params
        opt = torch.optim.Adam(model.parameters())
        rt.restore(opt)                              # latest good checkpoint, lazily
        for step in rt.steps(total_steps):           # resumes at the restored step
            idx = rt.batch_indices(step, batch_size, len(data))
            loss = loss_fn(model(data[idx]))
            loss.backward(); opt.step(); opt.zero_grad()
            rt.log(loss=loss.item())

torchrun restarts every worker after a failure or a change of membership; each restart runs
the script from the top, and :meth:`Runtime.restore` picks up the newest checkpoint that
every rank can load, with each rank taking its buckets whatever world size wrote it. A
checkpoint is written every ``every_steps`` steps or ``every_seconds`` seconds (the ranks
agree at each step boundary) and when SIGTERM arrives (torchrun forwards it when a job is
stopped or rescaled): then :meth:`steps` ends and :attr:`preempted` is True.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dynembed._args import check_bool
from dynembed.checkpoint.api import check_restore_options, checkpoint_path, load
from dynembed.checkpoint.fresh_start import (
    check_used_stores,
    tables_with_stores,
    used_store_names,
    used_stores_error,
)
from dynembed.checkpoint.manager import CheckpointManager, set_aside, step_of
from dynembed.distributed.exchange import Exchange
from dynembed.distributed.plan import ShardPlan, shard_model
from dynembed.distributed.process_group import JobEnv, init_process_group
from dynembed.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
)
from dynembed.keys.buckets import NUM_BUCKETS, check_num_buckets
from dynembed.nn._base import anchor_names, dense_parameters, named_tables
from dynembed.train import rank_checks
from dynembed.train.data import global_batch, rank_part
from dynembed.train.environment import check_rendezvous_env, share_cores
from dynembed.train.progress import PROGRESS_ENV, ProgressFile
from dynembed.train.rng import gather_rng_states, restore_rank_rng

logger = logging.getLogger(__name__)

SAVE_WAIT_S = 3600.0
"""Longest the ranks wait for each other after a checkpoint (which may compact a chain)."""
REPEAT_GRACE_S = 10
"""A SIGTERM this soon after the first is the same stop again and is ignored; a later one
stops at once, without a checkpoint (the launcher passes signals on by the same rule)."""

PEER_PREEMPTED_EXIT = 75
"""Exit code (EX_TEMPFAIL) of a worker whose loop a SIGTERM to another rank stopped, under
torchrun's elastic agent: a failure to its agent, which starts the workers again with the
ranks still there, resuming from the checkpoint just written. Exiting 0 told the agent the
job was done, and a scaled-down job ended as a success part way through."""
_LOADED, _DAMAGED, _FAILED = 0, 1, 2
"""A rank's outcome of loading a checkpoint during restore, worst last."""


def _positive_or_none(name: str, value, kind=int) -> None:
    if value is None:
        return
    ok = (int, float) if kind is float else int
    if isinstance(value, bool) or not isinstance(value, ok) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive {'number' if kind is float else 'int'} "
                         f"or None, got {value!r}")


def wrap_dense_part(model: nn.Module) -> nn.parallel.DistributedDataParallel:
    """``model`` in DistributedDataParallel, which syncs its dense Parameters.

    The tables' anchors are left out: they hold nothing to sync, and an anchor that gets no
    gradient in a step (a dynembed module in eval mode, a frozen table) stopped DDP at its
    next step ("parameters that were not used in producing loss").
    """
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, anchor_names(model))
    return nn.parallel.DistributedDataParallel(model)


class Runtime:
    """Runs a training loop as one process or as a rank of a torchrun job.

    Args:
        checkpoint_dir: where checkpoints go (shared by every rank and node). None: no
            checkpoints, and nothing is restored.
        every_steps: checkpoint after every step that is a multiple of this.
        every_seconds: ... or when this many seconds passed since the last checkpoint.
        keep_last: checkpoints kept (with the delta chains they need).
        max_chain: deltas before a chain is compacted into a full checkpoint.
        lazy_restore: restore tables lazily (rows are read from the checkpoint as keys come
            back), so the first step after a restart does not wait for the whole table.
        background_rows: with ``lazy_restore``, rows loaded by each training lookup so the
            whole table arrives over time.
        timeout: seconds a collective may wait for the other ranks before failing.
        backend: process group backend ("gloo" on CPU; None picks it).
        ddp: wrap models with trainable dense parameters in DistributedDataParallel.
        handle_sigterm: checkpoint and stop at the next step boundary on SIGTERM.
        progress_file: where rank 0 writes progress (default: ``$DYNEMBED_PROGRESS_FILE``).
        num_buckets: key buckets of sharding and checkpoints.
        used_stores: what a fresh start (no checkpoint to restore) does with tables whose
            stores hold rows already, from an earlier run or from an attempt of this job
            that failed before its first checkpoint: ``"refuse"`` (raise, naming them;
            after a torchrun restart they are that attempt's and are cleared), ``"clear"``
            (empty them, as a restore empties them), or ``"keep"`` (start from them, and
            checkpoint step 0 at once so that a restart starts from them again).

    Raises:
        ValueError, TypeError: a bad argument (named).
    """

    def __init__(self, checkpoint_dir: str | os.PathLike | None = None, *,
                 every_steps: int | None = None, every_seconds: float | None = None,
                 keep_last: int = 3, max_chain: int = 8, lazy_restore: bool = True,
                 background_rows: int = 0, timeout: float = 300.0, backend: str | None = None,
                 ddp: bool = True, handle_sigterm: bool = True,
                 progress_file: str | os.PathLike | None = None,
                 num_buckets: int = NUM_BUCKETS, used_stores: str = "refuse") -> None:
        _positive_or_none("every_steps", every_steps)
        check_used_stores(used_stores)
        _positive_or_none("every_seconds", every_seconds, float)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if checkpoint_dir is None and (every_steps or every_seconds):
            raise ValueError("every_steps/every_seconds need checkpoint_dir=")
        # checked here, not at the first checkpoint or restart (after training)
        for name, value in (("keep_last", keep_last), ("max_chain", max_chain)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_restore_options(lazy_restore, background_rows, "lazy_restore")
        check_num_buckets(num_buckets)
        ddp, handle_sigterm = check_bool("ddp", ddp), check_bool("handle_sigterm", handle_sigterm)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be None (picked for the device) or a "
                            f"torch.distributed backend name such as 'gloo', got {backend!r}")
        self.checkpoint_dir = (checkpoint_path(checkpoint_dir, "checkpoint_dir",
                                               "directory for checkpoints")
                               if checkpoint_dir is not None else None)
        if progress_file is not None:
            checkpoint_path(progress_file, "progress_file", "file path")
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.keep_last, self.max_chain = keep_last, max_chain
        self.lazy_restore, self.background_rows = lazy_restore, background_rows
        self.timeout, self.backend, self.use_ddp = float(timeout), backend, ddp
        self.handle_sigterm, self.num_buckets = handle_sigterm, num_buckets
        self.used_stores = used_stores
        self.env = JobEnv.from_environ()
        self.progress = ProgressFile(progress_file or os.environ.get(PROGRESS_ENV)
                                     if self.env.rank == 0 else None)
        self.step = 0
        """Steps completed (the data position)."""
        self.total: int | None = None
        self._state = "starting"  # the last state reported to the progress file
        self._left_at: int | None = None  # the step the loop was left at (break, error)
        self._stop_asked = False
        self._in_step = False  # between yielding a step and its end: a save now is early
        self._save_asked = False  # checkpoint() called inside a step: save at its end
        self._saved_rng: list | None = None  # every rank's generators, of the restored step
        self._restore_called = False  # steps() and checkpoint() need it with checkpoints
        self.extra: dict = {}
        """User state saved with every checkpoint and restored by :meth:`restore` (plain
        values: tensors, numbers, str, lists and dicts of them)."""
        self.preempted = False
        """SIGTERM arrived: the loop stopped after a checkpoint; exit without more work."""
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.plan: ShardPlan | None = None
        self.manager: CheckpointManager | None = None
        self.metrics: dict = {}
        self._control: Exchange | None = None
        self._after_save = None  # the process group of the wait after a save
        self._sigterm = threading.Event()
        self._sigterm_at = 0.0
        self._old_handler = None
        self._last_saved: int | None = None
        self._restored: str | None = None  # the checkpoint a lazy restore reads from
        self._last_save_time = time.monotonic()
        self._started = self._owns_group = False

    # ------------------------------------------------------------------ job
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.env.world_size > 1

    def start(self) -> Runtime:
        """Starts the process group (under torchrun), installs the SIGTERM handler and
        removes partial checkpoints a crash left (rank 0, before every rank goes on).

        Raises:
            ValueError: (on every rank) some rank does not see the probe file rank 0 wrote
                in ``checkpoint_dir``, which must be one directory every rank shares.
            ConfigMismatchError: (on every rank) the ranks were given different
                ``every_steps``.
            PermissionError: ``checkpoint_dir`` cannot be written.
        """
        if self._started:
            return self
        try:
            return self._start()
        except BaseException:  # leave no handler or process group behind
            self.close()
            raise

    def _start(self) -> Runtime:
        share_cores(self.env)  # first: it checks LOCAL_WORLD_SIZE
        if self.distributed and not dist.is_initialized():
            check_rendezvous_env()
        self._owns_group = init_process_group(self.env, backend=self.backend,
                                              timeout=self.timeout)
        if self.distributed:
            group = dist.new_group(backend="gloo",
                                   timeout=datetime.timedelta(seconds=self.timeout))
            self._control = Exchange(group, self.rank, self.world_size)
            # gloo waits as long as a group's timeout: the wait after a save (which may
            # compact a whole chain, on rank 0 alone) gets a group of its own
            self._after_save = dist.new_group(backend="gloo", timeout=datetime.timedelta(
                seconds=max(self.timeout, SAVE_WAIT_S)))
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.checkpoint_dir is not None:
            rank_checks.check_writable(self.checkpoint_dir, self.rank)
            self.manager = CheckpointManager(self.checkpoint_dir, keep_last=self.keep_last,
                                             max_chain=self.max_chain, rank=self.rank,
                                             world_size=self.world_size,
                                             num_buckets=self.num_buckets)
            if self.rank == 0:  # no rank is saving yet: any partial directory is a crash's
                for entry in self.checkpoint_dir.iterdir():
                    if entry.name.endswith(".partial") and entry.is_dir():
                        logger.info("removing partial checkpoint %s", entry)
                        shutil.rmtree(entry, ignore_errors=True)
            rank_checks.check_shared_directory(self._control, self.checkpoint_dir, self.rank,
                                               self.world_size)
            self.barrier()
        rank_checks.check_same_on_every_rank(self._control, every_steps=self.every_steps)
        self._started = True
        logger.info("rank %d of %d started (restart %d)", self.rank, self.world_size,
                    self.env.restart_count)
        return self

    def close(self) -> None:
        """Restores the SIGTERM handler and ends the process group this runtime started, or,
        in a process group the caller started, the groups it made for itself (the sharded
        model's stays: the caller may still run the model in that group)."""
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None
        if dist.is_initialized():
            if self._owns_group:
                dist.destroy_process_group()
            else:  # each runtime left two gloo groups (their sockets and threads) behind
                for group in (self._control.group if self._control is not None else None,
                              self._after_save):
                    if group is not None:
                        dist.destroy_process_group(group)
        self._control = self._after_save = None
        self._owns_group = self._started = False

    def __enter__(self) -> Runtime:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, kind, error, traceback) -> None:
        # sys.exit() after a preemption (as the docs suggest, for a scheduler to requeue
        # the job) is the stop the loop already reported, not a failure
        stopped = isinstance(error, SystemExit) and self.preempted
        if error is not None and self._started and not stopped:
            self._report("failed", force=True)  # not "running" for good
        damaged = self._damaged_checkpoint(error)
        if damaged is not None:
            # A lazily restored checkpoint checks its rows when they are read, and a delta
            # save reads its parent's: the one proved damaged is set aside, so the restart
            # falls back on an older one instead of failing again.
            logger.error("rank %d: checkpoint %s is damaged (%s); setting it aside for the "
                         "restart", self.rank, damaged, error)
            set_aside(damaged)
        self.close()

    def _damaged_checkpoint(self, error: BaseException | None) -> Path | None:
        """The checkpoint that ``error`` found damaged: the one of this job's holding the
        damaged file, the lazily restored one where the error names no file (or a file of
        it); None for others (never a sound checkpoint: a damaged newer parent once had
        the restored one set aside, and deleted later)."""
        if not isinstance(error, CheckpointCorruptError):
            return None
        restored = None if self._restored is None else Path(self._restored).resolve()
        if error.path is None:
            return restored
        file = Path(error.path).resolve()
        if restored is not None and (file == restored or restored in file.parents):
            return restored
        root = self.checkpoint_dir.resolve() if self.checkpoint_dir is not None else None
        for folder in (file, *file.parents):
            if folder.parent == root and step_of(folder) is not None:
                return folder
        return None

    def _on_sigterm(self, signum, frame) -> None:
        now = time.monotonic()
        if self._sigterm.is_set():
            if now - self._sigterm_at < REPEAT_GRACE_S:
                # the same stop again (systemd and SLURM signal every process of the job,
                # and torchrun passes its own on): not a reason to lose the checkpoint
                return
            logger.warning("rank %d: SIGTERM again, %.0f s after the first; stopping now, "
                           "without a checkpoint", self.rank, now - self._sigterm_at)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        logger.warning("rank %d: SIGTERM; checkpointing at the next step boundary (another "
                       "SIGTERM %d s or more later stops at once)", self.rank,
                       REPEAT_GRACE_S)
        self._sigterm_at = now
        self._sigterm.set()

    def barrier(self) -> None:
        """Waits for every rank (no-op alone)."""
        if self._control is not None:
            dist.barrier(group=self._control.group)

    # ------------------------------------------------------------------ model
    def prepare(self, model: nn.Module) -> nn.Module:
        """Makes ``model`` this job's: tables sharded (or replicated) across ranks and the
        dense part in DistributedDataParallel. Alone, returns ``model`` unchanged.

        Returns:
            The module to call in the training loop. Checkpoints always hold ``model``
            itself, so they load at any world size.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._require_started()
        self.model = model
        if not self.distributed:
            return model
        self.plan = shard_model(model, num_buckets=self.num_buckets, timeout=self.timeout)
        if self.use_ddp and any(p.requires_grad for p in dense_parameters(model)):
            return wrap_dense_part(model)
        return model

    # ------------------------------------------------------------------ checkpoints
    def restore(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Restores the newest checkpoint that every rank can load into the prepared model
        and ``optimizer``; a damaged one is skipped for the one before it.

        Returns:
            :attr:`extra` (empty on a fresh start). :attr:`step` is the restored step.

        Raises:
            TypeError: ``optimizer`` is not a torch optimizer.
            CheckpointError: there are checkpoints but none loads (or they do not fit), or
                loading failed unexpectedly on another rank (every rank stops at once).
            Exception: an unexpected error while loading (I/O, memory, ...), raised on the
                rank where it happened after the other ranks were told.
        """
        self._require_started()
        if self.model is None:
            raise RuntimeError("call prepare(model) before restore()")
        if optimizer is not None and not (hasattr(optimizer, "state_dict")
                                          and hasattr(optimizer, "load_state_dict")):
            # else it failed at the first checkpoint, after training steps had run
            raise TypeError(f"optimizer must be the dense part's torch optimizer (or None), "
                            f"got {type(optimizer).__name__}; a de.optim optimizer belongs to "
                            "the tables, and is checkpointed with them")
        self.optimizer = optimizer
        self._restore_called = True
        if self.manager is None:
            return self.extra
        candidates = [str(p) for p in reversed(self.manager.checkpoints())]
        if self._control is not None:  # rank 0's list: every rank tries the same ones
            holder = [candidates]
            dist.broadcast_object_list(holder, src=0, group=self._control.group)
            candidates = holder[0]
        for path in candidates:
            loaded, error, failure = self._try_load(path)
            if self._control is not None:
                # every rank learns the worst outcome: an unexpected error on one rank stops
                # them all now, instead of leaving the others in the next collective until
                # the timeout
                status = _FAILED if failure is not None else _LOADED if loaded else _DAMAGED
                worst, failed_rank = self._control.all_reduce_max(
                    np.array([status, self.rank if failure is not None else -1]))
                if worst == _FAILED and failure is None:
                    raise CheckpointError(
                        f"restoring {path} failed on rank {failed_rank} (see that rank's "
                        "log for the error); every rank stops")
                loaded = worst == _LOADED
            if failure is not None:
                raise failure
            if loaded:
                logger.info("rank %d restored %s at step %d", self.rank, path, self.step)
                restore_rank_rng(self._saved_rng, self.rank, self.world_size)
                return self.extra
            logger.warning("checkpoint %s does not load on every rank (%s); trying an "
                           "older one", path, error or "another rank failed")
            if self.rank == 0:  # every rank has tried it by now
                # kept for inspection, out of the way: training will save that step again
                try:
                    set_aside(path)
                except OSError as e:  # the others go on to the next candidate: so does 0
                    logger.warning("could not set %s aside (%s); the next save of that "
                                   "step will fail until it is moved", path, e)
        if candidates:
            raise CheckpointError(f"no checkpoint in {self.checkpoint_dir} loads "
                                  f"({len(candidates)} tried); see the warnings above")
        self._fresh_start()
        return self.extra

    def _fresh_start(self) -> None:
        """Applies ``used_stores`` to the tables whose stores hold rows at a fresh start.

        A restore empties the stores and loads the checkpoint's rows; a fresh start once
        left them as they were, so a job restarted before its first checkpoint trained on
        the rows its failed attempt had evicted (and the lookup counts of both attempts),
        and a new job on the rows of an earlier one, silently. After a torchrun restart
        with no checkpoint the rows can only be the failed attempt's (rows found by the
        first attempt were refused, or kept with a checkpoint of step 0), so they are
        cleared.

        Raises:
            RuntimeError: ``used_stores="refuse"`` and a store holds rows (every rank).
        """
        tables = tables_with_stores(named_tables(self.model))
        used = used_store_names(tables)
        anywhere = bool(used)
        if self._control is not None:  # every rank acts alike
            anywhere = bool(self._control.all_reduce_max(np.array([int(anywhere)]))[0])
        if not anywhere:
            return
        mode = self.used_stores
        if mode == "refuse" and self.env.restart_count > 0:
            mode = "clear"
        if mode == "refuse":
            raise used_stores_error(f"rank {self.rank}: no checkpoint in {self.checkpoint_dir}",
                                    used or "(on another rank)", "Runtime(used_stores='{mode}')")
        if mode == "clear":
            logger.warning("rank %d: fresh start: emptying the stores of tables %s, which "
                           "hold rows from before", self.rank, used or "(on another rank)")
            for table in tables.values():  # each rank its own rows (of a shared store)
                table.start_over()
            return
        logger.warning("rank %d: fresh start over the rows the stores of tables %s hold; "
                       "checkpointing step 0 so that a restart starts from them again",
                       self.rank, used)
        self.checkpoint()

    def _try_load(self, path: str) -> tuple[bool, str | None, Exception | None]:
        """(loaded, why not, the unexpected error to raise after telling the other ranks)."""
        try:  # load() checks every file of the chain first
            saved = load(path, self.model, self.optimizer, lazy=self.lazy_restore,
                         background_rows=self.background_rows if self.lazy_restore else 0,
                         rank=self.rank, world_size=self.world_size) or {}
        except (CheckpointCorruptError, CheckpointNotFoundError) as e:
            return False, str(e), None  # damaged or gone: an older one may load
        except Exception as e:  # re-raised by restore(), after every rank was told
            if self._control is None:
                raise
            logger.error("rank %d: restoring %s failed: %r", self.rank, path, e)
            return False, str(e), e
        self.step = int(saved.get("step", 0))
        self.extra = dict(saved.get("user", {}))
        self._saved_rng = saved.get("rng")
        self._last_saved, self._last_save_time = self.step, time.monotonic()
        self._restored = path if self.lazy_restore else None
        return True, None, None

    def checkpoint(self) -> Path | None:
        """Saves a checkpoint of the current step now (every rank must call it).

        Called inside the body of a :meth:`steps` loop, it asks for a checkpoint at the end
        of that step instead (on every rank, as :meth:`stop` does) and returns None: the
        step's update may have run already, and saved under the step's own number, a resume
        trained that batch a second time.

        The checkpoint also holds every rank's global random generators (torch, CUDA, numpy,
        Python); :meth:`restore` gives them back when the world size is the same.

        Returns:
            The committed checkpoint (on every rank), or None without ``checkpoint_dir``
            (or inside a step).

        Raises:
            CheckpointError: on every rank, when some rank does not see the checkpoint
                committed after every rank wrote its part (``checkpoint_dir`` is not shared).
        """
        self._require_started()
        if self.manager is None or self.model is None:
            return None
        self._require_restored()
        if self._in_step:
            self._save_asked = True
            return None
        path = self.checkpoint_dir / f"step-{self.step:010d}"
        if self._last_saved == self.step:  # saved (or restored) already
            for done in (path, path.with_name(path.name + "-full")):
                if done.exists():
                    return done
        if self._left_at == self.step:
            logger.warning(
                "rank %d: checkpointing step %d after the loop was left in it (break): if "
                "its update ran, this checkpoint holds it under step %d and a resume trains "
                "that batch again; end a loop early with rt.stop() instead", self.rank,
                self.step, self.step)
        extra = {"step": self.step, "world_size": self.world_size, "user": self.extra,
                 "rng": gather_rng_states(
                     None if self._control is None else self._control.group,
                     self.rank, self.world_size)}
        self.manager.save(self.step, self.model, self.optimizer, extra)
        # every rank sees the commit before the next save picks its parent; the wait holds
        # a compaction of the whole chain (rank 0 alone), which outlasted the collective
        # timeout on large tables and cost a restart at each one
        if self._after_save is not None:
            dist.barrier(group=self._after_save)
        committed = rank_checks.check_committed(self._control, path, self.step, self.rank,
                                                self.world_size)
        self._last_saved, self._last_save_time = self.step, time.monotonic()
        self._report(self._state, force=True)  # the saved step, not a throttled older one
        return committed

    # ------------------------------------------------------------------ loop
    def steps(self, total: int) -> Iterator[int]:
        """Yields the steps still to run, ``self.step`` .. ``total - 1``; after each one,
        counts it, checkpoints when due, and stops early (after a checkpoint) on SIGTERM.
        A final checkpoint is written at ``total``.

        To end the loop early (early stopping), call :meth:`stop` in the step's body: the
        step is counted, checkpointed, and the loop ends (on every rank at the same step).
        A ``break`` cannot tell a body that ran from one that never started (``zip`` with a
        data loader that ran out pulls a step and drops it), so it leaves the step
        uncounted; a checkpoint after it warns, since it would hold the step's update under
        the step before and a resume would train that batch again.

        Raises:
            ConfigMismatchError: the ranks were given different ``total``s.
            SystemExit: code :data:`PEER_PREEMPTED_EXIT`, under torchrun's elastic agent, on
                the ranks a SIGTERM to another rank stopped (after the checkpoint), so that
                torchrun starts the workers again with the ranks still there.
        """
        if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total < 2**63:
            raise ValueError(f"total must be an int in [0, 2**63), got {total!r}")
        self._require_started()
        self._require_restored()
        rank_checks.check_same_on_every_rank(self._control, total=total)
        self.total, self._left_at = total, None
        self._report("running", force=True)
        while self.step < total:
            self._in_step = True
            try:
                yield self.step
            except GeneratorExit:  # left with break (or by an error): the step is unknown
                self._left_at = self.step
                raise
            finally:
                self._in_step = False
            self.step += 1
            stop, timed, asked, save = self._agree()
            due = (self.every_steps is not None and self.step % self.every_steps == 0) \
                or timed or save
            if due or stop or asked:
                self.checkpoint()
            if stop:
                self.preempted = True
                self._report("preempted", force=True)
                if self._sigterm.is_set():
                    logger.warning("rank %d stopped at step %d after SIGTERM", self.rank,
                                   self.step)
                    return
                logger.warning("rank %d stopped at step %d: another rank got SIGTERM",
                               self.rank, self.step)
                if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun's elastic agent
                    logger.warning("rank %d: exiting with code %d so that torchrun starts the "
                                   "workers again with the ranks still there (they resume "
                                   "from this checkpoint)", self.rank, PEER_PREEMPTED_EXIT)
                    raise SystemExit(PEER_PREEMPTED_EXIT)
                return
            if asked:
                self._report("stopped", force=True)
                return
            self._report("running")
        if self._last_saved != self.step:
            self.checkpoint()
        self._report("done", force=True)

    def stop(self) -> None:
        """Ends :meth:`steps` after the current step: it is counted and checkpointed, and
        the loop ends; any rank asking stops every rank at the same step. Use it for early
        stopping instead of ``break`` (see :meth:`steps`)."""
        self._stop_asked = True

    def _agree(self) -> tuple[bool, bool, bool, bool]:
        """(SIGTERM, time to checkpoint, stop asked, checkpoint asked), agreed by every
        rank."""
        timed = (self.every_seconds is not None and self.manager is not None
                 and time.monotonic() - self._last_save_time >= self.every_seconds)
        flags = np.array([self._sigterm.is_set(), timed, self._stop_asked, self._save_asked],
                         dtype=np.int64)
        if self._control is not None:
            flags = self._control.all_reduce_max(flags)
        self._stop_asked = self._save_asked = False
        return bool(flags[0]), bool(flags[1]), bool(flags[2]), bool(flags[3])

    def batch_indices(self, step: int, batch_size: int, num_samples: int, *, seed: int = 0,
                      shuffle: bool = True) -> np.ndarray:
        """This rank's sample indices of global batch ``step`` (see
        :mod:`dynembed.train.data`): the same step covers the same samples whatever the
        world size, so a resumed job continues exactly where it stopped.

        Returns:
            (about batch_size / world_size,) int64 indices into the data set.
        """
        indices = global_batch(step, batch_size, num_samples, seed=seed, shuffle=shuffle)
        return rank_part(indices, self.rank, self.world_size)

    def log(self, **metrics) -> None:
        """Records numbers shown with the progress (e.g. ``loss=...``).

        Raises:
            TypeError: a value is not a number (a Python or numpy number, or a one-element
                tensor); nothing is recorded.
        """
        values = {}
        for name, value in metrics.items():
            try:
                if isinstance(value, (str, bytes)):
                    raise TypeError  # float("1.5") would take it
                values[name] = float(value)
            except (TypeError, ValueError, RuntimeError):  # a tensor of more elements
                raise TypeError(f"log({name}=...) must be a number (e.g. loss.item()), got "
                                f"{type(value).__name__} {value!r:.60}") from None
        self.metrics.update(values)

    def _report(self, state: str, *, force: bool = False) -> None:
        self._state = state
        self.progress.write(step=self.step, total=self.total, state=state,
                            world_size=self.world_size,
                            restart_count=self.env.restart_count, metrics=self.metrics,
                            force=force)

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("the runtime is not started; use `with Runtime(...) as rt:` "
                               "or call rt.start()")

    def _require_restored(self) -> None:
        # Without it, a job with checkpoints started again at step 0 and failed at its first
        # save, after training; and on a fresh run the checkpoints held no optimizer state,
        # so the resume that passed one was refused.
        if self.manager is not None and not self._restore_called:
            raise RuntimeError(
                f"call rt.restore(optimizer) before training with checkpoint_dir "
                f"{self.checkpoint_dir}: it resumes from the newest checkpoint there (on a "
                "fresh run it finds none and starts at step 0) and gives the checkpoints the "
                "dense optimizer to save")
