"""Gradients into rows: the optimizer applied at once (fused) or queued (deferred).

:class:`TableUpdates` is a mixin of :class:`~dynembed.table.table.DynamicTable`. Rows may
have been evicted or erased between a lookup and its backward: evicted rows get their
gradient (read back from the store if need be), erased ones do not (skipped and counted).
"""

from __future__ import annotations

import numpy as np
import torch

from dynembed._caller import warn_at_caller
from dynembed.errors import NonFiniteGradientError, StoreError
from dynembed.kernels.hash_index import unique_inverse
from dynembed.kernels.sparse_updates import nonfinite_rows
from dynembed.table.index import EMPTY
from dynembed.table.lifecycle import CREATE_NONE
from dynembed.table.loss_scale import current_loss_scale, report_inf_check

QUEUED_BACKWARDS_WARNING = 1024
"""Backward calls queued in deferred mode without a step at which a table warns (once per
accumulation: gradient accumulation queues a few; a forgotten ``sparse_step`` queues one per
step, trains nothing and grows without end)."""


class TableUpdates:
    """The update methods of a table (mixin; see module doc)."""

    def apply_gradients(self, ids: np.ndarray, slots: np.ndarray, grads: torch.Tensor, *,
                        erasures_at_lookup: int | None = None,
                        marked_at: int | None = None) -> None:
        """Applies the optimizer to rows, or queues the gradients in deferred mode.

        Args:
            ids: (u,) int64 distinct ids the gradient rows belong to.
            slots: (u,) int64 their slots at lookup time (EMPTY rows are skipped).
            grads: (u, dim) combined gradient per id.
            erasures_at_lookup: ``self.erasures`` when the slots were looked up. If rows were
                removed since (or this is None), the ids are looked up again: rows evicted
                since get their gradient (read back from the store if need be), rows erased
                since do not (skipped and counted), even if their key has a new row.
            marked_at: ``self.changes.resets`` when the lookup marked the slots changed for
                the next checkpoint (training lookups do). If no checkpoint cleared the marks
                since and no row moved, the update skips marking them again (a pass of
                random writes, 4% of a 65,536-key SGD step).

        Raises:
            ValueError, TypeError: the arrays do not have the shapes and types above;
                nothing was applied.
            NonFiniteGradientError: a row is NaN/inf and ``nonfinite_grads="raise"``; nothing
                was applied. Within :func:`~dynembed.table.loss_scale.loss_scale` the
                gradient is divided by the loss scale first, and an overflow skips the whole
                update (counted) instead.
            StoreError: reading rows evicted since the lookup back failed; nothing was
                applied and the gradients were dropped (counted as skipped).
        """
        if not self.trainable:
            return
        self._check_gradient_batch(ids, slots, grads)
        grads = grads.detach().to("cpu", torch.float32).contiguous()
        epoch = erasures_at_lookup
        admitted = slots != EMPTY
        if not admitted.all():  # counted here, and not again as skipped by _apply
            self.counters.unadmitted_gradients += int(np.count_nonzero(~admitted))
            ids, slots = ids[admitted], slots[admitted]
            grads = grads[torch.from_numpy(admitted)]
        scale = current_loss_scale()
        if scale is not None:
            grads = grads / scale
            if self._overflowed(grads.numpy()):
                return
        if self.config.update_mode == "deferred":
            self._pending.append((ids, grads, self.erasures if epoch is None else epoch))
            self._count_queued_backward()
            return
        marked = marked_at is not None and self.changes.marks_stand(marked_at)
        if epoch is None or epoch != self.erasures:  # rows erased or evicted since the lookup
            try:
                slots = self._resolve_again(ids, epoch)
            except StoreError:  # nothing applied: every gradient of the call is dropped
                self.counters.skipped_gradients += ids.shape[0]
                raise
            marked = False  # rows read back since have new slots
        self._apply(ids, slots, grads.numpy(), marked=marked)

    def _count_queued_backward(self) -> None:
        """Counts the backward calls (autograd graph tasks) whose gradients wait in the
        deferred queue, and warns when they reach :data:`QUEUED_BACKWARDS_WARNING`."""
        task = torch._C._current_graph_task_id()  # -1 outside a backward (direct calls)
        if len(self._pending) == 1:  # the queue was empty (a step or a reset emptied it)
            self._queued_backwards, self._queued_task = 1, task
        elif task != self._queued_task or task == -1:
            self._queued_backwards += 1
            self._queued_task = task
            if self._queued_backwards == QUEUED_BACKWARDS_WARNING:
                queued = sum(g.nbytes for _, g, _ in self._pending)
                warn_at_caller(
                    f"a deferred dynembed table (dim={self.dim}) has the gradients of "
                    f"{self._queued_backwards} backward calls queued ({queued / 2**20:.0f} "
                    "MiB) and no optimizer step: nothing trains until de.sparse_step(model) "
                    "(or table.step_optimizer()) applies them; call it where the dense "
                    "optimizer steps", RuntimeWarning)

    def _overflowed(self, grads: np.ndarray) -> bool:
        """Within :func:`~dynembed.table.loss_scale.loss_scale`: whether the gradient
        overflowed (a row holds inf or NaN), in which case this backward's update is
        skipped, as the scaler skips its step, and counted (not raised: the scaler is told,
        lowers its scale and the next step goes on)."""
        bad = int(np.count_nonzero(nonfinite_rows(grads)))
        if bad:
            self.counters.nonfinite_gradients += bad
            self.counters.skipped_gradients += grads.shape[0]
        report_inf_check(bad > 0)
        return bad > 0

    def _check_gradient_batch(self, ids, slots, grads) -> None:
        """Refuses arrays that do not fit together: the kernels read ``grads[i]`` for every
        slot without bounds checks, so a short or narrow ``grads`` would be read past its
        end (and the skipped count would go negative)."""
        for name, array in (("ids", ids), ("slots", slots)):
            if not isinstance(array, np.ndarray) or array.dtype != np.int64 or array.ndim != 1:
                raise TypeError(f"{name} must be a (u,) int64 numpy array, got "
                                f"{getattr(array, 'dtype', type(array).__name__)} of shape "
                                f"{getattr(array, 'shape', None)}")
        if slots.shape != ids.shape:
            raise ValueError(f"slots must have one entry per id, shape {ids.shape}, got "
                             f"{slots.shape}")
        if not isinstance(grads, torch.Tensor):
            raise TypeError(f"grads must be a torch.Tensor, got {type(grads).__name__}")
        if tuple(grads.shape) != (ids.shape[0], self.dim):
            raise ValueError(f"grads must have shape ({ids.shape[0]}, {self.dim}): one row "
                             f"of the table's dim per id, got {tuple(grads.shape)}")

    def _resolve_again(self, ids: np.ndarray, epoch: int | None) -> np.ndarray:
        """Current slots of ids looked up at erasure epoch ``epoch``: rows evicted since are
        found again (read back from the store if need be); rows erased since, even if their
        key has a new row now, get EMPTY (their gradient is skipped and counted). With
        ``epoch`` None (unknown) only the current slots are found."""
        slots = self.index.find(ids)
        if self.tier is not None:
            self._fill_missing(ids, np.ones_like(ids), slots, create=CREATE_NONE,
                               step=self.step)
        wiped, erased = (False, ids[:0]) if epoch is None else self._erased_since(epoch)
        if wiped:
            slots[:] = EMPTY
        elif erased.shape[0]:
            slots[np.isin(ids, erased)] = EMPTY
        return slots

    def _apply(self, ids: np.ndarray, slots: np.ndarray, grads: np.ndarray, *,
               new_step: bool = True, marked: bool = False) -> int:
        """Runs the optimizer on rows whose slot is not EMPTY (the others are counted as
        skipped); returns how many were updated. ``new_step`` False reuses the current
        update step (later chunks of one deferred step); ``marked``: the slots are marked
        changed for the next checkpoint already.

        Each call is an optimizer step even without a row to update, as torch counts a step
        for a parameter whose sparse gradient is empty: so the shards of a distributed
        table, some of which get no rows in a step, keep one step count (Adam's bias
        correction, Adagrad's learning-rate decay)."""
        valid = slots != EMPTY
        bad = nonfinite_rows(grads)
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            self.counters.nonfinite_gradients += n_bad
            if self.config.nonfinite_grads == "raise":
                self.counters.skipped_gradients += grads.shape[0]
                named = f"table {self.name!r}: " if self.name else ""
                raise NonFiniteGradientError(
                    f"{named}{n_bad} of {grads.shape[0]} gradient rows hold NaN or inf; no row was "
                    "updated (all counted in skipped_gradients). Fix the loss (e.g. clamp "
                    "logits), or set nonfinite_grads='skip' to drop such rows and count them.")
            valid &= ~bad
        n_valid = int(np.count_nonzero(valid))
        self.counters.skipped_gradients += grads.shape[0] - n_valid
        self.update_step += 1 if new_step else 0
        if n_valid == 0:
            return 0
        if n_valid < grads.shape[0]:
            slots, grads = slots[valid], np.ascontiguousarray(grads[valid])
        self.optimizer.apply(self.arena.np("weights"), self.arena.np("state"), slots, grads,
                             self.update_step)
        self.counters.updated_rows += n_valid
        self._changed(slots, marked=marked)
        return n_valid

    def step_optimizer(self) -> None:
        """Applies the gradients queued in deferred mode (summed per key), then clears them.

        Rows evicted to the store since their lookup are read back first; keys erased since
        are skipped and counted.

        Under a memory budget the keys are updated in chunks that fit, all with the same
        optimizer step.

        Raises:
            StoreError: reading evicted rows back failed; later chunks stay unapplied and
                the gradients are dropped (counted as skipped). Or a write-through failed
                after rows changed in memory: every chunk is applied first (the rows stay
                marked for the next flush), then the first such error is raised.
            NonFiniteGradientError: a summed row is NaN/inf and ``nonfinite_grads="raise"``;
                no row changed, and the queued gradients were dropped (counted as skipped).
        """
        queued = self._sum_queued()
        if queued is not None:
            self._apply_queued(*queued)

    def _sum_queued(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Takes the queued gradients and sums them per key: ``(unique ids, counts, (u, dim)
        summed rows)``, or None when nothing is queued. Changes no row.

        Raises:
            NonFiniteGradientError: as :meth:`step_optimizer` (the gradients are dropped).
        """
        if not self._pending:
            return None
        pending = self._pending
        unique, counts, summed, skipped = self._queue_summed()
        self._pending = []
        self.counters.skipped_gradients += skipped
        if unique.shape[0] == 0:
            return unique, counts, np.zeros((0, self.dim), np.float32)
        summed = summed.numpy()
        if self.config.nonfinite_grads == "raise" and nonfinite_rows(summed).any():
            try:
                self._apply(unique, np.full(unique.shape[0], EMPTY), summed)  # raises first
            except NonFiniteGradientError as e:
                raise NonFiniteGradientError(
                    f"{e} The gradients queued by {len(pending)} backward call(s) since the "
                    "last step_optimizer() were dropped.") from None
        return unique, counts, summed

    def _queue_summed(self) -> tuple[np.ndarray, np.ndarray, torch.Tensor, int]:
        """The queued gradients summed per key, leaving the queue as it is: ``(unique ids,
        counts, (u, dim) summed rows, gradient rows left out)``; the rows of keys erased
        since their lookup are left out (as a step skips them)."""
        kept, skipped = [], 0
        for ids, grads, epoch in self._pending:
            if epoch != self.erasures:
                wiped, erased = self._erased_since(epoch)
                keep = np.zeros(ids.shape[0], bool) if wiped else ~np.isin(ids, erased)
                skipped += int(np.count_nonzero(~keep))
                ids, grads = ids[keep], grads[torch.from_numpy(keep)]
            kept.append((ids, grads))
        ids = np.concatenate([k[0] for k in kept])
        grads = torch.cat([k[1] for k in kept])
        unique, inverse, counts = unique_inverse(ids)
        summed = torch.zeros((unique.shape[0], self.dim), dtype=torch.float32)
        summed.index_add_(0, torch.from_numpy(inverse), grads)
        return unique, counts, summed, skipped

    def queued_gradient_norm(self, norm_type: float = 2.0) -> float:
        """The ``norm_type``-norm of the gradient :meth:`step_optimizer` would apply now:
        the queued gradients summed per key, taken over all their elements as torch takes a
        Parameter's. Left out, as the step leaves them: keys erased since their lookup, and
        NaN/inf rows with ``nonfinite_grads="skip"``. 0.0 with nothing to apply."""
        if not self._pending:
            return 0.0
        summed = self._queue_summed()[2]
        if self.config.nonfinite_grads == "skip":
            summed = summed[torch.from_numpy(~nonfinite_rows(summed.numpy()))]
        if summed.numel() == 0:  # (torch has no inf norm of nothing)
            return 0.0
        return float(torch.linalg.vector_norm(summed, norm_type))

    def scale_queued_gradients(self, factor: float) -> None:
        """Multiplies the queued gradients by ``factor`` (gradient clipping)."""
        self._pending = [(ids, grads * factor, epoch) for ids, grads, epoch in self._pending]

    def _apply_queued(self, unique: np.ndarray, counts: np.ndarray, summed: np.ndarray) -> None:
        """The second half of :meth:`step_optimizer`: applies :meth:`_sum_queued`'s rows."""
        if unique.shape[0] == 0:
            self.update_step += 1  # a step all the same (see _apply)
            return
        write_error = None
        for chunk, part in enumerate(self._chunks(unique.shape[0])):
            slots = self.index.find(unique[part])
            if self.tier is not None:
                try:
                    self._fill_missing(unique[part], counts[part], slots, create=CREATE_NONE,
                                       step=self.step)
                except StoreError:
                    self.counters.skipped_gradients += unique.shape[0] - part.start
                    raise
            try:
                self._apply(unique[part], slots, np.ascontiguousarray(summed[part]),
                            new_step=chunk == 0)
            except StoreError as e:
                # A write-through failed after this chunk changed in memory (its rows stay
                # marked): stopping here would drop the later chunks' gradients uncounted.
                write_error = write_error or e
        if write_error is not None:
            raise write_error

    def zero_grad(self) -> None:
        """Drops gradients queued in deferred mode without applying them (their rows are
        counted in ``zeroed_gradients``)."""
        self.counters.zeroed_gradients += sum(ids.shape[0] for ids, _, _ in self._pending)
        self._pending = []

    def _drop_queued(self) -> None:
        """Drops the queued gradients unapplied, counted in ``skipped_gradients``."""
        self.counters.skipped_gradients += sum(ids.shape[0] for ids, _, _ in self._pending)
        self._pending = []

    @property
    def has_pending_gradients(self) -> bool:
        """Whether deferred-mode gradients wait for :meth:`step_optimizer`."""
        return bool(self._pending)


def step_together(tables: dict[str, TableUpdates]) -> None:
    """Applies the deferred gradients of several tables as one step (``de.sparse_step``).

    Every table's gradients are summed and checked before any row changes: when one table
    raises for NaN/inf gradients, no table changes and every table's queued gradients are
    dropped (counted in ``skipped_gradients``), so a caller that skips the bad batch starts
    the next one clean (applying the tables one by one left the first ones stepped and the
    last ones still queued, to be applied twice).

    Args:
        tables: the tables by the name errors should give them.

    Raises:
        NonFiniteGradientError: a table's summed gradients hold NaN/inf and it has
            ``nonfinite_grads="raise"``; the message names it.
        StoreError: as :meth:`TableUpdates.step_optimizer`.
    """
    summed = []
    for name, table in tables.items():
        try:
            summed.append((table, table._sum_queued()))
        except NonFiniteGradientError as e:
            for other, queued in summed:  # summed already: taken from their queues
                if queued is not None:
                    other.counters.skipped_gradients += queued[0].shape[0]
            for other in list(tables.values())[len(summed) + 1:]:
                other._drop_queued()
            named = "" if table.name else f"table {name!r}: "
            raise NonFiniteGradientError(
                f"{named}{e} No table changed: the other tables' queued gradients were "
                "dropped too (counted in skipped_gradients).") from None
    for table, queued in summed:
        if queued is not None:
            table._apply_queued(*queued)
