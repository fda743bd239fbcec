"""What a table records in its store beside the rows, so that a table built over the store
later trains on as this one would: its clock (steps, seed), its admission state and how
many strings its key log held (see :data:`~dynembed.storage.base.CLOCK_FIELDS`).

:class:`StoreClock` is a mixin of :class:`~dynembed.table.table.DynamicTable`.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from collections.abc import Iterator

import torch

from dynembed._caller import warn_at_caller

MAX_STORED_ADMISSION = 64 << 20
"""The largest admission state (compressed) a flush records in the store: the record is
one value (Redis refuses values over 512 MB by default), rewritten whole at each flush; a
Bloom filter of 10**8 keys compresses to about 165 MB."""


class StoreClock:
    """The store's clock record: written by flushes, adopted when a table opens (mixin)."""

    def clock(self) -> dict:
        """What :meth:`flush` records in the store so that a table reopened over it
        continues: ``{"step": training lookups, "update_step": optimizer steps, "seed":
        the initializer seed, "logged_keys": strings in the key log}``, and
        ``"admission"``, the admission policy's state (compressed), except in a store the
        shards of a sharded table share (each shard's state is its own; a checkpoint keeps
        them)."""
        clock = {"step": int(self.step), "update_step": int(self.update_step),
                 "seed": int(self.seed),
                 "logged_keys": None if self.key_log is None else len(self.key_log)}
        writes = self.tier is not None and self.tier.owns_store  # else flush records nothing
        if self.admitter is not None and writes and not (self.is_shard
                                                         and self.tier.store.shared):
            buffer = io.BytesIO()
            torch.save(self.admitter.state_dict(), buffer)
            state = zlib.compress(buffer.getvalue(), 1)  # a sketch: mostly zeros
            if len(state) <= MAX_STORED_ADMISSION:
                clock["admission"] = state
            elif not self._warned_admission_size:
                self._warned_admission_size = True
                warn_at_caller(
                    f"the admission state ({len(state) >> 20} MiB compressed) is too big "
                    f"for {self.tier.store_name}'s clock record (at most "
                    f"{MAX_STORED_ADMISSION >> 20} MiB), so it is not stored: a table "
                    "reopened over the store without a checkpoint counts keys from zero")
        return clock

    _warned_admission_size = False

    def _adopt_store_clock(self) -> None:
        """Continues from the clock recorded in the store by the last flush, so a table
        reopened over it trains on as the one that wrote it would: Adam's bias correction
        and Adagrad's lr decay count on, and the rows' ``last_step`` (up to that clock) are
        compared by eviction and TTL with a step after them, not before. Never backwards
        (the max with the table's own); a store without a clock record (new, emptied, or
        written before stores kept one) leaves the clock as it is.

        The recorded initializer seed is taken, as a checkpoint's restore takes its own:
        keys new to the store then get the rows they would have got in the table that wrote
        it (with ``seed=None`` each process draws another).

        A store that holds rows but no clock was written to and then neither flushed nor
        closed (its process crashed, or a checkpoint restore dropped the clock and the job
        stopped before its next flush): a training table warns at its first write (a
        training lookup, a row verb, a flush), as it would start at step 0 with its own seed
        over rows from some later step. A checkpoint restored or the store emptied before
        that settles it quietly: a job restarted under torchrun, whose restore deals with
        the store, warned at every restart.

        Raises:
            StoreError: the store failed, or its clock record is damaged.
        """
        clock = self.tier.read_clock()
        if clock is None:
            if not self.read_only and self.tier.holds_rows():
                self._pending_store_warning = (
                    f"{self.tier.store_name} holds rows but no clock record: the table that "
                    "wrote them did not flush or close it (a crash?), so they are rows of "
                    "some later step, and this table went on from step 0 with its own seed. "
                    "For an exact resume restore a checkpoint before training "
                    "(CheckpointManager.restore and Runtime ask what to do with such a "
                    "store: used_stores=), or empty the store with table.start_over()")
            return
        self.step = max(self.step, clock["step"])
        self.update_step = max(self.update_step, clock["update_step"])
        if clock.get("seed", self.seed) != self.seed:
            if self.config.seed is not None:
                warn_at_caller(f"{self.tier.store_name} was written by a table with seed="
                               f"{clock['seed']}: this table continues with it, not with "
                               f"seed={self.config.seed}, so new keys get the rows they would "
                               "have got there (empty the store with table.start_over() to "
                               "begin afresh with your seed)")
            self.seed = clock["seed"]
            if self.admitter is not None:  # its hashes follow the table seed; it saw no key
                self.admitter = self.config.admission.create(self.seed)
        if self.admitter is not None and clock.get("admission") is not None:
            self._adopt_store_admission(clock["admission"])
        if self.evictor is not None:  # as after a checkpoint: the rows' times are unknown
            self.evictor.clock.reset(self.step)
        if self.key_log is not None and not self.read_only and clock.get("logged_keys"):
            # the strings live in checkpoints, not in the store: said at the first write,
            # unless a checkpoint's restore (which brings them) comes first
            self._pending_store_warning = (
                f"{self.tier.store_name} holds rows of an earlier table but not the "
                f"{clock['logged_keys']:,} strings of its key log (checkpoints keep them; "
                "stores keep rows): those rows' keys are not listed until they are looked "
                "up again. Restore a checkpoint to have every key's string")

    def _adopt_store_admission(self, raw: bytes) -> None:
        """Takes the admission state a flush recorded, so keys counted before it are
        admitted as they would have been without the reopen (a policy built with other
        settings starts empty, with a warning)."""
        try:
            state = torch.load(io.BytesIO(zlib.decompress(raw)), weights_only=True)
            admitter = self.config.admission.create(self.seed)
            admitter.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - another policy's or damaged: start afresh
            warn_at_caller(f"{self.tier.store_name}: the admission state its last flush "
                           f"recorded does not load into this table's policy ({e}); "
                           "admission starts empty (keys are counted from now on)")
            return
        self.admitter = admitter

    _pending_store_warning: str | None = None
    """The warning of :meth:`_adopt_store_clock`, until the first write gives it or a
    restore or an emptied store makes it moot."""

    @contextlib.contextmanager
    def _settling_pending_store(self) -> Iterator[None]:
        """Within: a write that empties the store, which settles the warning of
        :meth:`_adopt_store_clock` (not given); kept for the next write if it fails."""
        pending, self._pending_store_warning = self._pending_store_warning, None
        try:
            yield
        except BaseException:
            self._pending_store_warning = pending
            raise

    def _warn_pending_store(self) -> None:
        """Gives the warning :meth:`_adopt_store_clock` kept, once, at the first write."""
        if self._pending_store_warning is not None:
            message, self._pending_store_warning = self._pending_store_warning, None
            warn_at_caller(message)

