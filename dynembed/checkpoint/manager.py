"""CheckpointManager: when to save, full or delta, what to keep, which one to restore.

Checkpoints live in one directory as ``step-<step>`` (full or delta) and ``step-<step>-full``
(a delta chain compacted into a full checkpoint with the same id). The first save is full;
later saves are deltas against the latest checkpoint while the tables track their changes
since it, and a chain longer than ``max_chain`` is compacted. The ``keep_last`` newest
checkpoints are kept with every checkpoint their chains need; older ones, partial
directories left by a crash, and checkpoints set aside as damaged once older than every kept
one, are removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from dynembed._args import check_int, check_positive
from dynembed.checkpoint import manifest as mf
from dynembed.checkpoint.api import (
    _check_rank,
    _gather_tables,
    checkpoint_path,
    load,
    save,
)
from dynembed.checkpoint.compact import compact
from dynembed.checkpoint.fresh_start import (
    check_used_stores,
    tables_with_stores,
    used_store_names,
    used_stores_error,
)
from dynembed.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
)
from dynembed.keys.buckets import NUM_BUCKETS, check_num_buckets
from dynembed.table.table import DynamicTable

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{10,})(-full)?$")  # zero-padded to 10 digits, more past 10^10
_SET_ASIDE = re.compile(r"^step-(\d{10,})(-full)?\.damaged(-\d+)?$")
_RELISTS = 5
"""Times :meth:`CheckpointManager.latest` lists the directory again when it changes while a
checkpoint is checked."""


def step_of(path: str | os.PathLike) -> int | None:
    """The step in a checkpoint directory's name (``step-N`` or ``step-N-full``), or None."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def _check_step(step) -> int:
    """``step`` as a Python int; raises ValueError unless it is an int in [0, 2**63) (a
    larger one named a directory that every later, smaller step was refused beside)."""
    step = check_int("step", step, minimum=0)
    if step >= 2**63:
        raise ValueError(f"step must be below 2**63, got {step}")
    return step


def _positive(name: str, value, *, allow_none: bool = True, kind=int) -> None:
    if value is None and allow_none:
        return
    if kind is float:
        check_positive(name, value)
    else:
        check_int(name, value)


_DELETING = ".deleting"


def _delete(path: Path) -> None:
    """Removes a checkpoint directory, renamed ``<name>.deleting`` first: ``rmtree`` is not
    atomic, and a crash in the middle of it left a ``step-N`` without its manifest, which no
    listing showed, no cleanup removed, and which made a later save of step N fail."""
    doomed = path.with_name(path.name + _DELETING)
    if doomed.exists():  # an earlier deletion of a checkpoint of that name was cut short
        shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:  # another rank's cleanup took it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


