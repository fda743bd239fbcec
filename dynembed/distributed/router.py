"""The router: how a module's lookups reach rows that live on other ranks.

A module's lookup touches one or several tables (an EmbeddingCollection looks every table
up in one call); the router serves all of them with a fixed number of collectives, however
many tables there are:

- *sharded* tables: each distinct id goes to the rank that owns its key bucket. One
  all-to-all of sizes and one of ``(id, count, table)`` triples carry the requests; each
  owner merges the requests of all ranks per table (so a key's count and its one optimizer
  update cover the whole global batch), looks the ids up in its shard, and one all-to-all
  of the packed rows (tables of any dims, flattened) brings them back. Backward sends each
  row's gradient to its owner the same way; the owner sums the parts per id and applies
  the sparse optimizer once. Each rank's part of both row exchanges carries a flag, so a
  failure on one rank raises on every rank in the same collective (and the ranks stay in
  step): forward, whether the owner's lookup failed (a memory budget, a store); backward,
  whether the requester computed NaN or inf gradients for a table that raises on them.
- *replicated* tables: a training lookup all-gathers the ranks' ``(id, count, table)``
  triples so every replica inserts and touches the same rows, and backward all-gathers the
  gradients so every replica applies the same update. A replica's lookup can fail alone
  (its own store or memory budget), so one more small all-gather of a flag per training
  lookup makes every rank raise then. Evaluation reads the local replica.

The sizes that open a lookup carry a tag of the call (placement, tables, dims, mode): ranks
that pair different lookups (another module, or one rank in eval mode) raise at once on
every rank, instead of swapping payloads, which gloo answers by aborting the process or,
when the sizes match by chance, by mixing up the tables' rows.

Gradients are averaged over ranks (scaled by 1/W, as DDP averages dense gradients), so a job
of W ranks with a global batch of B trains like one process with batch B.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from dynembed.distributed.exchange import Exchange
from dynembed.distributed.key_strings import send_strings_to_owners, share_with_replicas
from dynembed.errors import DistributedError, NonFiniteGradientError
from dynembed.kernels.gather import segment_sum
from dynembed.kernels.hash_index import unique_inverse
from dynembed.kernels.sparse_updates import nonfinite_rows
from dynembed.keys.buckets import NUM_BUCKETS, buckets_of, rank_of_bucket
from dynembed.nn._autograd import Lookup, anchor_grad, note_fused_step
from dynembed.table.arena import take_rows
from dynembed.table.index import EMPTY
from dynembed.table.loss_scale import current_loss_scale, report_inf_check
from dynembed.table.table import DynamicTable


def _merge(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ids of several ranks' requests, their inverse, and summed counts."""
    unique, inverse, _ = unique_inverse(ids)
    summed = np.bincount(inverse, weights=counts, minlength=unique.shape[0])
    return unique, inverse, summed.astype(np.int64)


class _Packing:
    """Where each entry's row lies in a flat float32 buffer holding several tables' rows
    back to back (entry k's row starts at ``offsets[k]``).

    With one row width for every entry the buffer is a plain (entries, width) array and
    rows move by row index; mixed widths need every float's position, which costs about
    ten times as much (writing 65,536 rows of 64: 7.7 ms against 0.8 ms).

    Args:
        widths: (entries,) int64 row width of each entry, in buffer order.
    """

    def __init__(self, widths: np.ndarray) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(widths)])
        self.size = int(self.offsets[-1])
        uniform = bool(widths.size) and bool((widths == widths[0]).all())
        self._width = int(widths[0]) if uniform else None
        """The one width of every entry (None if mixed). A table of another width may still
        ask for its entries: it has none in this buffer."""

    def _cells(self, entries: np.ndarray, dim: int) -> np.ndarray:
        return (self.offsets[entries][:, None] + np.arange(dim)).ravel()

    def take(self, buf: np.ndarray, entries: np.ndarray, dim: int) -> np.ndarray:
        """(len(entries), dim) rows of ``entries`` (all of width ``dim``) from ``buf``."""
        if self._width == dim:
            return buf.reshape(-1, dim)[entries]
        return buf[self._cells(entries, dim)].reshape(-1, dim)

    def put(self, buf: np.ndarray, entries: np.ndarray, rows: np.ndarray) -> None:
        """Writes (len(entries), dim) ``rows`` as the rows of ``entries`` in ``buf``."""
        if self._width == rows.shape[1]:
            buf.reshape(-1, rows.shape[1])[entries] = rows
        else:
            buf[self._cells(entries, rows.shape[1])] = rows.ravel()


