"""Whole-table copies: export (numpy, pandas) and state dicts of plain tensors.

:class:`TableSnapshot` is a mixin of :class:`~dynembed.table.table.DynamicTable`. With a
store, these cover the rows in the store too (the whole table must then fit in memory;
streaming, chunked checkpoints are :mod:`dynembed.checkpoint`'s job).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from dynembed._args import check_bool
from dynembed.errors import StateDictError
from dynembed.keys.key_log import KeyLog
from dynembed.storage.rows import RowBlock
from dynembed.table.arena import ID, LAST_STEP
from dynembed.table.eviction import FREE_STEP
from dynembed.table.index import EMPTY
from dynembed.table.results import TableExport
from dynembed.table.row_values import check_state_dict_rows

STATE_VERSION = 1
_STATE_LAYOUTS = {"SGD": 1, "Adagrad": 2, "RowWiseAdagrad": 3, "Adam": 4, "FTRL": 5}
"""What each optimizer's state floats mean, saved as ``meta[7]``: states of one width mean
different things (SGD's momentum and Adagrad's sums of squares; Adam's moments and FTRL's
z and n), and one read as the other trains rows into NaN. 0: none, or an optimizer of the
user's own (not checked)."""


def _state_layout(optimizer) -> int:
    return 0 if optimizer is None else _STATE_LAYOUTS.get(type(optimizer).__name__, 0)


def _in_host_memory(state):
    """A state dict's tensors on the CPU: one loaded with ``map_location="cuda"`` (or moved
    with a GPU model's) holds GPU tensors, which the numpy reads of its parts refused. Meta
    tensors stay, to be refused by name."""
    if not isinstance(state, Mapping):
        return state
    return {k: v.cpu() if isinstance(v, torch.Tensor) and v.device.type not in ("cpu", "meta")
            else v for k, v in state.items()}


_ROW_KEYS = ("ids", "weights", "optimizer_state", "counts", "last_step")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclasses.dataclass(frozen=True)
class AuxState:
    """What :meth:`TableSnapshot.read_aux_state` decoded, for
    :meth:`TableSnapshot.apply_aux_state`."""

    step: int
    update_step: int
    seed: int
    counters: dict[str, int]
    key_log: KeyLog | None
    admitter: object | None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        where = ("" if value.layout == torch.strided and value.device.type != "meta"
                 else f" ({value.layout} on {value.device})")
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}{where}"
    return type(value).__name__


def _check_row_tensor(name: str, value, *, floating: bool) -> None:
    """Raises StateDictError unless ``value`` is a dense tensor with values, of floating
    point (weights, optimizer state) or integer (ids, counts, steps) numbers.

    Checked before the table is cleared: a sparse tensor failed only when written into
    the arena, a meta tensor left the old arena's values in the rows, and complex or
    fractional numbers lost a part with at most a warning.
    """
    ok = (isinstance(value, torch.Tensor) and value.layout == torch.strided
          and value.device.type != "meta"
          and (value.dtype.is_floating_point if floating else value.dtype in _INT_DTYPES))
    if not ok:
        kind = "floating point" if floating else "integer"
        raise StateDictError(f"state dict '{name}' must be a dense {kind} tensor (as "
                             f"DynamicTable.state_dict() writes), got {_describe(value)}")


