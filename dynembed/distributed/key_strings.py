"""Key strings travel to the ranks that hold the keys' rows.

A string key is hashed to its id on the rank that looks it up; only the id travels with
the request. The requesting rank logs the string (``key_log=True``), so a shard's own log
lacked the strings of rows that only other ranks asked for, and a live export of the shard
listed them as None (a checkpoint, which merges every rank's log, had them). After each
training lookup of a key-logged table, every rank sends the strings new to its own log
to the ranks holding their rows (the owner of a sharded table's key, every replica of a
replicated one's) in one exchange. Strings go once per rank and key: a rank's log
remembers what it sent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dynembed.distributed.exchange import Exchange
from dynembed.keys.key_log import KeyLog
from dynembed.nn._autograd import Lookup

_FIELDS = (("ids", np.int64), ("lengths", np.int64), ("utf8", np.uint8),
           ("raw_ids", np.int64), ("raw_lengths", np.int64), ("raw", np.uint8))
"""A :class:`KeyLog` state's tensors, in the order :func:`pack` writes them."""


def pack(parts: list[tuple[int, KeyLog]]) -> np.ndarray:
    """(bytes,) uint8: the key logs of several tables (by their index in the lookup), a
    header of int64 sizes, then each log's arrays back to back."""
    header, blobs = [len(parts)], []
    for table, log in parts:
        state = log.state_dict()
        arrays = [state[name].numpy().astype(dtype, copy=False) for name, dtype in _FIELDS]
        header += [table, *(a.shape[0] for a in arrays)]
        blobs += [a.view(np.uint8) for a in arrays]
    return np.concatenate([np.asarray(header, dtype=np.int64).view(np.uint8), *blobs])


def unpack(buf: np.ndarray) -> list[tuple[int, KeyLog]]:
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
        log = KeyLog()
        log.load_state_dict(state)
        parts.append((int(row[0]), log))
    return parts


def _new_strings(lookup: Lookup, admitted: np.ndarray | None,
                 sent_to: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, list]:
    """The distinct (ids, keys) of ``lookup``'s strings that got a row (``admitted``: (u,)
    bool over its ids, None: all), that other ranks hold (``sent_to``: ids -> bool) and
    that this rank's log does not know yet (it never sent them)."""
    ids, keys = lookup.string_ids, lookup.strings
    keep = sent_to(ids) & ~lookup.table.key_log.knows(ids)
    if admitted is not None and not admitted.all():
        keep &= np.isin(ids, lookup.ids[~admitted], invert=True)
    if not keep.any():
        return ids[:0], []
    ids, first = np.unique(ids[keep], return_index=True)
    at = np.flatnonzero(keep)[first]
    return ids, [keys[i] for i in at.tolist()]


def share_strings(exchange: Exchange, lookups: list[tuple[Lookup, np.ndarray | None]], *,
                  owners: Callable[[np.ndarray], np.ndarray] | None) -> None:
    """Sends the strings of a training lookup's key-logged tables to the ranks that hold
    their rows, and logs those the other ranks sent here. A collective: every rank calls it
    after the same lookup (the tables' key logs are set alike on every rank).

    Args:
        exchange: the router's collectives.
        lookups: (lookup, admitted) of each key-logged table that trains in this lookup,
            ``admitted`` as in :func:`_new_strings`.
        owners: ids -> (n,) owning rank (a sharded table); None: every rank holds every
            row (replicated tables).
    """
    rank, world = exchange.rank, exchange.world_size
    others = (lambda ids: np.ones(ids.shape[0], dtype=bool)) if owners is None else \
        (lambda ids: owners(ids) != rank)
    found = [(t, *_new_strings(lk, admitted, others))
             for t, (lk, admitted) in enumerate(lookups) if lk.strings is not None]
    if owners is None:  # the same strings to every other rank
        parts = [(t, _log_of(ids, keys)) for t, ids, keys in found if ids.shape[0]]
        mine = pack(parts)
        got, sizes = exchange.all_gather(torch.from_numpy(mine))
    else:
        payloads = []
        for destination in range(world):
            parts = []
            for t, ids, keys in found:
                to = np.flatnonzero(owners(ids) == destination) if ids.shape[0] else ids[:0]
                if to.shape[0] and destination != rank:
                    parts.append((t, _log_of(ids[to], [keys[i] for i in to.tolist()])))
            payloads.append(pack(parts) if parts else np.zeros(0, dtype=np.uint8))
        send = np.array([p.shape[0] for p in payloads], dtype=np.int64)
        sizes, _ = exchange.splits(send)
        got = exchange.all_to_all(torch.from_numpy(np.concatenate(payloads)), send, sizes)
    got = got.numpy()
    for source, (start, size) in enumerate(zip(np.cumsum(sizes) - sizes, sizes)):
        if size and source != rank:
            for t, log in unpack(got[start:start + size]):
                lookups[t][0].table.key_log.merge(log)


def _log_of(ids: np.ndarray, keys: list) -> KeyLog:
    log = KeyLog()
    log.add(ids, keys)
    return log
