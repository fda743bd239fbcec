"""An optional id -> original string map, so users can list and export their real keys."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dynembed.kernels import hash_index as index
from dynembed.kernels._threads import get_num_threads
from dynembed.kernels.byte_spans import (
    NO_SEPARATOR,
    codepoint_counts,
    gather_spans,
    utf8_spans,
)

_SEP = "\x00"
COMPACT_FLOOR = 1 << 16
"""Dead entries (or bytes) the log holds before it first compacts (see :meth:`_compact`)."""


def _split_joined(whole: str, lengths: np.ndarray) -> list[str]:
    """Splits ``_SEP.join(parts)`` back into parts of the given code-point lengths."""
    parts = whole.split(_SEP)
    if len(parts) == lengths.size:
        return parts
    # Some key holds the separator itself: slice by lengths instead (rare).
    ends = np.cumsum(lengths + 1) - 1
    starts = ends - lengths
    return [whole[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def _is_utf8(key: bytes) -> bool:
    try:
        bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _bytes_tensor(blob: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(blob, dtype=np.uint8))


def _grown(array: np.ndarray, need: int) -> np.ndarray:
    """``array`` with room for ``need`` items (doubling, so appends are amortised)."""
    if need <= array.shape[0]:
        return array
    out = np.empty(max(need, 2 * array.shape[0], 16), dtype=array.dtype)
    out[:array.shape[0]] = array
    return out


def _id_array(ids, arg: str = "ids") -> np.ndarray:
    """(n,) int64 of 1-D integer ids (a numpy array, tensor or list; uint64 as the int64 of
    the same bits, as hashed ids are made).

    Raises:
        TypeError: not integers.
        ValueError: not 1-D.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{arg} must be 1-D, got shape {ids.shape}")
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    return index.as_ids(ids)


class _Encoded:
    """Keys as byte spans of one buffer, and whether each is bytes that are not UTF-8."""

    def __init__(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                 raw: np.ndarray) -> None:
        self.buf, self.starts, self.lengths, self.raw = buf, starts, lengths, raw

    @classmethod
    def of(cls, keys: Sequence) -> _Encoded:
        """Encodes n str or bytes keys (one call may mix them) in C-level joins and a
        compiled pass; only bytes keys that are not all UTF-8 are checked one by one."""
        kinds = [issubclass(t, (bytes, bytearray)) for t in set(map(type, keys))]
        if any(kinds) and not all(kinds):
            return cls._mixed(keys)
        if len(keys) and kinds[0]:
            buf = np.frombuffer(b"".join(keys), dtype=np.uint8)
            lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
            try:  # the NUL-joined keys decode only if each does (NUL ends no character)
                b"\x00".join(keys).decode("utf-8")
                raw = np.zeros(len(keys), dtype=bool)
            except UnicodeDecodeError:
                raw = ~np.fromiter(map(_is_utf8, keys), dtype=bool, count=len(keys))
            return cls(buf, np.cumsum(lengths) - lengths, lengths, raw)
        buf = np.frombuffer(_SEP.join(keys).encode("utf-8", "surrogatepass"), dtype=np.uint8)
        codepoints = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        starts, lengths, _ = utf8_spans(buf, codepoints, 1)
        return cls(buf, starts, lengths, np.zeros(len(keys), dtype=bool))

    @classmethod
    def _mixed(cls, keys: Sequence) -> _Encoded:
        is_bytes = np.fromiter((isinstance(k, (bytes, bytearray)) for k in keys), dtype=bool,
                               count=len(keys))
        every = np.fromiter(keys, dtype=object, count=len(keys))
        parts = [cls.of(every[~is_bytes].tolist()), cls.of(every[is_bytes].tolist())]
        out = cls(np.concatenate([p.buf for p in parts]), np.empty(len(keys), np.int64),
                  np.empty(len(keys), np.int64), np.empty(len(keys), bool))
        shift = 0
        for part, where in zip(parts, (~is_bytes, is_bytes)):
            out.starts[where] = part.starts + shift
            out.lengths[where], out.raw[where] = part.lengths, part.raw
            shift += part.buf.shape[0]
        return out

    def take(self, which: np.ndarray) -> _Encoded:
        return _Encoded(self.buf, self.starts[which], self.lengths[which], self.raw[which])