def _count_nonfinite(table: DynamicTable, grads: np.ndarray) -> int:
    """Counts (in the table's stats) and returns the rows of ``grads`` holding NaN or inf."""
    bad = int(np.count_nonzero(nonfinite_rows(np.ascontiguousarray(grads))))
    table.counters.nonfinite_gradients += bad
    return bad


def _flagged(widths: np.ndarray, per_rank: np.ndarray, flag_width: int,
             trailer: np.ndarray | None = None) -> tuple[_Packing, np.ndarray, np.ndarray]:
    """The packing of a buffer grouped by rank (``per_rank[r]`` entries of ``widths`` for
    rank r) with a trailer of ``trailer[r]`` (default 1) more entries of ``flag_width``
    floats after each rank's entries: its first float carries a flag, the rest what the
    caller puts there. Trailer entries as wide as the rows keep a one-width buffer a plain
    (rows, dim) array.

    Returns:
        (packing, (entries,) index of each entry in it, (W,) index of each rank's first
        trailer entry).
    """
    trailer = np.ones_like(per_rank) if trailer is None else trailer
    ends = np.cumsum(per_rank)
    before = np.cumsum(trailer) - trailer  # trailer entries ahead of each rank's rows
    rank_of_entry = np.repeat(np.arange(per_rank.shape[0]), per_rank)
    return (_Packing(np.insert(widths, np.repeat(ends, trailer), flag_width)),
            np.arange(widths.shape[0]) + before[rank_of_entry], ends + before)


def _masks_admission(table: DynamicTable, training: bool) -> bool:
    """Whether requesters must learn which of their rows the owner admitted: a NaN gradient
    on a row without one must not raise (see ``_sharded``). Config only (not
    ``torch.is_grad_enabled``), so every rank sizes the exchange alike."""
    c = table.config
    return (_trains(table, training) and c.admission is not None and table.trainable
            and c.nonfinite_grads == "raise")


def _wants_strings(table: DynamicTable, training: bool) -> bool:
    """Whether owners tell requesters which of their rows lack their key's string (see
    :mod:`~dynembed.distributed.key_strings`). Config only, as :func:`_masks_admission`."""
    return _trains(table, training) and table.key_log is not None


