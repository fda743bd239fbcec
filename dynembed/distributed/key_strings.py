"""Key strings travel to the ranks that hold the keys' rows.

A string key is hashed to its id on the rank that looks it up; only the id travels with
the request. The requesting rank once logged the string (``key_log=True``), so a shard's
log lacked the strings of rows that only other ranks asked for, and a live export of the
shard listed them as None (a checkpoint, which merges every rank's log, had them).

- Sharded tables: in a training lookup's reply each owner marks the rows whose string
  its log lacks (one bit per row, beside the rows), and the requesters send those
  strings (:func:`send_strings_to_owners`). A row lacks it when the lookup created it (as
  in one process, where a key is logged when its row is made): once per key, and again
  after the owner discarded the row (expiry, erase, a discard for room), so every shard's
  log holds the strings of its rows.
- Replicated tables: every replica creates the same rows; each rank sends the strings of
  the new rows it asked for to every replica (:func:`share_with_replicas`).

Either is one sizes-and-payload exchange after each training lookup of key-logged tables.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from dynembed.distributed.exchange import Exchange
from dynembed.kernels.hash_index import EMPTY, first_positions
from dynembed.keys.key_log import KeyLog
from dynembed.nn._autograd import Lookup

_FIELDS = (("ids", np.int64), ("lengths", np.int64), ("utf8", np.uint8),
           ("raw_ids", np.int64), ("raw_lengths", np.int64), ("raw", np.uint8))
"""A :class:`KeyLog` state's tensors, in the order :func:`pack` writes them."""


def pack(parts: list[tuple[int, dict]]) -> np.ndarray:
    """(bytes,) uint8: key log states (:meth:`KeyLog.state_of`) of several tables (by their
    index in the lookup), a header of int64 sizes, then each state's arrays back to back."""
    header, blobs = [len(parts)], []
    for table, state in parts:
        arrays = [state[name].numpy().astype(dtype, copy=False) for name, dtype in _FIELDS]
        header += [table, *(a.shape[0] for a in arrays)]
        blobs += [a.view(np.uint8) for a in arrays]
    return np.concatenate([np.asarray(header, dtype=np.int64).view(np.uint8), *blobs])


def unpack(buf: np.ndarray) -> list[tuple[int, dict]]:
    """The parts :func:`pack` wrote into ``buf``."""
    count = int(buf[:8].view(np.int64)[0])
    width = 1 + len(_FIELDS)
    header = buf[8:8 + 8 * width * count].view(np.int64).reshape(count, width)
    at, parts = 8 + header.nbytes, []
    for row in header:
        state = {}
        for (name, dtype), n in zip(_FIELDS, row[1:]):
            size = int(n) * np.dtype(dtype).itemsize
            state[name] = torch.from_numpy(buf[at:at + size].copy().view(dtype))
            at += size
        parts.append((int(row[0]), state))
    return parts


def _strings_of(lookup: Lookup, ids: np.ndarray) -> tuple[np.ndarray, list]:
    """((k,) bool, keys): which of (k,) ``ids`` ``lookup`` had a string key for (int keys
    have none), and those keys."""
    if lookup.strings is None or not ids.shape[0] or not lookup.string_ids.shape[0]:
        return np.zeros(ids.shape[0], dtype=bool), []
    at = first_positions(lookup.string_ids, ids)
    found = at != EMPTY
    return found, _pick(lookup.strings, at[found])


def _pick(keys, positions: np.ndarray) -> list:
    """``[keys[i] for i in positions]`` in one C-level call."""
    if positions.shape[0] < 2:
        return [keys[i] for i in positions.tolist()]
    return list(operator.itemgetter(*positions.tolist())(keys))


def send_strings_to_owners(exchange: Exchange,
                           wanted: list[tuple[Lookup, np.ndarray, np.ndarray]]) -> None:
    """Sends the strings the owners of a sharded lookup's rows asked for, and logs those
    asked of the other ranks for this rank's rows. A collective: every rank calls it after
    the same training lookup of key-logged tables.

    An owner asks for the string of each row it holds whose key its log lacks, by a bit
    per requested row in the lookup's reply, so a row that was discarded and comes back
    gets its string again (the owner's log forgot it with the row).

    Args:
        exchange: the router's collectives.
        wanted: (lookup, ids, owner of each) of each key-logged table: the (k,) ids whose
            owners lack their string (this rank's own rows included).
    """
    found = []
    for t, (lk, ids, owners) in enumerate(wanted):
        has, keys = _strings_of(lk, ids)
        found.append((t, ids[has], keys, owners[has]))
    payloads = []
    for destination in range(exchange.world_size):
        parts = []
        for t, ids, keys, owners in found:
            to = np.flatnonzero(owners == destination)
            if to.shape[0]:
                parts.append((t, KeyLog.state_of(ids[to], _pick(keys, to))))
        payloads.append(pack(parts) if parts else np.zeros(0, dtype=np.uint8))
    send = np.array([p.shape[0] for p in payloads], dtype=np.int64)
    sizes, _ = exchange.splits(send)
    got = exchange.all_to_all(torch.from_numpy(np.concatenate(payloads)), send, sizes)
    _merge_received(got.numpy(), sizes, [lk.table for lk, _, _ in wanted])


def share_with_replicas(exchange: Exchange, logged: list[tuple[Lookup, np.ndarray]]) -> None:
    """Logs the strings of the rows a replicated training lookup created, on every replica:
    each rank sends those of its own keys (every replica created the same rows, but only
    the ranks that asked know their strings). A collective: every rank calls it after the
    same training lookup of key-logged tables.

    Args:
        exchange: the router's collectives.
        logged: (lookup, created) of each key-logged table, ``created`` (u,) bool over the
            lookup's ids: those that got a new row.
    """
    parts = []
    for t, (lk, created) in enumerate(logged):
        ids = lk.ids[created]
        has, keys = _strings_of(lk, ids)
        if keys:
            parts.append((t, KeyLog.state_of(ids[has], keys)))
    got, sizes = exchange.all_gather(torch.from_numpy(pack(parts)))
    _merge_received(got.numpy(), sizes, [lk.table for lk, _ in logged])


def _merge_received(got: np.ndarray, sizes: np.ndarray, tables: list) -> None:
    """Logs every rank's part of ``got`` (``sizes[r]`` bytes from rank r; this rank's own
    too: the strings of the rows it holds that it asked for itself)."""
    for start, size in zip((np.cumsum(sizes) - sizes).tolist(), sizes.tolist()):
        if size:
            for t, state in unpack(got[start:start + size]):
                tables[t].key_log.merge_state(state)