class KeyLog:
    """Remembers the str/bytes key behind each id it is shown.

    Compact: a hash index from id to entry, and each entry's key as UTF-8 bytes in one
    growing buffer (50 to 70 bytes per key plus the key's bytes, against some 126 plus its
    length for a dict of Python ints and strs). Filled, read and saved in batches: C-level
    joins and splits of all the keys of a call, and compiled passes over the buffer.

    Bytes keys that are UTF-8 are logged as the str they spell, which hashes to the same id.
    Other bytes keys are logged as bytes: no str hashes to their id (a str hashes its
    ``surrogatepass`` UTF-8 bytes), so a str would lead back to another row.

    Its state is plain tensors (UTF-8 bytes and lengths) so it saves with
    ``torch.save(weights_only=True)``.
    """

    def __init__(self) -> None:
        self._buckets = index.empty_buckets(0)
        self._size = 0
        """Ids in the log."""
        self._entries = 0
        """Entries written (live ones and those of discarded or re-logged ids)."""
        self._starts = np.empty(0, dtype=np.int64)
        self._lengths = np.empty(0, dtype=np.int64)
        self._raw = np.empty(0, dtype=bool)
        self._heap = np.empty(0, dtype=np.uint8)
        self._heap_used = 0
        self._dead_bytes = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes the log holds."""
        return sum(a.nbytes for a in (self._buckets, self._starts, self._lengths, self._raw,
                                      self._heap))

    def add_among(self, ids: np.ndarray, keys: Sequence, among: np.ndarray) -> None:
        """:meth:`add` of the keys whose id is one of ``among`` (the ids that got a row:
        keys refused by admission stay out of the log).

        Args:
            ids: (n,) int64.
            keys: n str or bytes (as :meth:`add`).
            among: (m,) int64 distinct ids to keep.

        Raises:
            ValueError: not one key per id, or ids that are not 1-D; nothing was logged.
            TypeError: ids that are not integers.
        """
        ids, among = _id_array(ids), _id_array(among, "among")
        self._check_keys(ids, keys)
        at = index.first_positions(ids, among)
        at = np.sort(at[at != index.EMPTY])
        if at.shape[0]:  # only the logged keys are encoded, one each
            picked = operator.itemgetter(*at.tolist())(keys)
            self._append(ids[at], _Encoded.of(picked if at.shape[0] > 1 else [picked]))

    def add(self, ids: np.ndarray, keys: Sequence) -> None:
        """Records ``keys[i]`` as the key of ``ids[i]`` (the last one where an id repeats).

        Args:
            ids: (n,) int64.
            keys: n str or bytes; one call may mix them (the features of a collection
                that share a table are logged together, and each may use either).

        Raises:
            ValueError, TypeError: as :meth:`add_among`.
        """
        ids = _id_array(ids)
        self._check_keys(ids, keys)
        if len(keys):
            self._append(ids, _Encoded.of(keys))

    @staticmethod
    def _check_keys(ids: np.ndarray, keys: Sequence) -> None:
        """Raises ValueError (nothing logged) unless there is one key per id."""
        if len(keys) != ids.shape[0]:
            raise ValueError(f"keys must hold one key per id: {ids.shape[0]} ids, "
                             f"{len(keys)} keys")

    def _append(self, ids: np.ndarray, keys: _Encoded) -> None:
        """Logs (n,) ids' keys as new entries; an id already in the log gets the new one."""
        unique, inverse, _ = index.unique_inverse(ids)
        if unique.shape[0] < ids.shape[0]:  # the last key of an id wins, as in a dict
            last = np.zeros(unique.shape[0], dtype=np.int64)
            np.maximum.at(last, inverse, np.arange(ids.shape[0]))
            ids, keys = unique, keys.take(last)
        self._forget(ids)
        n = ids.shape[0]
        data = gather_spans(keys.buf, keys.starts, keys.lengths, NO_SEPARATOR)
        self._heap = _grown(self._heap, self._heap_used + data.shape[0])
        self._heap[self._heap_used:self._heap_used + data.shape[0]] = data
        first, last = self._entries, self._entries + n
        for name, values in (("_starts", np.cumsum(keys.lengths) - keys.lengths
                              + self._heap_used), ("_lengths", keys.lengths),
                             ("_raw", keys.raw)):
            column = _grown(getattr(self, name), last)
            column[first:last] = values
            setattr(self, name, column)
        self._heap_used += data.shape[0]
        self._reserve(self._size + n)
        slots = np.full(n, index.EMPTY, dtype=np.int64)
        # the ids are absent and distinct: each gets the next entry, in order
        inserted, _, self._entries, _ = index.index_insert(
            self._buckets, ids, slots, np.empty(0, np.int64), 0, first, n)
        self._size += inserted
        self._compact()

    def _reserve(self, entries: int) -> None:
        if index.buckets_for(entries) > self._buckets.shape[0]:
            grown = index.empty_buckets(entries)
            index.index_rehash(self._buckets, grown)
            self._buckets = grown

    def _find(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 entry of each id, EMPTY where it is not logged."""
        return index.index_find(self._buckets, ids, get_num_threads())

    def _forget(self, ids: np.ndarray) -> None:
        if not self._size or not ids.shape[0]:
            return
        freed = index.index_erase(self._buckets, ids)
        freed = freed[freed != index.EMPTY]
        self._size -= freed.shape[0]
        self._dead_bytes += int(self._lengths[freed].sum())

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        """((size,) ids, (size,) entries) in the order they were logged."""
        ids, entries = index.index_items(self._buckets, self._size)
        alive = np.zeros(self._entries, dtype=bool)
        alive[entries] = True
        by_entry = np.empty(self._entries, dtype=np.int64)
        by_entry[entries] = ids  # entries are distinct: a scatter, not a sort
        entries = np.flatnonzero(alive)
        return by_entry[entries], entries

    def _compact(self) -> None:
        """Rewrites the log without its dead entries and bytes once they outnumber the live
        ones (amortised: each compaction follows as many discards as it copies)."""
        dead_entries = self._entries - self._size
        live_bytes = self._heap_used - self._dead_bytes
        if dead_entries <= max(self._size, COMPACT_FLOOR) and \
                self._dead_bytes <= max(live_bytes, COMPACT_FLOOR):
            return
        ids, entries = self._live()
        fresh = KeyLog()
        fresh._append(ids, _Encoded(self._heap, self._starts[entries],
                                    self._lengths[entries], self._raw[entries]))
        self.__dict__.update(fresh.__dict__)

    def lookup(self, ids: np.ndarray) -> list[str | bytes | None]:
        """The key of each of (n,) ids (str, or bytes for bytes keys that are not UTF-8),
        None where it was never logged.

        Raises:
            ValueError, TypeError: ids that are not 1-D integers.
        """
        ids = _id_array(ids)
        out = np.full(ids.shape[0], None, dtype=object)
        if not self._size or not ids.shape[0]:
            return out.tolist()
        entries = self._find(ids)
        at = np.flatnonzero(entries != index.EMPTY)
        found = entries[at]
        raw = self._raw[found]
        if not raw.all():
            out[at[~raw]] = self._strings(found[~raw])
        if raw.any():
            out[at[raw]] = self._raw_bytes(found[raw])
        return out.tolist()

    def _strings(self, entries: np.ndarray) -> list[str]:
        starts, lengths = self._starts[entries], self._lengths[entries]
        joined = gather_spans(self._heap, starts, lengths, 0).tobytes()
        whole = joined.decode("utf-8", "surrogatepass")
        if whole.count(_SEP) == entries.shape[0] - 1:
            return whole.split(_SEP)
        return _split_joined(whole, codepoint_counts(self._heap, starts, lengths))

    def _raw_bytes(self, entries: np.ndarray) -> list[bytes]:
        lengths = self._lengths[entries]
        blob = gather_spans(self._heap, self._starts[entries], lengths, NO_SEPARATOR).tobytes()
        ends = np.cumsum(lengths).tolist()
        return [blob[a:b] for a, b in zip([0, *ends], ends)]

    def merge(self, other: KeyLog) -> None:
        """Adds every id -> key of ``other`` (its key wins where both have one)."""
        ids, entries = other._live()
        if ids.shape[0]:
            self._append(ids, _Encoded(other._heap, other._starts[entries],
                                       other._lengths[entries], other._raw[entries]))

    def discard(self, ids: np.ndarray) -> None:
        """Forgets ids (their rows were erased)."""
        self._forget(_id_array(ids))
        self._compact()

    def keep_only(self, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        """Forgets every id for which ``keep`` ((n,) int64 ids -> (n,) bool) is False."""
        if self._size:
            ids = index.index_items(self._buckets, self._size)[0]
            self.discard(ids[~keep(ids)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{'ids': (n,) int64, 'utf8': (bytes,) uint8 NUL-joined keys, 'lengths': (n,) int64
        code points}, plus 'raw_ids', 'raw' and 'raw_lengths' (bytes) alike for the bytes
        keys that are not UTF-8."""
        ids, entries = self._live()
        return _state(ids, _Encoded(self._heap, self._starts[entries], self._lengths[entries],
                                    self._raw[entries]))

    @staticmethod
    def state_of(ids: np.ndarray, keys: Sequence) -> dict[str, torch.Tensor]:
        """The :meth:`state_dict` of a log holding ``keys[i]`` for ``ids[i]`` (distinct),
        without building the log (the strings a distributed lookup sends its owners).

        Raises:
            ValueError, TypeError: as :meth:`add`.
        """
        ids = _id_array(ids)
        KeyLog._check_keys(ids, keys)
        return _state(ids, _Encoded.of(keys))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replaces the log with a saved one.

        Raises:
            ValueError: as :meth:`merge_state`; the log is unchanged.
            KeyError: a tensor is missing.
        """
        fresh = KeyLog()
        fresh.merge_state(state)
        self.__dict__.update(fresh.__dict__)

    def merge_state(self, state: dict[str, torch.Tensor]) -> None:
        """Adds the keys of a :meth:`state_dict` (its key wins where both have one).

        Raises:
            ValueError: a tensor is not 1-D of its dtype (int64; uint8 for the bytes), the
                tensors do not fit together (a key's string would be lost), or 'utf8' is not
                UTF-8. The log is unchanged.
            KeyError: a tensor is missing.
        """
        ids, codepoints, buf = (_part(state, name) for name in ("ids", "lengths", "utf8"))
        buf.tobytes().decode("utf-8", "surrogatepass")  # UnicodeDecodeError (a ValueError)
        starts, lengths, end = utf8_spans(buf, codepoints, 1)
        if codepoints.shape != ids.shape or end != (buf.shape[0] + 1 if ids.size else 0) \
                or (buf.size and not ids.size):
            raise ValueError(f"key log 'lengths' ({codepoints.shape[0]} entries, "
                             f"{int(codepoints.sum())} code points) does not fit 'ids' "
                             f"({ids.shape[0]}) and 'utf8' ({buf.shape[0]} bytes, split at "
                             "NUL separators)")
        raw = None
        if "raw_ids" in state:  # (older states have no such part, and no such keys)
            raw_ids, raw_lengths, blob = (_part(state, name)
                                          for name in ("raw_ids", "raw_lengths", "raw"))
            ends = np.cumsum(raw_lengths)
            if raw_lengths.shape != raw_ids.shape or (raw_lengths < 0).any() \
                    or (raw_lengths > blob.shape[0]).any() \
                    or (ends[-1] if ends.size else 0) != blob.shape[0]:
                raise ValueError(f"key log 'raw_lengths' ({raw_lengths.shape[0]} entries, "
                                 f"{int(raw_lengths.sum())} bytes) does not fit 'raw_ids' "
                                 f"({raw_ids.shape[0]}) and 'raw' ({blob.shape[0]} bytes)")
            raw = (raw_ids, _Encoded(blob, ends - raw_lengths, raw_lengths,
                                     np.ones(raw_ids.shape[0], bool)))
        if ids.size:
            self._append(ids, _Encoded(buf, starts, lengths, np.zeros(ids.shape[0], bool)))
        if raw is not None and raw[0].size:
            self._append(*raw)


def _state(ids: np.ndarray, keys: _Encoded) -> dict[str, torch.Tensor]:
    """The state dict of (n,) distinct ids' keys."""
    text, blobs = ~keys.raw, keys.raw
    starts, lengths = keys.starts[text], keys.lengths[text]
    return {"ids": torch.from_numpy(np.ascontiguousarray(ids[text])),
            "utf8": _bytes_tensor(gather_spans(keys.buf, starts, lengths, 0)),
            "lengths": torch.from_numpy(codepoint_counts(keys.buf, starts, lengths)),
            "raw_ids": torch.from_numpy(np.ascontiguousarray(ids[blobs])),
            "raw": _bytes_tensor(gather_spans(keys.buf, keys.starts[blobs], keys.lengths[blobs],
                                              NO_SEPARATOR)),
            "raw_lengths": torch.from_numpy(np.ascontiguousarray(keys.lengths[blobs]))}


def _part(state: dict, name: str) -> np.ndarray:
    """The state's tensor ``name`` as a 1-D numpy array of its dtype.

    Raises:
        ValueError: it is not a 1-D tensor of that dtype.
        KeyError: it is missing.
    """
    dtype = torch.uint8 if name in ("utf8", "raw") else torch.int64
    part = state[name]
    if not isinstance(part, torch.Tensor) or part.dtype != dtype or part.dim() != 1:
        raise ValueError(f"key log '{name}' must be a 1-D {dtype} tensor, got "
                         f"{getattr(part, 'dtype', type(part).__name__)} of shape "
                         f"{tuple(getattr(part, 'shape', ()))}")
    return np.ascontiguousarray(part.cpu().numpy())
