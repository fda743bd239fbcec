"""save() and load(): one consistent cut of a model's tables, dense state and user state.

A checkpoint directory::

    MANIFEST.json                         written last: commits the checkpoint
    dense.pt                              model (without table rows), optimizer, extra
    tables/<table>/rank-00000-of-00002.rows   rows in bucket-hash order (rows_file.py)
    tables/<table>/rank-00000.aux.pt      counters, seed, key log, admission state

Each rank of a job writes its tables' shards into ``<path>.partial`` and a part file; the
rank that completes the set writes the manifest and renames the directory into place. A
crash at any moment leaves no directory at ``path`` (the partial one is ignored and
removed later), so the previous checkpoint stays the latest. A delta checkpoint holds the
rows changed since its parent and the ids deleted since, and names the parent.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import itertools
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynembed._args import check_bool, check_int, check_names
from dynembed.checkpoint import manifest as mf
from dynembed.checkpoint.lazy import DEFAULT_CHUNK_ROWS, LazyRows
from dynembed.checkpoint.rows_file import RowsFile
from dynembed.checkpoint.table_io import check_fits, restore, write_shard
from dynembed.errors import CheckpointCorruptError, CheckpointError, StateDictError
from dynembed.keys.buckets import (
    NUM_BUCKETS,
    buckets_of,
    check_num_buckets,
    rank_buckets,
    rank_of_bucket,
)
from dynembed.nn._base import anchor_ids, named_tables, without_tables
from dynembed.table.table import DynamicTable

DENSE = "dense.pt"
# Exact types: torch.save pickles a subclass (np.float64 is a float, an IntEnum an int, a
# namedtuple a tuple) as its own class, which weights_only=True then refuses to load.
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
_MAPPINGS = (dict, collections.OrderedDict)


def _check_plain(value, where: str) -> None:
    """Raises TypeError unless ``value`` loads with ``torch.load(weights_only=True)``."""
    kind = type(value)
    if kind in _MAPPINGS:
        for k, v in value.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    elif kind in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif kind not in _PLAIN and not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}; checkpoints hold "
                        "only tensors, Python numbers, str, bool, None and dicts/lists of them "
                        "(they load with weights_only=True); convert it first, e.g. float(x), "
                        "int(x), dict(x), x.tolist() or torch.from_numpy(x) for a numpy array "
                        "(list(x) would hold numpy scalars)")


def check_chunk_rows(chunk_rows: int) -> int:
    """``chunk_rows`` as a Python int; raises ValueError unless it is an int >= 1 (Python
    or numpy)."""
    return check_int("chunk_rows", chunk_rows)


def check_restore_options(lazy: bool, background_rows: int, lazy_arg: str = "lazy") -> None:
    """Raises TypeError / ValueError naming a non-bool ``lazy`` or a ``background_rows``
    that is not an int >= 0."""
    if not isinstance(lazy, bool):
        raise TypeError(f"{lazy_arg} must be True or False, got {lazy!r}")
    check_int("background_rows", background_rows, minimum=0)


def _check_rank(rank: int, world_size: int) -> None:
    rank_buckets(rank, world_size)  # raises ValueError naming the bad argument


def checkpoint_path(path, arg: str = "path", what: str = "checkpoint directory") -> Path:
    """``path`` as a Path; raises TypeError naming ``arg`` if it is not one, and ValueError
    if it is empty (``Path("")`` is the current directory)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a str or os.PathLike {what}, got "
                        f"{type(path).__name__}")
    if not os.fspath(path):
        raise ValueError(f"{arg} is empty; give the {what} (\".\" for the current one)")
    return Path(path)