def _trailers(rows: np.ndarray, flag_width: int, masks: int) -> np.ndarray:
    """(W,) trailer entries after each rank's ``rows[r]`` rows: the flag float, then
    ``masks`` bit arrays of one bit per row, each packed 8 to a float (exact small
    integers)."""
    if not masks:
        return np.ones_like(rows)
    return -(-(1 + masks * ((rows + 7) // 8)) // flag_width)


def _put_masks(buf: np.ndarray, at: np.ndarray, bits: np.ndarray, per_rank: np.ndarray) -> None:
    """Writes each rank's part of the (n,) bool ``bits`` (``per_rank[r]`` in rank order) as
    bytes from float ``at[r]`` of ``buf``."""
    for r, part in enumerate(np.split(bits, np.cumsum(per_rank)[:-1])):
        packed = np.packbits(part)
        buf[at[r]:at[r] + packed.shape[0]] = packed


def _take_masks(buf: np.ndarray, at: np.ndarray, per_rank: np.ndarray) -> np.ndarray:
    """The (sum(per_rank),) bool bits written by :func:`_put_masks`, in rank order."""
    return np.concatenate([
        np.unpackbits(buf[a:a + (n + 7) // 8].astype(np.uint8), count=int(n)).astype(bool)
        for a, n in zip(at, per_rank)])


def _lookup_failed(flags: np.ndarray, dims: np.ndarray, *,
                   replicated: bool = False) -> DistributedError:
    """The error of ranks whose owner lookup did not fail, given the (W,) flags (table + 1,
    0 if fine) that the owners (with ``replicated``, the replicas) sent."""
    failed = ", ".join(f"rank {r} (table {int(flags[r]) - 1} of this lookup, dim "
                       f"{dims[int(flags[r]) - 1]})" for r in np.flatnonzero(flags))
    where = "a replica of a replicated table" if replicated else \
        "the owner of some of its rows"
    # the other replicas took the lookup (rows inserted and counted): only a restore makes
    # the replicas equal again
    after = (", but the other replicas took the lookup, so the replicas may now differ: "
             "restore the last checkpoint on every rank, or stop." if replicated else
             ": skip the batch on every rank or stop.")
    return DistributedError(
        f"the lookup failed on {where}: {failed}; no rank got its rows. "
        "That rank raised the cause (e.g. MemoryBudgetError: raise its memory_budget / "
        "max_rows or use smaller batches; StoreError: check its store). Every rank raised "
        "in this call, so the ranks are still in step" + after)


class _Update:
    """One table's gradient step after a routed lookup: the merged ids and their slots."""

    def __init__(self, table: DynamicTable, ids: np.ndarray, slots: np.ndarray,
                 inverse: np.ndarray) -> None:
        self.table, self.ids, self.slots, self.inverse = table, ids, slots, inverse
        self.erasures = table.erasures

    def count_dropped(self) -> None:
        """Counts the update's rows as dropped (not admitted, or skipped): a NaN elsewhere
        made every rank raise before any row changed."""
        admitted = int(np.count_nonzero(self.slots != EMPTY))
        counters = self.table.counters
        counters.unadmitted_gradients += self.slots.shape[0] - admitted
        counters.skipped_gradients += admitted

    def apply(self, grads: np.ndarray, scale: float) -> None:
        """Scales the (entries, dim) gradient parts, sums them per id and updates the rows.

        Scaled first: the W ranks' parts of a large gradient could overflow to inf as a sum
        where the one-process gradient (their scaled sum) does not, and then only this
        owner would raise (NonFiniteGradientError) while the other ranks went on.
        """
        grads = np.ascontiguousarray(grads, dtype=np.float32)
        if scale != 1.0:
            grads = grads * np.float32(scale)
        summed = segment_sum(grads, self.inverse, self.ids.shape[0])
        note_fused_step(self.table, self.ids)
        self.table.apply_gradients(self.ids, self.slots, torch.from_numpy(summed),
                                   erasures_at_lookup=self.erasures)


class _RoutedRows(torch.autograd.Function):
    """Rows fetched by the router, one output per table; backward hands the gradients back
    to the router (one exchange for all tables)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, fetched: tuple):
        rows, ctx.route_backward = fetched  # a tuple: autograd does not see rows as inputs
        ctx.anchor = (anchor.dtype, anchor.device)
        return tuple(rows)

    @staticmethod
    def backward(ctx, *grads):
        ctx.route_backward(grads)
        return anchor_grad(*ctx.anchor), None


def _trains(table: DynamicTable, training: bool) -> bool:
    return training and not table.read_only


def _needs_grad(table: DynamicTable, training: bool, anchor: torch.Tensor) -> bool:
    # anchor: the calling module's, which requires_grad_(False) freezes
    return (_trains(table, training) and table.trainable and anchor.requires_grad
            and torch.is_grad_enabled())


class Router:
    """Routes the lookups and gradients of a job's tables (shared by all of them).

    Args:
        exchange: the collectives of the job's row-exchange group.
        num_buckets: key buckets (the checkpoints' unit; rank r owns a contiguous range).
        grad_scale: factor on the summed gradient of each row (default 1/W: the average
            over ranks, matching DDP).
        tables: the job's tables by name (the same names on every rank): lookups name them
            in the check that every rank makes the same lookup.
    """

    def __init__(self, exchange: Exchange, *, num_buckets: int = NUM_BUCKETS,
                 grad_scale: float | None = None,
                 tables: dict[str, DynamicTable] | None = None) -> None:
        self.exchange = exchange
        self.num_buckets = num_buckets
        self.grad_scale = 1.0 / exchange.world_size if grad_scale is None else grad_scale
        self._names = {id(table): name for name, table in (tables or {}).items()}

    def _open(self, placement: str, lookups: list[Lookup], training: bool,
              send: np.ndarray) -> np.ndarray:
        """Exchanges the sizes that open a lookup, tagged with what this rank looks up, and
        raises on every rank unless every rank makes the same lookup.

        Args:
            placement: of the lookup's tables ("sharded" or "replicated").
            lookups: the tables looked up, in order.
            training: the module's mode.
            send: (W,) sizes this rank sends to each rank.

        Returns:
            (W,) int64 sizes each rank sends to this one.

        Raises:
            DistributedError: ranks made different lookups (other tables, or another mode);
                raised on every rank, in this collective, before any row changed.
        """
        what = (f"{placement} tables "
                + ", ".join(f"{self._names.get(id(lk.table), '?')!r} (dim {lk.table.dim})"
                            for lk in lookups)
                + f" in {'training' if training else 'eval'} mode")
        # a hash of the text, not hash(): str hashes differ per process
        tag = int.from_bytes(hashlib.blake2b(what.encode(), digest_size=8).digest(),
                             "little", signed=True)
        recv, tags = self.exchange.splits(send, tag)
        others = np.flatnonzero(tags != tag)
        if others.size:  # every rank sees every tag, so every rank raises here
            raise DistributedError(
                f"ranks {others.tolist()} made a different lookup than rank "
                f"{self.exchange.rank}, which looked up {what}; no rows were exchanged. Every "
                "rank must look up the same modules in the same order and mode (train/eval), "
                "and back-propagate through every training lookup")
        return recv

    def owners(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 rank owning each of (n,) int64 ids."""
        return rank_of_bucket(buckets_of(ids, self.num_buckets), self.exchange.world_size,
                              self.num_buckets)

    def rows(self, table: DynamicTable, anchor: torch.Tensor, unique_ids: np.ndarray,
             counts: np.ndarray, *, training: bool, strings=None,
             string_ids: np.ndarray | None = None) -> torch.Tensor:
        """Rows of one table's distinct ids (see :meth:`rows_many`)."""
        return self.rows_many([Lookup(table, unique_ids, counts, strings, string_ids)],
                              anchor, training=training)[0]

    def rows_many(self, lookups: list[Lookup], anchor: torch.Tensor, *,
                  training: bool) -> list[torch.Tensor]:
        """Rows of each lookup's distinct ids, from their owners (sharded tables) or the
        local replica (replicated ones).

        Every rank must call it for the same tables in the same order and mode (a
        collective).

        Args:
            lookups: one per table of the module's call.
            anchor: the module's grad anchor.
            training: insert missing rows and track gradients (the module's mode).

        Returns:
            One (u, dim) float32 tensor per lookup, differentiable when training with grad
            enabled.

        Raises:
            DistributedError: the lookup failed on the owner of some rows (or on a replica:
                another rank), which raised the cause itself (e.g. MemoryBudgetError,
                StoreError); or the ranks made different lookups (other tables, or another
                mode). Every rank raises in the same call, so the ranks stay in step.
        """
        out: list[torch.Tensor | None] = [None] * len(lookups)
        for placement, serve in (("sharded", self._sharded), ("replicated", self._replicated)):
            which = [i for i, lk in enumerate(lookups)
                     if lk.table.config.placement == placement]
            if which:
                for i, rows in zip(which, serve([lookups[i] for i in which], anchor,
                                                training)):
                    out[i] = rows
        return out

    # ------------------------------------------------------------------ sharded tables
    def _sharded(self, lookups: list[Lookup], anchor: torch.Tensor,
                 training: bool) -> list[torch.Tensor]:
        ex = self.exchange
        sizes = np.array([lk.ids.shape[0] for lk in lookups])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        dims = np.array([lk.table.dim for lk in lookups])
        table_of = np.repeat(np.arange(len(lookups)), sizes)
        ids = np.concatenate([lk.ids for lk in lookups])
        owners = self.owners(ids)
        order = np.argsort(owners, kind="stable")  # by owner, then table, then id
        send = np.bincount(owners, minlength=ex.world_size)
        recv = self._open("sharded", lookups, training, send)
        request = np.stack([ids[order], np.concatenate([lk.counts for lk in lookups])[order],
                            table_of[order]], axis=1)
        got = ex.all_to_all(torch.from_numpy(request), send, recv).numpy()

        # Owner: merge every rank's requests per table, look them up, pack the rows. The
        # rows go back with a trailer per rank (see _flagged): a flag, table + 1 if this
        # owner's lookup failed, so every rank raises in this collective instead of
        # waiting in it for a rank that raised before it (and the ranks stay in step).
        got_table = got[:, 2]
        got_width = dims[got_table]
        sent_table = table_of[order]
        flag_width = int(dims[0])
        # A gradient row of a key its owner did not admit (slot EMPTY: it read the default
        # vector) is dropped by the owner before the optimizer, so, as in one process, its
        # NaN must not raise. Requesters flag NaN for every rank before owners see the
        # gradients, so owners tell them which rows they admitted: one bit per row in the
        # trailer, and only for lookups with a table that needs it (1/(8 * dim) more bytes).
        # An owner-side check would need one more collective per backward to tell the
        # other ranks; a column per row would cost 1/dim and break the one-width buffer.
        masked = [t for t, lk in enumerate(lookups) if _masks_admission(lk.table, training)]
        # and a second bit per row for key-logged tables: the owner lacks its key's string
        keyed = [t for t, lk in enumerate(lookups) if _wants_strings(lk.table, training)]
        masks = bool(masked) + bool(keyed)
        trailer_back = _trailers(recv, flag_width, masks)
        trailer_mine = _trailers(send, flag_width, masks)
        got_flagged, got_index, got_flags = _flagged(got_width, recv, flag_width, trailer_back)
        packed = np.empty(got_flagged.size, dtype=np.float32)
        admitted = np.ones(got.shape[0], dtype=bool) if masked else None
        lacking = np.zeros(got.shape[0], dtype=bool) if keyed else None
        updates: list[tuple[int, _Update, np.ndarray]] = []
        failure, failed = None, 0
        for t, lk in enumerate(lookups):
            entries = np.flatnonzero(got_table == t)
            merged_ids, inverse, counts = _merge(got[entries, 0], got[entries, 1])
            try:
                if _trains(lk.table, training):
                    created = np.zeros(merged_ids.shape[0], dtype=bool) if t in keyed else None
                    slots = lk.table.lookup_slots(merged_ids, counts, insert=True,
                                                  created_out=created)
                    owned = lk.table.gather(slots)
                    if _needs_grad(lk.table, training, anchor):
                        updates.append((t, _Update(lk.table, merged_ids, slots, inverse),
                                        entries))
                    if t in masked:
                        admitted[entries] = (slots != EMPTY)[inverse]
                    if t in keyed:  # a new row: its log lacks the string (as in one
                        lacking[entries] = created[inverse]  # process, logged at creation)
                else:
                    owned = lk.table.read_unique(merged_ids, counts)
            except Exception as error:  # noqa: BLE001 - raised on every rank, after the exchange
                failure, failed = error, t + 1
                break
            got_flagged.put(packed, got_index[entries], take_rows(owned, inverse).numpy())
        packed[got_flagged.offsets[got_flags]] = failed
        bits_back = got_flagged.offsets[got_flags] + 1
        if masked:
            _put_masks(packed, bits_back, admitted, recv)
        if keyed:
            _put_masks(packed, bits_back + (recv + 7) // 8 * bool(masked), lacking, recv)
        source = np.repeat(np.arange(ex.world_size), recv)
        floats_back = np.bincount(source, weights=got_width, minlength=ex.world_size)
        floats_mine = np.bincount(owners[order], weights=dims[sent_table],
                                  minlength=ex.world_size)
        floats_back, floats_mine = floats_back.astype(np.int64), floats_mine.astype(np.int64)
        back = ex.all_to_all(torch.from_numpy(packed), floats_back + trailer_back * flag_width,
                             floats_mine + trailer_mine * flag_width).numpy()

        # Requester: check the owners' flags, unpack the rows in each table's id order.
        sent_flagged, sent_index, sent_flags = _flagged(dims[sent_table], send, flag_width,
                                                        trailer_mine)
        flags = back[sent_flagged.offsets[sent_flags]].astype(np.int64)
        if flags.any():
            raise failure if failure is not None else _lookup_failed(flags, dims)
        bits_mine = sent_flagged.offsets[sent_flags] + 1
        admitted_mine = _take_masks(back, bits_mine, send) if masked else None
        lacking_mine = (_take_masks(back, bits_mine + (send + 7) // 8 * bool(masked), send)
                        if keyed else None)
        rows, where, wanted = [], [], []
        for t, lk in enumerate(lookups):
            entries = np.flatnonzero(sent_table == t)
            position = order[entries] - starts[t]  # index into the lookup's ids
            block = np.empty((lk.ids.shape[0], dims[t]), dtype=np.float32)
            block[position] = sent_flagged.take(back, sent_index[entries], dims[t])
            rows.append(torch.from_numpy(block))
            # the rows whose NaN gradients raise: those with a row on their owner
            where.append((entries, position, admitted_mine[entries] if t in masked else None))
            if t in keyed:
                asked = entries[lacking_mine[entries]]
                wanted.append((lk, request[asked, 0], owners[order][asked]))
        if keyed:  # a collective: every rank has the same keyed tables
            send_strings_to_owners(ex, wanted)
        if not updates:
            return rows

        raising = [t for t, update, _ in updates if update.table.config.nonfinite_grads == "raise"]
        # Gradients go back with one flag entry per rank: whether the sender computed NaN or
        # inf gradients for a table that raises on them, so every rank raises (before any
        # row changes), not only the owners of those rows. The forward's buffers have the
        # same layout, without the bits.
        if masks:
            sent_flagged, sent_index, sent_flags = _flagged(dims[sent_table], send, flag_width)
            got_flagged, got_index, got_flags = _flagged(got_width, recv, flag_width)

        def backward(grads) -> None:
            # within de.loss_scale an overflow in any table skips every rank's update of
            # this backward (as the scaler skips its step) instead of raising
            scaled = current_loss_scale() is not None
            flat = np.zeros(sent_flagged.size, dtype=np.float32)
            flag = 0
            for t, (entries, position, admitted_rows) in enumerate(where):
                if grads[t] is not None:
                    g = grads[t].detach().to(torch.float32).numpy()[position]
                    checked = g if admitted_rows is None else g[admitted_rows]
                    if (scaled or t in raising) \
                            and _count_nonfinite(lookups[t].table, checked) and not flag:
                        flag = t + 1
                    sent_flagged.put(flat, sent_index[entries], g)
            flat[sent_flagged.offsets[sent_flags]] = flag
            parts = ex.all_to_all(torch.from_numpy(flat), floats_mine + flag_width,
                                  floats_back + flag_width).numpy()
            flags = parts[got_flagged.offsets[got_flags]].astype(np.int64)
            if scaled:  # every rank's scaler backs off when any rank's table overflowed
                report_inf_check(bool(flags.any()))
            if flags.any():
                bad_rank = int(np.flatnonzero(flags)[0])
                t = int(flags[bad_rank]) - 1
                for _, update, _ in updates:  # none applied: counted as in one process
                    update.count_dropped()
                if scaled:  # skipped on every rank (reported above), as the scaler skips
                    return
                raise NonFiniteGradientError(
                    f"rank {bad_rank} computed NaN or inf gradients for a table with "
                    f"nonfinite_grads='raise' (table {t} of this lookup, dim {dims[t]}); no "
                    "row was updated on any rank. Fix the loss (e.g. clamp logits), or set "
                    "nonfinite_grads='skip' to drop such rows and count them.")
            for t, update, entries in updates:
                update.apply(got_flagged.take(parts, got_index[entries], dims[t]),
                             self.grad_scale)

        return list(_RoutedRows.apply(anchor, (rows, backward)))

    # ------------------------------------------------------------------ replicated tables
    def _replicated(self, lookups: list[Lookup], anchor: torch.Tensor,
                    training: bool) -> list[torch.Tensor]:
        if not training:  # every rank holds every row: read locally
            return [lk.table.read_unique(lk.ids, lk.counts) for lk in lookups]
        ex = self.exchange
        sizes = np.array([lk.ids.shape[0] for lk in lookups])
        dims = np.array([lk.table.dim for lk in lookups])
        request = np.stack([np.concatenate([lk.ids for lk in lookups]),
                            np.concatenate([lk.counts for lk in lookups]),
                            np.repeat(np.arange(len(lookups)), sizes)], axis=1)
        per_rank = self._open("replicated", lookups, training,
                              np.full(ex.world_size, request.shape[0]))
        everyone, _ = ex.all_gather(torch.from_numpy(request), sizes=per_rank)
        everyone = everyone.numpy()
        source = np.repeat(np.arange(ex.world_size), per_rank)
        table_of = everyone[:, 2]
        packing = _Packing(dims[table_of])
        # Each replica looks up with its own store and memory budget, so one can fail
        # alone; a flag per rank makes every rank raise here, instead of the others going
        # on to a backward (or next lookup) that this rank never joins.
        found: list = []
        failure, failed = None, 0
        for t, lk in enumerate(lookups):
            try:
                if not _trains(lk.table, training):  # a read-only replica: read locally
                    found.append(lk.table.read_unique(lk.ids, lk.counts))
                    continue
                entries = np.flatnonzero(table_of == t)
                merged_ids, inverse, counts = _merge(everyone[entries, 0],
                                                     everyone[entries, 1])
                created = np.zeros(merged_ids.shape[0], dtype=bool)
                slots = lk.table.lookup_slots(merged_ids, counts, insert=True,
                                              created_out=created)
            except Exception as error:  # noqa: BLE001 - raised on every rank, after the flags
                failure, failed = error, t + 1
                break
            found.append((entries, merged_ids, inverse, slots, created))
        flags, _ = ex.all_gather(torch.tensor([failed], dtype=torch.int64),
                                 sizes=np.ones(ex.world_size, dtype=np.int64))
        flags = flags.numpy()
        if flags.any():
            raise failure if failure is not None else \
                _lookup_failed(flags, dims, replicated=True)
        rows, updates, logged = [], [], []
        for t, (lk, got) in enumerate(zip(lookups, found)):
            if isinstance(got, torch.Tensor):
                rows.append(got)
                continue
            entries, merged_ids, inverse, slots, created = got
            mine = inverse[source[entries] == ex.rank]  # this rank's ids, in its order
            if lk.table.key_log is not None:  # the new rows (every replica made them)
                logged.append((lk, created[mine]))
            rows.append(lk.table.gather(slots[mine]))
            if _needs_grad(lk.table, training, anchor):
                updates.append((t, _Update(lk.table, merged_ids, slots, inverse), entries))
        if logged:  # a collective: every rank has the same key-logged tables
            share_with_replicas(ex, logged)
        if not updates:
            return rows
        floats = np.bincount(source, weights=dims[table_of],
                             minlength=ex.world_size).astype(np.int64)

        def backward(grads) -> None:
            flat = []
            for t, lk in enumerate(lookups):
                g = grads[t]
                flat.append(np.zeros(sizes[t] * dims[t], dtype=np.float32) if g is None
                            else g.detach().to(torch.float32).numpy().ravel())
            parts, _ = ex.all_gather(torch.from_numpy(np.concatenate(flat)), sizes=floats)
            parts = parts.numpy()
            for t, update, entries in updates:
                update.apply(packing.take(parts, entries, dims[t]), self.grad_scale)

        return list(_RoutedRows.apply(anchor, (rows, backward)))