def set_aside(path: str | os.PathLike) -> Path | None:
    """Renames a damaged checkpoint ``<name>.damaged`` (``.damaged-2``, ... if that step was
    set aside before), out of the way of the save that will make that step again; returns
    the new path, or None if another process moved it first."""
    path = Path(path)
    target, n = path.with_name(path.name + ".damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


class CheckpointManager:
    """Saves checkpoints of a training job into one directory and finds the one to resume.

    Args:
        directory: where checkpoints go (created if needed).
        keep_last: how many of the newest checkpoints to keep (their delta chains too).
        every_steps: :meth:`maybe_save` saves when this many steps passed since the last.
        every_seconds: ... or when this many seconds passed (one process only: each rank's
            clock would pick other steps; a job of several ranks uses ``every_steps``, or
            :class:`dynembed.train.Runtime`, whose ranks agree).
        max_chain: a delta chain longer than this is compacted into a full checkpoint
            (1: every save is full).
        rank, world_size: this process's place in a job (each rank calls save; the last
            one to write commits, cleans up and compacts).
        num_buckets: key buckets of the rows files of a full checkpoint (deltas keep their
            chain's).

    Example:
        >>> manager = de.checkpoint.CheckpointManager("runs/ckpt", every_steps=1000)
        >>> start = (manager.restore(model, optimizer) or {}).get("step", 0)
        >>> for step in range(start, steps):
        ...     train_step()
        ...     manager.maybe_save(step + 1, model, optimizer, extra={"step": step + 1})
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3,
                 every_steps: int | None = None, every_seconds: float | None = None,
                 max_chain: int = 8, rank: int = 0, world_size: int = 1,
                 num_buckets: int = NUM_BUCKETS) -> None:
        _positive("keep_last", keep_last, allow_none=False)
        _positive("every_steps", every_steps)
        _positive("every_seconds", every_seconds, kind=float)
        _positive("max_chain", max_chain, allow_none=False)
        _check_rank(rank, world_size)  # here, not at the first save hours later
        check_num_buckets(num_buckets)
        if every_seconds is not None and world_size != 1:
            raise ValueError("every_seconds needs world_size=1: each rank's clock would pick "
                             "another step, and no checkpoint would get every rank's part; "
                             "use every_steps, or de.train.Runtime(every_seconds=...)")
        self.directory = checkpoint_path(directory, "directory", "directory for checkpoints")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"directory: {directory} is (or lies under) a file, not "
                                     "a directory; give the directory to keep checkpoints "
                                     "in") from None
        self.keep_last, self.max_chain = keep_last, max_chain
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.rank, self.world_size, self.num_buckets = rank, world_size, num_buckets
        self._last_step: int | None = None
        self._last_time = time.monotonic()
        self._damaged: set[str] = set()
        """Checkpoints :meth:`restore` found damaged in their rows (which :meth:`latest`
        does not read) but could not set aside (a job of several ranks)."""
        self._skipped: dict[str, str] = {}  # checkpoint name -> the error latest() logged

    # ------------------------------------------------------------------ finding
    def checkpoints(self) -> list[Path]:
        """Committed checkpoints, oldest first (by step; a compacted one after its delta)."""
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match and (entry / mf.MANIFEST).exists():
                found.append((int(match.group(1)), bool(match.group(2)), entry))
        return [p for _, _, p in sorted(found)]

    def latest_step(self) -> int | None:
        """The step of :meth:`latest` (None without a checkpoint): e.g. to save at the end
        of an epoch unless :meth:`maybe_save` saved that step already (a second
        :meth:`save` of a step raises)."""
        newest = self.latest()
        return None if newest is None else step_of(newest)

    def latest(self) -> Path | None:
        """The newest checkpoint whose chain is whole and whose files have their sizes (and
        CRCs, for the small ones; rows files check their blocks as they are read), or
        None. Others are skipped with a warning (once per checkpoint and error).

        Checkpoints whose rows this manager's :meth:`restore` found damaged are skipped
        too.

        A checkpoint that fails its check because it is being replaced (a compaction
        renames ``step-N-full`` in and deletes ``step-N``; a cleanup deletes old ones) is
        not a reason to fall back to an older one: the directory is listed again first, up
        to a few times, so a reader never sees the newest step go back.
        """
        listing, relists = self.checkpoints(), 0
        i = len(listing) - 1
        while i >= 0:
            if listing[i].name in self._damaged:  # a restore found its rows damaged
                i -= 1
                continue
            try:
                mf.check_chain(mf.chain(listing[i]))
            except CheckpointError as e:
                if relists < _RELISTS:
                    again = self.checkpoints()
                    if again != listing:  # the directory changed under us: look again
                        listing, relists = again, relists + 1
                        i = len(listing) - 1
                        continue
                self._warn_skipped(listing[i], e)
                i -= 1
                continue
            return listing[i]
        return None

    def _warn_skipped(self, path: Path, error: Exception) -> None:
        """Warns that :meth:`latest` skips ``path``, once per path and error: a server
        following the directory asks every few seconds, and logged it every time (17,000
        lines a day while the job's newest checkpoint stayed damaged)."""
        message = str(error)
        if self._skipped.get(path.name) != message:
            self._skipped[path.name] = message
            logger.warning("skipping checkpoint %s: %s", path, error)
        if len(self._skipped) > 64:  # checkpoints cleaned up since: forget them
            listed = {p.name for p in self.checkpoints()}
            self._skipped = {k: v for k, v in self._skipped.items() if k in listed}

    # ------------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        """Whether :meth:`maybe_save` would save at ``step``."""
        if self.every_steps is not None and (
                self._last_step is None and step % self.every_steps == 0
                or self._last_step is not None and step - self._last_step >= self.every_steps):
            return True
        return (self.every_seconds is not None
                and time.monotonic() - self._last_time >= self.every_seconds)

    def maybe_save(self, step: int, model: nn.Module | None = None,
                   optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                   *, tables: dict[str, DynamicTable] | None = None) -> Path | None:
        """Saves if :meth:`due`; returns the committed checkpoint or None.

        Raises:
            ValueError: the manager has neither ``every_steps`` nor ``every_seconds`` (it
                would never save), or ``step`` is not an int in [0, 2**63).
        """
        step = _check_step(step)
        if self.every_steps is None and self.every_seconds is None:
            raise ValueError("maybe_save never saves without every_steps or every_seconds: "
                             "give one to CheckpointManager, or call save() to save now")
        if not self.due(step):
            return None
        return self.save(step, model, optimizer, extra, tables=tables)

    def save(self, step: int, model: nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None, *,
             tables: dict[str, DynamicTable] | None = None) -> Path | None:
        """Saves a checkpoint for ``step`` now: a delta against the latest checkpoint when
        every table tracks its changes since it, else full.

        A single-process job whose latest checkpoint turns out damaged while the delta is
        written (its rows are read to count the table's live rows) saves the step in full.

        Returns:
            The committed checkpoint, or None while other ranks still write theirs.

        Raises:
            FileExistsError: a checkpoint for ``step`` exists (also as ``step-N-full``).
            CheckpointCorruptError: with several ranks, the latest checkpoint, which the
                delta needs, is damaged (restart the job; see :meth:`restore`).
            ValueError: ``step`` is not an int in [0, 2**63), or is before the newest
                checkpoint's (retention keeps the newest steps, so it would delete this one
                at once).
            CheckpointError, TypeError: see :func:`dynembed.checkpoint.save`.
        """
        step = _check_step(step)
        path = self.directory / f"step-{step:010d}"
        compacted = path.with_name(path.name + "-full")
        if compacted.exists():  # a second step-N beside it: restore would take the older
            raise FileExistsError(f"{compacted} exists (step {step}, compacted); checkpoints "
                                  "are never overwritten (latest_step() says whether a step "
                                  "was saved already)")
        newest = self.latest()  # a damaged newer one is no reason to refuse
        if newest is not None and step_of(newest) > step:
            raise ValueError(
                f"step={step} is before the newest checkpoint in {self.directory} "
                f"({newest.name}): keep_last keeps the newest steps, so this one would be "
                "deleted as soon as it is saved. Resume the step count (restore() gives it "
                "back), or save a new run into a new directory")
        found = _gather_tables(model, tables)
        parent = self._parent_for(found, newest)
        try:
            # a delta keeps its chain's buckets (the chain may come from another setting)
            done = save(path, model, optimizer, extra, tables=tables, parent=parent,
                        rank=self.rank, world_size=self.world_size,
                        num_buckets=None if parent is not None else self.num_buckets)
        except CheckpointCorruptError as e:
            if parent is None:
                raise
            if self.world_size > 1:  # the ranks would have to agree on a full save first
                raise CheckpointCorruptError(
                    f"{e}; step {step} cannot be saved as a delta of it. Restart the job: "
                    "the Runtime sets the damaged checkpoint aside on its way out (as "
                    "restore() does with damage it finds), and the next save is then made "
                    "on a sound one", path=e.path) from e
            # A delta of a damaged parent would never load, and every later save would fail
            # the same way: this step is saved in full (the damaged one is left to cleanup).
            logger.warning("the latest checkpoint %s is damaged (%s); saving step %d in full",
                           parent, e, step)
            done = save(path, model, optimizer, extra, tables=tables, rank=self.rank,
                        world_size=self.world_size, num_buckets=self.num_buckets)
        self._last_step, self._last_time = step, time.monotonic()
        if done is not None:
            if mf.read(done)["chain_length"] > self.max_chain:
                full = compact(done, done.with_name(done.name + "-full"))
                _delete(done)
                done = full
            self.cleanup(keeping=done)
        return done

    def _parent_for(self, tables: dict[str, DynamicTable], latest: Path | None) -> Path | None:
        if self.max_chain == 1 or not tables:
            return None
        if latest is None:
            return None
        latest_id = mf.read(latest)["id"]
        if all(not t.changes.wiped and t.changes.since == latest_id for t in tables.values()):
            return latest
        return None

    def cleanup(self, *, keeping: Path | None = None) -> list[Path]:
        """Removes checkpoints beyond ``keep_last`` that no kept chain needs, those set aside
        as damaged once older than every kept one, what a crash left of a deletion and, in
        a single-process job, partial directories left by a crash (with several ranks one
        may be in progress; the job's runtime removes those); returns what was removed.
        ``keeping`` (the checkpoint just saved) stays with its chain whatever newer steps a
        damaged run left."""
        removed = []
        committed = self.checkpoints()
        keep = set()
        for path in committed[-self.keep_last:] + ([keeping] if keeping is not None else []):
            try:
                keep.update(folder for folder, _ in mf.chain(path))
            except CheckpointError:
                keep.add(path.resolve())
        for path in committed:
            if path.resolve() not in keep:
                _delete(path)
                removed.append(path)
        removed += self._remove_old_set_aside(committed[-self.keep_last:])
        for entry in self.directory.iterdir():
            if not entry.is_dir():
                continue
            # a committed step-N has its manifest from the moment it appears (a rename), so
            # one without it is what an older version's interrupted deletion left
            leftover = entry.name.endswith(_DELETING) or (
                _NAME.match(entry.name) and not (entry / mf.MANIFEST).exists())
            # with several ranks a partial one may be in progress
            partial = self.world_size == 1 and entry.name.endswith(".partial")
            if leftover or partial:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    def _remove_old_set_aside(self, kept: list[Path]) -> list[Path]:
        """Removes checkpoints set aside as damaged (:func:`set_aside`) once they are older
        than every kept checkpoint: kept for inspection while they are recent, they would
        otherwise pile up over a long job's restarts."""
        if not kept:  # nothing loads: keep the evidence
            return []
        oldest_kept = int(_NAME.match(kept[0].name).group(1))
        removed = []
        for entry in self.directory.iterdir():
            match = _SET_ASIDE.match(entry.name)
            if match and entry.is_dir() and int(match.group(1)) < oldest_kept:
                logger.info("removing %s, set aside as damaged and now older than every "
                            "kept checkpoint", entry)
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    # ------------------------------------------------------------------ restoring
    def restore(self, model: nn.Module | None = None,
                optimizer: torch.optim.Optimizer | None = None, *,
                tables: dict[str, DynamicTable] | None = None, lazy: bool = False,
                background_rows: int = 0, strict: bool = True,
                used_stores: str = "refuse") -> dict | None:
        """Restores the newest checkpoint that loads (see :func:`dynembed.checkpoint.load`):
        one whose files turn out damaged while loading is skipped (logged) for the one
        before it.

        Args:
            model, optimizer, tables, lazy, background_rows, strict: as
                :func:`dynembed.checkpoint.load`.
            used_stores: what a fresh start (no checkpoint) does with tables whose stores
                hold rows already, from an earlier run or from a run that stopped before its
                first checkpoint (training over them would silently go on from that run's
                rows): ``"refuse"`` (raise, naming them), ``"clear"`` (empty them, as a
                restore does) or ``"keep"`` (start from them on purpose; save a checkpoint
                soon, so that a restart starts from them again). Each rank decides for its
                own tables: a job of several ranks should pass ``"clear"`` or ``"keep"``,
                or use :class:`dynembed.train.Runtime`, whose ranks agree.

        Returns:
            Its ``extra`` dict (``{}`` if it has none), or None when there is no checkpoint
            yet (a fresh start).

        A damaged checkpoint (or a delta whose parent is gone) is renamed
        ``<name>.damaged`` (single-process jobs), so that the training that follows can save
        that step again; it is kept for inspection. With ``lazy=True`` rows are checked as
        they are read: damage found then is remembered beside the file (see
        :func:`~dynembed.checkpoint.manifest.mark_damaged`), so the next restore falls back
        instead of restoring that checkpoint again.

        Raises:
            CheckpointCorruptError: there are checkpoints, but every one is damaged (or
                misses a parent).
            RuntimeError: a fresh start with ``used_stores="refuse"`` over stores that
                hold rows.
            ValueError: ``used_stores`` is not one of the three.
        """
        check_used_stores(used_stores)
        tried = []
        for path in reversed(self.checkpoints()):
            try:
                mf.check_chain(mf.chain(path))
                logger.info("restoring checkpoint %s", path)
                extra = load(path, model, optimizer, tables=tables, lazy=lazy,
                             background_rows=background_rows, rank=self.rank,
                             world_size=self.world_size, strict=strict)
            except (CheckpointCorruptError, CheckpointNotFoundError) as e:
                if isinstance(e, CheckpointNotFoundError) and not (path / mf.MANIFEST).exists():
                    logger.warning("skipping checkpoint %s: %s", path, e)  # removed meanwhile
                    continue
                # damaged, or a delta whose parent is gone: it never loads again, and left
                # in place it would stop training from saving that step again
                logger.warning("skipping damaged checkpoint %s: %s", path, e)
                tried.append(path)
                if self.world_size == 1:  # out of the way: training will save that step again
                    set_aside(path)
                else:  # another rank may still read it: remembered instead (see latest)
                    self._damaged.add(path.name)
                continue
            self._last_step = (extra or {}).get("step") if isinstance(extra, dict) else None
            self._last_time = time.monotonic()
            return extra if extra is not None else {}
        if tried:
            raise CheckpointCorruptError(f"every checkpoint in {self.directory} is damaged "
                                         f"({[p.name for p in tried]}); nothing to resume")
        self._fresh_start(_gather_tables(model, tables), used_stores)
        return None

    def _fresh_start(self, tables: dict[str, DynamicTable], used_stores: str) -> None:
        """Applies ``used_stores`` to the tables whose stores hold rows (see
        :meth:`restore`)."""
        tables = tables_with_stores(tables)
        used = used_store_names(tables)
        if not used or used_stores == "keep":
            if used:
                logger.warning("fresh start over the rows the stores of tables %s hold", used)
            return
        if used_stores == "refuse":
            raise used_stores_error(f"no checkpoint in {self.directory}", used,
                                    "restore(used_stores='{mode}')")
        logger.warning("fresh start: emptying the stores of tables %s, which hold rows "
                       "from before", used)
        for table in tables.values():
            table.start_over()