def check_not_under_a_file(target: Path, arg: str) -> None:
    """Raises NotADirectoryError naming ``arg`` if a checkpoint cannot be made at ``target``
    because one of its parents is a file."""
    blocking = next((p for p in target.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise NotADirectoryError(f"{arg}: {blocking} is a file, so no checkpoint can be made "
                                 f"under it at {target}; choose a path inside a directory")


def _gather_tables(model: nn.Module | None, tables: dict | None) -> dict[str, DynamicTable]:
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if tables is not None and not isinstance(tables, dict):
        raise TypeError(f"tables must be a dict of name -> DynamicTable, got "
                        f"{type(tables).__name__}; e.g. tables={{'items': table}}")
    found = named_tables(model) if model is not None else {}
    for name, table in (tables or {}).items():
        _check_table_name(name)
        if not isinstance(table, DynamicTable):
            raise TypeError(f"tables[{name!r}] must be a DynamicTable, got "
                            f"{type(table).__name__}")
        if name in found and found[name] is not table:
            raise ValueError(f"tables[{name!r}] clashes with the model's table of that name")
        found[name] = table
    return found


def _check_table_name(name) -> None:
    """Raises ValueError unless ``name`` (a key of ``tables``) can name a table's folder of a
    checkpoint: "." and ".." once wrote the rows file into the checkpoint (or its parent)
    itself. A model's tables are named by their modules, which refuse such names."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError("tables keys must be non-empty names without '/', other than '.' "
                         f"and '..' (each names a folder of the checkpoint), got {name!r}")


def _replicated(table: DynamicTable) -> bool:
    """Every rank holds all of the table's rows (each saves its buckets, loads them all)."""
    return table.config.placement == "replicated"


def _rank_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _shared_id(staging: Path) -> str:
    """The checkpoint id all ranks writing into ``staging`` agree on (the first one wins)."""
    target = staging / "ID"
    if not target.exists():
        tmp = staging / f".ID.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
        tmp.unlink()
    return target.read_text().strip()


def save(path: str | os.PathLike, model: nn.Module | None = None,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None, *,
         tables: dict[str, DynamicTable] | None = None, parent: str | os.PathLike | None = None,
         rank: int = 0, world_size: int = 1, num_buckets: int | None = None,
         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Path | None:
    """Saves a checkpoint of every table in ``model`` (and ``tables``), the model's dense
    state, the optimizer's state and ``extra`` (e.g. ``{"step": 100}``).

    Args:
        path: the checkpoint directory to create (it must not exist).
        model: a module whose dynembed tables and dense parameters are saved.
        optimizer: the dense optimizer (its ``state_dict()`` is saved).
        extra: user state: tensors, numbers, str and dicts/lists of them.
        tables: more tables by name.
        parent: for a delta checkpoint, the checkpoint the tables were last saved to or
            restored from; only rows changed since are written.
        rank, world_size: this process's place in a job; each rank saves its own table
            shards (dense state and ``extra`` come from rank 0; a table with
            ``placement="replicated"`` saves the rows of this rank's buckets).
        num_buckets: key buckets of the rows files (a power of two); by default the
            parent's for a delta (a delta must use its parent's) and 4,096 otherwise.
        chunk_rows: rows copied at a time (bounds the extra memory of the save).

    Returns:
        ``path`` once the checkpoint is committed, or None when other ranks have not
        written their part yet (the last one commits it).

    Raises:
        FileExistsError: ``path`` exists.
        CheckpointError: a table has deferred gradients not applied yet, or a delta's
            parent is not the checkpoint the tables' changes are tracked since.
        ValueError, TypeError: a bad argument (named in the message).
    """
    target = checkpoint_path(path)
    _check_rank(rank, world_size)
    if num_buckets is not None:
        check_num_buckets(num_buckets)
    chunk_rows = check_chunk_rows(chunk_rows)
    if optimizer is not None and not hasattr(optimizer, "state_dict"):
        raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
    if extra is not None:
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        _check_plain(extra, "extra")
    if rank == 0:  # what rank 0 saves must load: an optimizer's lr may be a numpy float
        if model is not None:
            with without_tables():
                _check_plain(model.state_dict(), "model.state_dict()")
        if optimizer is not None:
            _check_plain(optimizer.state_dict(), "optimizer.state_dict()")
    found = _gather_tables(model, tables)
    if not found and model is None and optimizer is None and extra is None:
        raise ValueError("nothing to save: give model=, optimizer=, extra= or tables=")
    if target.exists():
        raise FileExistsError(f"{target} exists; checkpoints are never overwritten, choose a "
                              "new path (CheckpointManager names them by step)")
    check_not_under_a_file(target, "path")
    for name, table in found.items():
        if table.has_pending_gradients:
            raise CheckpointError(f"table {name!r} holds deferred gradients not applied yet; "
                                  "call de.sparse_step(model) before saving")
    parent_chain = mf.chain(checkpoint_path(parent, "parent")) if parent is not None else None
    parent_manifest = parent_chain[-1][1] if parent_chain else None
    if parent_manifest is not None:
        if num_buckets is not None and num_buckets != parent_manifest["num_buckets"]:
            raise ValueError(
                f"num_buckets={num_buckets} differs from the parent's "
                f"{parent_manifest['num_buckets']} ({parent}): a delta checkpoint uses its "
                "parent's buckets; leave num_buckets out, or save a full checkpoint "
                "(parent=None)")
        num_buckets = parent_manifest["num_buckets"]
        for name, table in found.items():
            if table.changes.wiped or table.changes.since != parent_manifest["id"]:
                raise CheckpointError(
                    f"table {name!r} tracks its changes since checkpoint "
                    f"{table.changes.since}, not {parent_manifest['id']} ({parent}); save a "
                    "full checkpoint (parent=None)")
    elif num_buckets is None:
        num_buckets = NUM_BUCKETS
    staging = target.with_name(target.name + ".partial")
    if world_size == 1 and staging.exists():
        shutil.rmtree(staging)  # a crashed earlier attempt
    (staging / "parts").mkdir(parents=True, exist_ok=True)
    checkpoint_id = _shared_id(staging)
    part = {"tables": {}, "files": {}, "id": checkpoint_id, "num_buckets": num_buckets,
            "parent": parent_manifest["id"] if parent_manifest else None}
    for name, table in found.items():
        folder = staging / "tables" / name
        folder.mkdir(parents=True, exist_ok=True)
        rows_name = f"tables/{name}/{_rank_name(rank, world_size)}.rows"
        parent_rows = None
        if parent_chain is not None:
            parent_rows = _lazy_rows(parent_chain, name, range(num_buckets), table, strict=True)
        written = write_shard(table, staging / rows_name, num_buckets=num_buckets,
                              parent=parent_rows,
                              buckets=rank_buckets(rank, world_size, num_buckets),
                              clip=_replicated(table), chunk_rows=chunk_rows)
        aux_name = f"tables/{name}/rank-{rank:05d}.aux.pt"
        torch.save(table.aux_state(), staging / aux_name)
        part["files"][rows_name] = {"bytes": written.bytes}
        part["files"][aux_name] = {"bytes": (staging / aux_name).stat().st_size,
                                   "crc32": mf.file_crc(staging / aux_name)}
        part["tables"][name] = {
            "dim": table.dim, "state_width": table.arena.state_width,
            "optimizer": repr(table.optimizer), "key_log": table.key_log is not None,
            "hash_seed": table.config.hash_seed,
            "shard": {"rank": rank, "rows_file": rows_name, "aux": aux_name,
                      "rows": written.rows, "deleted": written.deleted,
                      "live_change": written.live_change}}
    if rank == 0 and (model is not None or optimizer is not None or extra is not None):
        dense = {"model": None, "optimizer": None, "extra": extra}
        if model is not None:
            with without_tables():
                dense["model"] = model.state_dict()
        if optimizer is not None:
            dense["optimizer"] = optimizer.state_dict()
        torch.save(dense, staging / DENSE)
        part["files"][DENSE] = {"bytes": (staging / DENSE).stat().st_size,
                                "crc32": mf.file_crc(staging / DENSE)}
        part["dense"] = DENSE
    for folder, _, files in os.walk(staging / "tables"):
        for file in files:  # rows files are synced by their writer
            if file.endswith(".aux.pt"):
                with open(Path(folder) / file, "rb+") as f:
                    os.fsync(f.fileno())
        mf.fsync_dir(Path(folder))  # the new entries of each directory too
    if DENSE in part["files"]:
        with open(staging / DENSE, "rb+") as f:
            os.fsync(f.fileno())
    mf.write_atomic(staging / "parts" / f"rank-{rank:05d}.json", json.dumps(part).encode())
    for table in found.values():
        table.mark_saved(checkpoint_id)
    info = {"id": checkpoint_id, "world_size": world_size, "num_buckets": num_buckets,
            "parent": parent_manifest, "parent_path": parent}
    return _commit(staging, target, info)


def _commit(staging: Path, target: Path, info: dict) -> Path | None:
    """Writes the manifest and renames ``staging`` to ``target`` once every rank's part is
    there; exactly one rank does it."""
    world_size = info["world_size"]
    parts = [staging / "parts" / f"rank-{r:05d}.json" for r in range(world_size)]
    if not all(p.exists() for p in parts):
        return None
    try:
        fd = os.open(staging / "COMMIT", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except (FileExistsError, FileNotFoundError):  # another rank commits, or has committed
        return None
    tables, files, dense = {}, {}, None
    expected = (info["id"], info["num_buckets"],
                info["parent"]["id"] if info["parent"] else None)
    for p in parts:
        part = json.loads(p.read_text())
        if (part["id"], part["num_buckets"], part["parent"]) != expected:
            raise CheckpointError(
                f"{p}: this rank wrote checkpoint {part['id']} ({part['num_buckets']} buckets, "
                f"parent {part['parent']}) but another wrote {expected[0]} ({expected[1]} "
                f"buckets, parent {expected[2]}); all ranks must save the same checkpoint "
                "(the same step, and full or delta alike)")
        files.update(part["files"])
        dense = part.get("dense", dense)
        for name, t in part["tables"].items():
            entry = tables.setdefault(name, {k: v for k, v in t.items() if k != "shard"}
                                      | {"shards": []})
            if (entry["dim"], entry["state_width"]) != (t["dim"], t["state_width"]):
                raise CheckpointError(f"table {name!r} has dim/state width "
                                      f"{entry['dim']}/{entry['state_width']} on one rank and "
                                      f"{t['dim']}/{t['state_width']} on another")
            entry["shards"].append(t["shard"])
    for name, entry in tables.items():
        ranks = sorted(s["rank"] for s in entry["shards"])
        if ranks != list(range(world_size)):
            raise CheckpointError(f"table {name!r} was saved by ranks {ranks} of "
                                  f"{world_size}; every rank must save every sharded table")
    parent = info["parent"]
    for name, entry in tables.items():
        change = sum(s["live_change"] for s in entry["shards"])
        before = parent["tables"].get(name, {}).get("live_rows", 0) if parent else 0
        entry["live_rows"] = before + change
        entry["rows"] = sum(s["rows"] for s in entry["shards"])
        entry["deleted"] = sum(s["deleted"] for s in entry["shards"])
    manifest = {
        "format": mf.FORMAT, "version": mf.VERSION, "id": info["id"],
        "kind": "full" if parent is None else "delta",
        "parent": None if parent is None else {
            "id": parent["id"],
            "path": os.path.relpath(Path(info["parent_path"]).resolve(), target.resolve())},
        "chain_length": 1 if parent is None else parent.get("chain_length", 1) + 1,
        "created": time.time(), "world_size": world_size,
        "num_buckets": info["num_buckets"], "dense": dense, "tables": tables, "files": files}
    mf.write_atomic(staging / mf.MANIFEST, mf.encode(manifest))
    (staging / "ID").unlink()
    shutil.rmtree(staging / "parts")
    # COMMIT goes only after the rename: a rank that found every part a moment ago and
    # tries to commit too then finds COMMIT or no staging directory. Removed earlier, it let
    # that rank commit again and read parts being deleted.
    os.replace(staging, target)
    (target / "COMMIT").unlink()  # only the manifest's files stay
    mf.fsync_dir(target.parent)
    return target


def _lazy_rows(chain: list[tuple[Path, dict]], name: str, buckets: range, table: DynamicTable,
               *, strict: bool) -> LazyRows:
    """The rows of table ``name`` along a checkpoint chain (newest first)."""
    layers = []
    for folder, manifest in reversed(chain):
        entry = manifest["tables"].get(name)
        if entry is None:
            if strict and folder == chain[-1][0]:
                raise CheckpointError(f"checkpoint {folder} has no table {name!r}; it has "
                                      f"{sorted(manifest['tables'])}")
            continue
        layers.append([RowsFile(str(folder / s["rows_file"])) for s in entry["shards"]])
    return LazyRows(layers, buckets, table.dim, table.arena.state_width)


DROPPABLE = ("admission", "key_log")
"""The table state :func:`load` may drop without a warning (its ``dropped``)."""


def load(path: str | os.PathLike, model: nn.Module | None = None,
         optimizer: torch.optim.Optimizer | None = None, *,
         tables: dict[str, DynamicTable] | None = None, lazy: bool = False,
         background_rows: int = 0, rank: int = 0, world_size: int = 1, strict: bool = True,
         chunk_rows: int = DEFAULT_CHUNK_ROWS, dropped: tuple[str, ...] = ()) -> dict | None:
    """Restores a checkpoint (base plus deltas) into ``model``, ``optimizer`` and ``tables``.

    Args:
        path: a committed checkpoint directory.
        model: its dynembed tables and dense parameters are restored.
        optimizer: the dense optimizer.
        tables: more tables by name.
        lazy: open the tables' rows for lookups to fault in on first use instead of loading
            them now; the first lookup is answered at once whatever the table size.
        background_rows: with ``lazy``, rows each training lookup also loads, so the whole
            table arrives over time (0: only what lookups ask for).
        rank, world_size: this process's place in a job: its tables take the rows of the
            buckets it owns, whatever world size wrote the checkpoint (tables with
            ``placement="replicated"`` take every bucket).
        strict: every table and dense parameter must be in the checkpoint.
        chunk_rows: rows loaded at a time (bounds the extra memory of an eager load).
        dropped: state among :data:`DROPPABLE` that tables built without a place for it
            drop quietly. Otherwise such state warns (a table built without
            ``key_log=True`` or an admission policy by mistake); the library's own loads
            into tables built so on purpose (a model package's read-only tables admit no
            keys) pass ``("admission",)``.

    Returns:
        The ``extra`` dict given to :func:`save` (None if none), its tensors on the CPU.

    Raises:
        CheckpointNotFoundError: no committed checkpoint at ``path``.
        CheckpointCorruptError: a file is missing, truncated or damaged (named).
        CheckpointError: a table is not in the checkpoint or does not fit it; the dense
            state does not fit ``model`` or ``optimizer`` (torch's error is the cause; they
            are left as they were); with ``strict``, the checkpoint holds no dense state
            for a model that has some, or no optimizer state for ``optimizer``.
        ValueError: a bad ``rank``/``world_size``, ``background_rows``, ``chunk_rows`` or
            ``dropped``.
    """
    check_bool("strict", strict)
    dropped = check_names("dropped", dropped)
    unknown = sorted(set(dropped) - set(DROPPABLE))
    if unknown:
        raise ValueError(f"dropped must name state among {list(DROPPABLE)}, got {unknown}")
    _check_rank(rank, world_size)
    checkpoint_path(path)
    check_restore_options(lazy, background_rows)
    background_rows, chunk_rows = int(background_rows), check_chunk_rows(chunk_rows)
    found = _gather_tables(model, tables)
    chain = mf.chain(path)
    mf.check_chain(chain)
    folder, manifest = chain[-1]
    if strict:
        unknown = sorted(set(manifest["tables"]) - set(found))
        if unknown and model is not None:
            unmatched = sorted(set(found) - set(manifest["tables"]))
            renamed = (f"; the model's tables {unmatched} are not in it (renamed?)"
                       if unmatched else "")
            raise CheckpointError(f"checkpoint {folder} has tables {unknown} that the model "
                                  f"does not{renamed}; pass strict=False to ignore them")
    routed = sorted({t.router.num_buckets for t in found.values() if t.router is not None})
    if routed and routed != [manifest["num_buckets"]]:  # keys would load on other ranks
        raise CheckpointError(f"checkpoint {folder} has {manifest['num_buckets']} key buckets "
                              f"but the model was sharded with {routed[0]}; shard it with "
                              f"num_buckets={manifest['num_buckets']} (Runtime or shard_model)")
    buckets = rank_buckets(rank, world_size, manifest["num_buckets"])
    plans = []
    for name, table in found.items():  # open and check the tables before changing anything
        entry = manifest["tables"].get(name)
        if entry is None:
            if strict:
                raise CheckpointError(f"checkpoint {folder} has no table {name!r}; it has "
                                      f"{sorted(manifest['tables'])}")
            continue
        _check_config(name, table, entry, folder)
        shards = sorted(entry["shards"], key=lambda s: s["rank"])
        writer = int(rank_of_bucket([buckets.start], manifest["world_size"],
                                    manifest["num_buckets"])[0]) if len(buckets) else 0
        auxes = [torch.load(folder / s["aux"], weights_only=True, map_location="cpu")
                 for s in shards]
        own = next((i for i, s in enumerate(shards) if s["rank"] == writer), 0)
        others = [a for i, a in enumerate(auxes) if i != own]
        table_buckets = range(manifest["num_buckets"]) if _replicated(table) else buckets
        # a shard held keys of only its buckets: merge the admission state of those that
        # held some of ours (replicas each saw every key: theirs is the same state)
        held = [rank_buckets(s["rank"], manifest["world_size"], manifest["num_buckets"])
                for s in shards]
        admissions = [] if _replicated(table) else [
            auxes[i] for i, r in enumerate(held) if i != own
            and r.start < table_buckets.stop and table_buckets.start < r.stop]
        layers = _lazy_rows(chain, name, table_buckets, table, strict=True).layers
        check_fits(table, layers)
        # a save keeps each rank's log (its rows' strings, and in checkpoints of earlier
        # versions the strings it asked for): merged whole at another world size, each
        # shard would hold every key's string (W copies in W ranks)
        keep = None if len(table_buckets) == manifest["num_buckets"] else functools.partial(
            _in_buckets, buckets=table_buckets, num_buckets=manifest["num_buckets"])
        aux = _decoded_aux(name, table, folder, auxes[own], others, admissions, dropped, keep)
        if not _replicated(table) and manifest["world_size"] != world_size:
            # each shard counted its own keys: the job's counters are their sum, which
            # the rank of bucket 0 takes (one shard's, or the total on every rank, lied)
            aux = dataclasses.replace(
                aux, counters=_job_counters(auxes, table_buckets.start == 0))
        plans.append((table, table_buckets, layers, aux))
    extra = None
    dense = None
    if manifest.get("dense") is not None:
        # on the CPU: load_state_dict copies the weights to the model's device and the
        # optimizer casts its state to its parameters'. Loaded where saved, a GPU job's
        # state (rank 0's GPU) went onto that one GPU in every rank, or failed to load
        # where that GPU does not exist
        dense = torch.load(folder / manifest["dense"], weights_only=True, map_location="cpu")
    if strict:  # before anything changes, as the checks of the tables above
        _check_dense_saved(model, optimizer, dense, folder)
    if dense is not None:  # first: a model that does not fit changes nothing
        _load_dense(model, optimizer, dense, strict=strict, folder=folder)
        extra = dense["extra"]
    for table, table_buckets, layers, aux in plans:
        if (table.tier is not None and table.tier.store.shared and table.tier.owned is None
                and len(table_buckets) < manifest["num_buckets"]):
            # a shard over a store the ranks share, restored before shard_model: it must
            # clear (and later scan) only its own rows there, as once sharded
            table.tier.owned = (table_buckets, manifest["num_buckets"])
        restore(table, layers, table_buckets, aux, since=manifest["id"], lazy=lazy,
                background_rows=background_rows, chunk_rows=chunk_rows)
    return extra


def read_dense_model(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The model state (``model.state_dict()``, table rows aside) saved in the checkpoint
    at ``path``, or None where it was saved without ``model=``.

    Reads the one small file, checked against the manifest's size and CRC-32 first, not
    the tables: a server takes the dense weights of the checkpoint whose tables it serves.

    Raises:
        CheckpointNotFoundError: ``path`` holds no committed checkpoint.
        CheckpointCorruptError: the manifest or the dense state's file is damaged.
        CheckpointError: the file is sound but does not load (e.g. written by a newer
            torch).
    """
    folder = checkpoint_path(path)
    manifest = mf.read(folder)
    name = manifest.get("dense")
    if name is None:
        return None
    if name not in manifest["files"]:
        raise CheckpointCorruptError(f"{folder / mf.MANIFEST}: names the dense state {name} "
                                     "but lists no such file", path=folder)
    mf.check_files(folder, {"files": {name: manifest["files"][name]}})
    try:  # mapped: the optimizer state in the same file is never copied into memory; on
        # the CPU: a job that trained its dense layers on a GPU saved cuda tensors
        dense = torch.load(folder / name, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - it passed its CRC: not damage, say what failed
        raise CheckpointError(f"{folder / name}: the dense state does not load: {e}") \
            from None
    return dense["model"]


def _check_dense_saved(model: nn.Module | None, optimizer: torch.optim.Optimizer | None,
                       dense: dict | None, folder: Path) -> None:
    """Raises CheckpointError where a strict load would leave the model's dense state or
    the optimizer's as they are because the checkpoint holds none (saved with ``tables=``
    only, or without ``model=`` / ``optimizer=``): the load would otherwise restore the
    tables and keep, say, a freshly initialised head without a word.

    A model whose state is all in its tables has no dense state to miss.
    """
    if model is not None and (dense is None or dense["model"] is None):
        with without_tables():
            names = sorted(model.state_dict())
        if names:
            shown = names[:5] + (["..."] if len(names) > 5 else [])
            raise CheckpointError(
                f"checkpoint {folder} holds no dense model state (it was saved without "
                f"model=) but the model has dense state {shown}; load a checkpoint saved "
                "with model=, or pass strict=False to restore only the tables")
    if optimizer is not None and (dense is None or dense["optimizer"] is None):
        raise CheckpointError(
            f"checkpoint {folder} holds no optimizer state (it was saved without "
            "optimizer=); load a checkpoint saved with optimizer=, or pass strict=False to "
            "leave the optimizer as it is")


def _decoded_aux(name: str, table: DynamicTable, folder: Path, aux: dict, others: list,
                 admissions: list, dropped: tuple[str, ...], keep_ids=None):
    """The table's aux state decoded (so a mismatch fails before any table changes), its
    key log cut to the ids ``keep_ids`` keeps (see ``DynamicTable.read_aux_state``).

    Warns about a key log / admission state the table has no place for (dropped), unless
    the caller drops that state on purpose (named in ``dropped``).

    Raises:
        CheckpointError: the key log or admission state does not fit the table.
    """
    unused = sorted({k.split(".")[0] for k in table.unused_state_keys(aux)} - set(dropped))
    if unused:  # a warning, not an error: a job may resume with an option turned off
        warnings.warn(f"table {name!r} of checkpoint {folder} holds {unused} state that this "
                      "table has no place for (built without key_log=True / an admission "
                      "policy?); it is not loaded", stacklevel=4)
    try:
        return table.read_aux_state(aux, others, admissions, keep_ids)
    except StateDictError as e:
        raise CheckpointError(f"table {name!r} of checkpoint {folder} does not fit this "
                              f"table: {e}") from None


def _in_buckets(ids: np.ndarray, buckets: range, num_buckets: int) -> np.ndarray:
    """(n,) bool: whether each id's bucket is in ``buckets``."""
    of = buckets_of(ids, num_buckets)
    return (of >= buckets.start) & (of < buckets.stop)


def _job_counters(auxes: list[dict], mine: bool) -> dict[str, int]:
    """The sum of the shards' ``counters.*`` (zeros unless ``mine``)."""
    total: dict[str, int] = {}
    for aux in auxes:
        for key, value in aux.items():
            if key.startswith("counters."):
                name = key.removeprefix("counters.")
                total[name] = total.get(name, 0) + int(value)
    return total if mine else dict.fromkeys(total, 0)


def _snapshot(take):
    """``take()`` for a rollback, or None where that state cannot be copied now (a lazy
    module not yet run, an optimizer that must consolidate first): no rollback then."""
    try:
        with without_tables():
            return take()
    except Exception:  # noqa: BLE001 - a best effort; the load itself goes on
        return None


def _with_anchors(saved: dict, optimizer: torch.optim.Optimizer,
                  model: nn.Module | None) -> dict:
    """A dense optimizer state saved before dynembed modules had their anchor Parameter,
    fitted to an optimizer over ``model.parameters()``, which holds the anchors: each group
    the saved one's parameters, in order, with the anchors (which have no state) among
    them where they are now. Any other state is returned as it is (torch checks it)."""
    if model is None or len(saved.get("param_groups", ())) != len(optimizer.param_groups):
        return saved
    anchors = anchor_ids(model)
    fresh = itertools.count(1 + max((i for g in saved["param_groups"] for i in g["params"]),
                                    default=-1))
    groups, fitted = [], False
    for group, old in zip(optimizer.param_groups, saved["param_groups"]):
        dense = [p for p in group["params"] if id(p) not in anchors]
        if len(dense) != len(old["params"]):
            return saved  # not that case: torch's own check names the mismatch
        fitted |= len(dense) != len(group["params"])  # this group holds anchors
        ids = iter(old["params"])
        groups.append({**old, "params": [next(fresh) if id(p) in anchors else next(ids)
                                         for p in group["params"]]})
    return {**saved, "param_groups": groups} if fitted else saved


def _load_dense(model: nn.Module | None, optimizer: torch.optim.Optimizer | None,
                dense: dict, *, strict: bool, folder: Path) -> None:
    """Loads the dense model and optimizer state, all or nothing where their state can be
    copied first: a failure (a missing parameter, an optimizer of another shape) puts back
    what was there.

    Raises:
        CheckpointError: the state does not fit (torch's error, which names the parameters,
            is its cause and in its message).
    """
    saved_model = _snapshot(lambda: {k: v.detach().clone() if isinstance(v, torch.Tensor)
                                     else copy.deepcopy(v)
                                     for k, v in model.state_dict().items()}) \
        if model is not None else None
    saved_optimizer = _snapshot(lambda: copy.deepcopy(optimizer.state_dict())) \
        if optimizer is not None else None
    try:
        if model is not None and dense["model"] is not None:
            with without_tables():
                model.load_state_dict(dense["model"], strict=strict)
        if optimizer is not None and dense["optimizer"] is not None:
            optimizer.load_state_dict(_with_anchors(dense["optimizer"], optimizer, model))
    except Exception as e:
        with without_tables():
            if saved_model is not None:
                model.load_state_dict(saved_model)
        if saved_optimizer is not None:
            optimizer.load_state_dict(saved_optimizer)
        if (model is None or saved_model is not None) and (
                optimizer is None or saved_optimizer is not None):
            left = "the model and optimizer were left as they were"
        else:
            left = ("the model or optimizer could not be copied first (e.g. a lazy module "
                    "not yet run): it may be partly loaded")
        # a CheckpointError, not torch's RuntimeError: callers (`dynembed export`, a
        # server's follower) tell a checkpoint that does not fit from a bug this way
        why = " ".join(str(e).split())  # one line: torch lists the parameters on many
        raise CheckpointError(f"checkpoint {folder}: its dense state does not fit "
                              f"({type(e).__name__}: {why}); {left}") from e


def _check_config(name: str, table: DynamicTable, entry: dict, folder: Path) -> None:
    """Raises CheckpointError if the table's optimizer or string hashing differ from the
    saved table's (rows of the same width would load but mean something else)."""
    saved = entry["optimizer"].split("(")[0]
    ours = type(table.optimizer).__name__ if table.optimizer is not None else "None"
    if saved != ours:
        raise CheckpointError(f"table {name!r} of checkpoint {folder} was trained with "
                              f"{saved} but this table has {ours}; use the same optimizer")
    if entry.get("hash_seed", table.config.hash_seed) != table.config.hash_seed:
        raise CheckpointError(f"table {name!r} of checkpoint {folder} hashed strings with "
                              f"hash_seed={entry['hash_seed']} but this table uses "
                              f"{table.config.hash_seed}; every key would miss")