def _part(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _meta_entries(state: dict) -> list[int]:
    """``state["meta"]`` as ints, checked: six entries or more, this version.

    Raises:
        StateDictError: absent, malformed or another version.
    """
    meta = state.get("meta")
    if (not isinstance(meta, torch.Tensor) or meta.dim() != 1 or meta.shape[0] < 6
            or meta.dtype != torch.int64):
        raise StateDictError("state dict 'meta' must be a 1-D int64 tensor of at least 6 "
                             f"entries (as DynamicTable.state_dict() writes), got "
                             f"{_describe(meta)}")
    entries = meta.tolist()
    if entries[0] != STATE_VERSION:
        raise StateDictError(f"state dict version {entries[0]} is not supported (this "
                             f"dynembed reads version {STATE_VERSION})")
    return entries


class TableSnapshot:
    """Export and state-dict methods of a table (mixin; see module doc)."""

    def export(self) -> TableExport:
        """Every live row with its state and metadata (copies): rows in memory in slot
        order, then rows only in the store, then rows of a lazily opened checkpoint not
        read yet (whole table; it must fit in memory)."""
        _, slots = self.index.items()
        parts = [self.arena.rows(np.sort(slots)), *self.rows_below_memory()]
        rows = RowBlock.concat(parts, self.dim, self.arena.state_width)
        return TableExport(*(torch.from_numpy(x) for x in (
            rows.ids, rows.weights, rows.state, rows.counts, rows.last_step)))

    def rows_below_memory(self, chunk_rows: int = 1 << 16) -> Iterator[RowBlock]:
        """The live rows with no copy in memory, a block at a time: the store's, then those
        of a lazily opened checkpoint that neither memory nor the store has (newer)."""
        if self.tier is not None:
            for block in self.tier.scan(chunk_rows):
                keep = self.index.find(block.ids) == EMPTY
                if keep.any():
                    yield block.take(keep)
        if self.base is not None:
            for block in self.base.rows(chunk_rows):
                keep = self._only_in_base(block.ids)
                if keep.any():
                    yield block.take(keep)

    def count_below_memory(self) -> int:
        """How many rows :meth:`rows_below_memory` would give (reads ids only)."""
        below = 0
        if self.tier is not None:
            for block in self.tier.scan():
                below += int(np.count_nonzero(self.index.find(block.ids) == EMPTY))
        if self.base is not None:
            for ids in self.base.ids():
                below += int(np.count_nonzero(self._only_in_base(ids)))
        return below

    def _only_in_base(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of a lazily opened checkpoint's ids neither memory nor the store
        holds (the checkpoint's copy is the live one)."""
        keep = self.index.find(ids) == EMPTY
        if self.tier is not None and keep.any():
            idx = np.flatnonzero(keep)
            keep[idx[self.tier.get(ids[idx])[0]]] = False
        return keep

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Live rows as numpy arrays: ``id`` (r,), ``vector`` (r, dim), ``count`` (r,),
        ``last_step`` (r,), and ``key`` (r,) object array of the keys with the key log
        (str; bytes for bytes keys that are not UTF-8)."""
        export = self.export()
        out = {"id": export.ids.numpy(), "vector": export.weights.numpy(),
               "count": export.counts.numpy(), "last_step": export.last_step.numpy()}
        if self.key_log is not None:
            out["key"] = np.array(self.key_log.lookup(out["id"]), dtype=object)
        return out

    def to_pandas(self):
        """Live rows as a pandas DataFrame, one row per key (needs pandas).

        Columns: ``id``, ``key`` (with the key log; object dtype: str, bytes for bytes keys
        that are not UTF-8, None where unknown), ``count``, ``last_step`` and ``vector`` (a
        (dim,) float32 array per row).
        """
        import pandas as pd  # optional dependency, only for this export

        arrays = self.to_numpy()
        vectors = arrays.pop("vector")
        if "key" in arrays:
            # object, not pandas' str dtype: that one stores UTF-8 and failed the whole export
            # on one key with a lone surrogate (text decoded with errors="surrogateescape")
            arrays["key"] = pd.Series(arrays["key"], dtype=object)
        frame = pd.DataFrame(arrays)
        frame["vector"] = list(vectors)
        return frame

    def keys_of(self, ids) -> list[str | bytes | None]:
        """Original keys of ids from the key log (None where unknown): str, or bytes for
        bytes keys that are not UTF-8.

        Raises:
            RuntimeError: the table was made without ``key_log=True``.
            TypeError: ``ids`` are not int64 ids (e.g. the keys themselves).
        """
        if self.key_log is None:
            raise RuntimeError("this table keeps no key log; make it with key_log=True to "
                               "recover the strings behind ids")
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"ids must be int64 ids (a tensor, array or list of ints), got "
                            f"{type(ids).__name__} ({e}); keys_of maps ids back to the keys "
                            "(table.ids_of(keys).ids gives the ids of keys)") from None
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be int64 ids, got a {ids.dtype} tensor")
        return self.key_log.lookup(ids.to(torch.int64).reshape(-1).numpy())

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The table as plain tensors: live rows (slot order), optimizer state, metadata.

        Keys: ``ids``, ``weights``, ``optimizer_state``, ``counts``, ``last_step``,
        ``meta`` (int64: version, dim, state_width, step, update_step, seed, hash_seed,
        state layout),
        ``key_log.*`` when the key log is on, ``admission.*`` with an admission policy.
        """
        export = self.export()
        state = {"ids": export.ids, "weights": export.weights,
                 "optimizer_state": export.optimizer_state, "counts": export.counts,
                 "last_step": export.last_step}
        state.update(self.aux_state())
        return state

    def aux_state(self) -> dict[str, torch.Tensor]:
        """Everything but the rows: ``meta`` (int64: version, dim, state_width, step,
        update_step, seed, hash_seed, state layout (which optimizer's state it is); states
        saved before hash_seed have six entries, before the layout seven), ``counters.*``
        (the cumulative stats), ``key_log.*`` with the key log, ``admission.*`` with an
        admission policy."""
        state = {"meta": torch.tensor([STATE_VERSION, self.dim, self.arena.state_width,
                                       self.step, self.update_step,
                                       np.uint64(self.seed).view(np.int64),
                                       np.uint64(self.config.hash_seed).view(np.int64),
                                       _state_layout(self.optimizer)],
                                      dtype=torch.int64)}
        state.update({f"counters.{f.name}": torch.tensor(getattr(self.counters, f.name))
                      for f in dataclasses.fields(self.counters)})
        if self.key_log is not None:
            state.update({f"key_log.{k}": v for k, v in self.key_log.state_dict().items()})
        if self.admitter is not None:
            state.update({f"admission.{k}": v for k, v in self.admitter.state_dict().items()})
        return state

    def mark_saved(self, checkpoint_id: str) -> None:
        """The table now equals checkpoint ``checkpoint_id``: the next delta starts here.

        A lazily opened checkpoint (``base``) still holds the old copies of the rows changed
        since it was opened. In a table without a store, those ids are recorded as outdated
        there before their changed marks are cleared, so that evicting such a row later
        discards it, counted, instead of leaving the stale copy to be read back (with a
        store, the evicted row goes there and is read from there).
        """
        if self.base is not None and self.tier is None:  # read by eviction without a store
            top = min(self.changes.flags.shape[0], self._high_water)
            meta = self.arena.np("meta")[:top]
            changed = (self.changes.flags[:top] != 0) & (meta[:, LAST_STEP] != FREE_STEP)
            if changed.any():
                self.base.outdate(meta[changed, ID])
        self.changes.reset(checkpoint_id)

    def check_shape(self, dim: int, width: int, source: str = "state dict") -> None:
        """Raises StateDictError unless rows of (dim, width) fit this table."""
        if dim != self.dim:
            raise StateDictError(f"{source} has rows of dim {dim} but the table has dim "
                                 f"{self.dim}; build the table with dim={dim}")
        if width != self.arena.state_width:
            raise StateDictError(
                f"{source} has {width} optimizer floats per row but this table's optimizer "
                f"({type(self.optimizer).__name__}) keeps {self.arena.state_width}; use the "
                "optimizer the state was saved with")

    def load_aux_state(self, state: dict[str, torch.Tensor],
                       key_logs: list[dict[str, torch.Tensor]] = (),
                       admissions: list[dict[str, torch.Tensor]] = ()) -> None:
        """Restores counters, seed, key log and admission state from :meth:`aux_state`
        (rows untouched): :meth:`read_aux_state` then :meth:`apply_aux_state`.

        Raises:
            StateDictError: see :meth:`read_aux_state`; nothing changed.
        """
        self.apply_aux_state(self.read_aux_state(state, key_logs, admissions))

    def read_aux_state(self, state: dict[str, torch.Tensor],
                       key_logs: list[dict[str, torch.Tensor]] = (),
                       admissions: list[dict[str, torch.Tensor]] = (),
                       keep_ids: Callable[[np.ndarray], np.ndarray] | None = None) -> AuxState:
        """Checks and decodes :meth:`aux_state` tensors without changing the table, so a
        load can fail before it clears anything.

        Args:
            state: this table's aux state (or a whole state dict).
            key_logs: other shards' aux states whose key logs are merged in.
            admissions: other shards' aux states whose admission state is merged in.
            keep_ids: (n,) int64 ids -> (n,) bool, which key-log entries to keep (a shard's
                own buckets); each log is cut before it is merged, so a restore never holds
                every shard's strings at once. None keeps them all.

        Raises:
            StateDictError: a malformed ``meta`` or counter, another version, dim,
                optimizer state width or kind, or hash_seed, or a key log / admission state
                that does not load.
        """
        meta = _meta_entries(state)
        self.check_shape(meta[1], meta[2])
        saved_layout, layout = (meta[7] if len(meta) > 7 else 0), _state_layout(self.optimizer)
        if meta[2] and saved_layout and layout and saved_layout != layout:
            names = {code: name for name, code in _STATE_LAYOUTS.items()}
            raise StateDictError(
                f"state dict holds {names.get(saved_layout, saved_layout)}'s optimizer state "
                f"but the table's optimizer is {type(self.optimizer).__name__}, which would "
                "read it as its own (same width, another meaning: rows would train into NaN); "
                f"build the table with optimizer={names.get(saved_layout, '?')}(...)")
        if len(meta) > 6:  # states saved before hash_seed have six entries
            saved = int(np.int64(meta[6]).view(np.uint64))
            if saved != self.config.hash_seed:
                raise StateDictError(
                    f"state dict was saved with hash_seed={saved} but the table has "
                    f"hash_seed={self.config.hash_seed}: its string keys would map to other "
                    f"ids; build the table with hash_seed={saved}")
        counters = {}
        for f in dataclasses.fields(self.counters):  # absent from states saved before
            name = f"counters.{f.name}"
            if name in state:
                value = state[name]
                if (not isinstance(value, torch.Tensor) or value.numel() != 1
                        or value.dtype.is_floating_point or value.dtype.is_complex):
                    raise StateDictError(f"state dict '{name}' must be a one-element integer "
                                         f"tensor, got {_describe(value)}")
                counters[f.name] = int(value)
                if counters[f.name] < 0:
                    raise StateDictError(f"state dict '{name}' is {counters[f.name]}; "
                                         "counters are >= 0")
        for name, value in (("step", meta[3]), ("update_step", meta[4])):
            if int(value) < 0:
                raise StateDictError(f"state dict 'meta' holds {name}={int(value)}; steps "
                                     "are >= 0")
        seed = int(np.int64(meta[5]).view(np.uint64))
        try:
            key_log = None
            if self.key_log is not None:
                key_log = KeyLog()
                for source in (state, *key_logs):
                    part = _part(source, "key_log.")
                    if part:
                        log = KeyLog()
                        log.load_state_dict(part)
                        if keep_ids is not None:
                            log.keep_only(keep_ids)
                        key_log.merge(log)
            admitter = None
            if self.admitter is not None:  # its hashes follow the (restored) table seed
                admitter = self.config.admission.create(seed)
                if _part(state, "admission."):
                    admitter.load_state_dict(_part(state, "admission."))
                for other in admissions:
                    if _part(other, "admission."):
                        admitter.merge_state_dict(_part(other, "admission."))
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
            why = (f"it lacks the tensor {e.args[0]!r} (saved with another admission "
                   "policy?)" if isinstance(e, KeyError) else str(e))
            raise StateDictError(f"state dict's key log or admission state does not load: "
                                 f"{why}") from e
        return AuxState(meta[3], meta[4], seed, counters, key_log, admitter)

    def apply_aux_state(self, aux: AuxState) -> None:
        """Sets what :meth:`read_aux_state` decoded (cannot fail)."""
        self._pending_store_warning = None  # a restored clock: the store's rows are settled
        self.step, self.update_step, self.seed = aux.step, aux.update_step, aux.seed
        if self.evictor is not None:  # the clock's steps before the load mean nothing now
            self.evictor.clock.reset(self.step)
        for name, value in aux.counters.items():
            setattr(self.counters, name, value)
        if self.key_log is not None:
            self.key_log = aux.key_log
        if self.admitter is not None:
            self.admitter = aux.admitter

    def check_state_dict(self, state: dict[str, torch.Tensor]) -> tuple[np.ndarray, AuxState]:
        """Checks a state dict against this table without changing anything (what
        :meth:`load_state_dict` does first; a module holding several tables checks them all
        before loading any).

        Returns:
            The state's (n,) int64 ids and its decoded aux state.

        Raises:
            StateDictError: see :meth:`load_state_dict`.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be the dict of tensors state_dict() returns, got "
                            f"{type(state).__name__}")
        state = _in_host_memory(state)
        absent = [k for k in (*_ROW_KEYS, "meta") if k not in state]
        if absent:
            raise StateDictError(f"state dict lacks {absent}; expected the tensors written by "
                                 "DynamicTable.state_dict()")
        aux = self.read_aux_state(state)  # also checks the state's dim and width are ours
        ids = state["ids"]
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in _INT_DTYPES
                or ids.layout != torch.strided or ids.device.type == "meta"):
            raise StateDictError(f"state dict 'ids' must be a 1-D integer tensor, got "
                                 f"{_describe(ids)}")
        for name in ("weights", "optimizer_state", "counts", "last_step"):
            _check_row_tensor(name, state[name], floating=name in ("weights", "optimizer_state"))
        dim, width = self.dim, self.arena.state_width
        n = ids.shape[0]
        for name, width_ in (("weights", dim), ("optimizer_state", width)):
            if tuple(state[name].shape) != (n, width_):
                raise StateDictError(f"state dict '{name}' has shape "
                                     f"{tuple(state[name].shape)}, expected ({n}, {width_})")
        check_state_dict_rows(state["weights"], state["optimizer_state"], self.optimizer)
        for name in ("counts", "last_step"):
            if tuple(state[name].shape) != (n,):
                raise StateDictError(f"state dict '{name}' has shape "
                                     f"{tuple(state[name].shape)}, expected ({n},)")
            if n and int(state[name].min()) < 0:  # -1 marks a free slot in the arena
                raise StateDictError(f"state dict '{name}' holds {int(state[name].min())}; "
                                     f"{name} are >= 0 (use 0 for rows never looked up)")
        ids = ids.to("cpu", torch.int64).numpy()
        if np.unique(ids).shape[0] != n:
            raise StateDictError("state dict 'ids' holds duplicates; it is corrupted")
        if self.tier is None and self.max_rows is not None and n > self.max_rows:
            raise StateDictError(f"state dict has {n} rows but the memory budget holds "
                                 f"{self.max_rows}; raise memory_budget / max_rows or give "
                                 "the table a store= to hold the rest")
        return ids, aux

    def unused_state_keys(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Keys of ``state`` this table would not load: unknown names, or a key log /
        admission state for a table without one (so a module can report them as unexpected
        rather than drop them silently)."""
        known = set(_ROW_KEYS) | {"meta"} | {f"counters.{f.name}"
                                              for f in dataclasses.fields(self.counters)}
        prefixes = (("key_log.",) if self.key_log is not None else ()) + (
            ("admission.",) if self.admitter is not None else ())
        return [k for k in state if k not in known and not k.startswith(prefixes)]

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Replaces the table's rows and counters with a saved state.

        Args:
            state: what :meth:`state_dict` returned.
            strict: refuse keys this table would not load (see :meth:`unused_state_keys`:
                a misspelt name, a key log or admission state for a table without one);
                with False they are ignored.

        Raises:
            StateDictError: a tensor is missing or malformed, a key is unused under
                ``strict``, or dim / optimizer state width / hash_seed differ from this
                table's config; the table is unchanged.
            TypeError: ``strict`` is not a bool.
            StoreError: the table's store failed. The rows in memory and the counters are
                unchanged; the store may already hold some of the state's rows (or still
                some it lacks), so retry the load before training on.
        """
        ids, aux = self.check_state_dict(state)  # it reads the state's parts in host memory
        if check_bool("strict", strict) and (unused := self.unused_state_keys(state)):
            raise StateDictError(
                f"state dict has keys this table would not load: {unused[:8]}; a key log or "
                "admission state needs a table built with key_log=True / that admission "
                "policy, or pass strict=False to leave them out")
        n = ids.shape[0]
        if self.tier is not None:
            # The store's clock goes first: until the next flush records the state's (older)
            # clock, a table reopened over the store must not take the store's, ahead of
            # the state's rows.
            self.tier.drop_clock()
            # Every store call before memory changes, so a failing store leaves memory as it
            # was: list the stored rows the state does not have (a read), write the state's
            # rows (one batch), then delete those.
            stale = [b.ids[~np.isin(b.ids, ids)] for b in self.tier.scan()]
            stale = np.concatenate(stale) if stale else ids[:0]
            self.tier.put(RowBlock(
                ids, state["weights"].to("cpu", torch.float32).numpy(),
                state["optimizer_state"].to("cpu", torch.float32).numpy(),
                state["counts"].to("cpu", torch.int64).numpy(),
                state["last_step"].to("cpu", torch.int64).numpy()))
            if stale.shape[0]:
                self.tier.delete(stale)
        self._clear_memory()
        self.apply_aux_state(aux)
        if self.tier is not None:  # the rows wait in the store and fault in when looked up
            return
        self.reserve(n)
        slots = self.index.find(ids)
        self._allocate(ids, slots, n)
        t = torch.from_numpy(slots)
        self.arena.weights[t] = state["weights"].to("cpu", torch.float32)
        self.arena.state[t] = state["optimizer_state"].to("cpu", torch.float32)
        self.arena.counts[t] = state["counts"].to("cpu", torch.int64)
        self.arena.last_step[t] = state["last_step"].to("cpu", torch.int64)
