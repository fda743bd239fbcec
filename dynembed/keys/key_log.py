"""An optional id -> original string map, so users can list and export their real keys."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

_SEP = "\x00"


def _split_joined(whole: str, lengths: np.ndarray) -> list[str]:
    """Splits ``_SEP.join(parts)`` back into parts of the given code-point lengths."""
    parts = whole.split(_SEP)
    if len(parts) == lengths.size:
        return parts
    # Some key holds the separator itself: slice by lengths instead (rare).
    ends = np.cumsum(lengths + 1) - 1
    starts = ends - lengths
    return [whole[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def _bytes_tensor(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


class KeyLog:
    """Remembers the str/bytes key behind each id it is shown.

    Kept in dicts filled by C-level ``dict.update(zip(...))`` calls; its state is plain
    tensors (UTF-8 bytes and lengths) so it saves with ``torch.save(weights_only=True)``.
    Bytes keys that are UTF-8 are logged as the str they spell, which hashes to the same id.
    Other bytes keys are logged as bytes: no str hashes to their id (a str hashes its
    ``surrogatepass`` UTF-8 bytes), so a str would lead back to another row.
    """

    def __init__(self) -> None:
        self._strings: dict[int, str] = {}
        self._raw: dict[int, bytes] = {}
        """Keys that are bytes but not UTF-8 (rare)."""

    def __len__(self) -> int:
        return len(self._strings) + len(self._raw)

    def add_among(self, ids: np.ndarray, keys: Sequence, among: np.ndarray) -> None:
        """:meth:`add` of the keys whose id is one of ``among`` (the ids that got a row:
        keys refused by admission stay out of the log).

        Args:
            ids: (n,) int64.
            keys: n str or bytes (as :meth:`add`).
            among: (m,) int64 ids to keep.
        """
        logged = np.isin(ids, among)
        if logged.all():
            self.add(ids, keys)
        elif logged.any():
            # fromiter, not asarray: equal-length bytearrays would become a 2-D array
            kept = np.fromiter(keys, dtype=object, count=len(keys))[logged]
            self.add(ids[logged], kept.tolist())

    def add(self, ids: np.ndarray, keys: Sequence) -> None:
        """Records ``keys[i]`` as the key of ``ids[i]``.

        Args:
            ids: (n,) int64.
            keys: n str or bytes; one call may mix them (the features of a collection
                that share a table are logged together, and each may use either).
        """
        byte_kinds = [issubclass(t, (bytes, bytearray)) for t in set(map(type, keys))]
        if any(byte_kinds) and not all(byte_kinds):
            # str and bytes: each kind by its own path (the str path stored bytes as if
            # they were strings, which broke state_dict; the bytes path raised mid-lookup)
            is_bytes = np.fromiter(map(isinstance, keys, itertools.repeat((bytes, bytearray))),
                                   dtype=bool, count=len(keys))
            kept = np.fromiter(keys, dtype=object, count=len(keys))
            self.add(ids[~is_bytes], kept[~is_bytes].tolist())
            self.add(ids[is_bytes], kept[is_bytes].tolist())
            return
        ids = ids.tolist()
        if len(keys) and isinstance(keys[0], (bytes, bytearray)):
            try:
                parts = b"\x00".join(keys).decode("utf-8").split(_SEP)
            except UnicodeDecodeError:  # some key is not UTF-8: sort them one by one (rare)
                parts = None
            if parts is None or len(parts) != len(keys):  # or a key holds a NUL byte
                self._add_one_by_one(ids, keys)
                return
            keys = parts
        self._strings.update(zip(ids, keys))
        if self._raw:
            self._forget(self._raw, ids)

    def _add_one_by_one(self, ids: list[int], keys: Sequence) -> None:
        for i, key in zip(ids, keys):
            try:
                self._strings[i] = bytes(key).decode("utf-8")
                self._raw.pop(i, None)
            except UnicodeDecodeError:
                self._raw[i] = bytes(key)
                self._strings.pop(i, None)

    def lookup(self, ids: np.ndarray) -> list[str | bytes | None]:
        """The key of each id (str, or bytes for bytes keys that are not UTF-8), None where
        it was never logged."""
        found = list(map(self._strings.get, ids.tolist()))
        if self._raw:
            raw = map(self._raw.get, ids.tolist())
            found = [s if s is not None else r for s, r in zip(found, raw)]
        return found

    def merge(self, other: KeyLog) -> None:
        """Adds every id -> key of ``other`` (its key wins where both have one)."""
        if self._raw and other._strings:
            self._forget(self._raw, other._strings)
        if other._raw:
            self._forget(self._strings, other._raw)
        self._strings.update(other._strings)
        self._raw.update(other._raw)

    def discard(self, ids: np.ndarray) -> None:
        """Forgets ids (their rows were erased)."""
        ids = ids.tolist()
        self._forget(self._strings, ids)
        if self._raw:
            self._forget(self._raw, ids)

    def keep_only(self, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        """Forgets every id for which ``keep`` ((n,) int64 ids -> (n,) bool) is False."""
        for entries in (self._strings, self._raw):
            if entries:
                ids = np.fromiter(entries.keys(), dtype=np.int64, count=len(entries))
                self._forget(entries, ids[~keep(ids)].tolist())

    @staticmethod
    def _forget(entries: dict, ids) -> None:
        for _ in map(entries.pop, ids, itertools.repeat(None)):
            pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{'ids': (n,) int64, 'utf8': (bytes,) uint8 NUL-joined keys, 'lengths': (n,) int64
        code points}, plus 'raw_ids', 'raw' and 'raw_lengths' (bytes) alike for the bytes
        keys that are not UTF-8."""
        n = len(self._strings)
        ids = np.fromiter(self._strings.keys(), dtype=np.int64, count=n)
        strings = list(self._strings.values())
        lengths = np.fromiter(map(len, strings), dtype=np.int64, count=n)
        blob = _SEP.join(strings).encode("utf-8", "surrogatepass")
        raw = list(self._raw.values())
        return {"ids": torch.from_numpy(ids), "utf8": _bytes_tensor(blob),
                "lengths": torch.from_numpy(lengths),
                "raw_ids": torch.tensor(list(self._raw.keys()), dtype=torch.int64),
                "raw": _bytes_tensor(b"".join(raw)),
                "raw_lengths": torch.tensor(list(map(len, raw)), dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replaces the log with a saved one.

        Raises:
            ValueError: the tensors do not fit together (a key's string would be lost).
            KeyError: one of them is missing.
        """
        ids = state["ids"].numpy()
        lengths = state["lengths"].numpy()
        whole = state["utf8"].numpy().tobytes().decode("utf-8", "surrogatepass")
        if lengths.shape != ids.shape or (
                ids.size and int(lengths.sum()) + ids.size - 1 != len(whole)):
            raise ValueError(f"key log 'lengths' ({lengths.shape[0]} entries, "
                             f"{int(lengths.sum())} code points) does not fit 'ids' "
                             f"({ids.shape[0]}) and 'utf8' ({len(whole)} code points)")
        strings = _split_joined(whole, lengths) if ids.size else []
        raw = {}
        if "raw_ids" in state:  # (older states have no such part, and no such keys)
            raw_ids, raw_lengths = state["raw_ids"].numpy(), state["raw_lengths"].numpy()
            blob = state["raw"].numpy().tobytes()
            if raw_lengths.shape != raw_ids.shape or int(raw_lengths.sum()) != len(blob) \
                    or (raw_lengths < 0).any():
                raise ValueError(f"key log 'raw_lengths' ({raw_lengths.shape[0]} entries, "
                                 f"{int(raw_lengths.sum())} bytes) does not fit 'raw_ids' "
                                 f"({raw_ids.shape[0]}) and 'raw' ({len(blob)} bytes)")
            ends = np.cumsum(raw_lengths).tolist()
            raw = {i: blob[a:b] for i, a, b in zip(raw_ids.tolist(), [0, *ends], ends)}
        self._strings = dict(zip(ids.tolist(), strings))
        self._raw = raw
