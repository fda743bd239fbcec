"""An optional id -> original string map, so users can list and export their real keys."""

from __future__ import annotations

from collections.abc import Sequence

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


class KeyLog:
    """Remembers the str/bytes key behind each id it is shown.

    Kept in a dict filled by C-level ``dict.update(zip(...))`` calls; its state is plain
    tensors (UTF-8 bytes and lengths) so it saves with ``torch.save(weights_only=True)``.
    Bytes keys are logged decoded as UTF-8 with surrogate escapes.
    """

    def __init__(self) -> None:
        self._strings: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._strings)

    def add(self, ids: np.ndarray, keys: Sequence) -> None:
        """Records ``keys[i]`` as the key of ``ids[i]``.

        Args:
            ids: (n,) int64.
            keys: n str, or n bytes.
        """
        if len(keys) and isinstance(keys[0], (bytes, bytearray)):
            parts = b"\x00".join(keys).decode("utf-8", "surrogateescape").split(_SEP)
            if len(parts) != len(keys):  # a key holds a NUL byte: decode one by one (rare)
                parts = [bytes(k).decode("utf-8", "surrogateescape") for k in keys]
            keys = parts
        self._strings.update(zip(ids.tolist(), keys))

    def lookup(self, ids: np.ndarray) -> list[str | None]:
        """The string of each id, None where it was never logged."""
        return list(map(self._strings.get, ids.tolist()))

    def merge(self, other: KeyLog) -> None:
        """Adds every id -> key of ``other`` (its key wins where both have one)."""
        self._strings.update(other._strings)

    def discard(self, ids: np.ndarray) -> None:
        """Forgets ids (their rows were erased)."""
        keep = self._strings
        for _ in map(keep.pop, ids.tolist(), [None] * len(ids)):
            pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{'ids': (n,) int64, 'utf8': (bytes,) uint8 NUL-joined keys, 'lengths': (n,) int64}."""
        n = len(self._strings)
        ids = np.fromiter(self._strings.keys(), dtype=np.int64, count=n)
        strings = list(self._strings.values())
        lengths = np.fromiter(map(len, strings), dtype=np.int64, count=n)
        blob = _SEP.join(strings).encode("utf-8", "surrogatepass")
        utf8 = np.frombuffer(blob, dtype=np.uint8).copy()
        return {"ids": torch.from_numpy(ids), "utf8": torch.from_numpy(utf8),
                "lengths": torch.from_numpy(lengths)}

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
        self._strings = dict(zip(ids.tolist(), strings))
