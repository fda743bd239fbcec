"""Compaction: folds a chain of delta checkpoints into one full checkpoint.

The result has the same id and content as the chain's newest checkpoint, so deltas saved
later can name it as their parent. It is written like any checkpoint (staging directory,
manifest last, rename), streaming a bounded number of buckets at a time through a merge of
the chain's rows files; one rows file per rank of the newest checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from dynembed.checkpoint import manifest as mf
from dynembed.checkpoint.api import (
    DENSE,
    check_chunk_rows,
    check_not_under_a_file,
    checkpoint_path,
)
from dynembed.checkpoint.lazy import DEFAULT_CHUNK_ROWS, LazyRows
from dynembed.checkpoint.rows_file import RowsFile, RowsFileWriter
from dynembed.keys.buckets import rank_buckets


def compact(path: str | os.PathLike, out: str | os.PathLike, *,
            chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Path:
    """Writes the checkpoint at ``path`` (base + deltas) as one full checkpoint at ``out``.

    Args:
        path: a committed checkpoint, usually the end of a delta chain.
        out: the directory to create (it must not exist).
        chunk_rows: rows merged at a time.

    Returns:
        ``out``.

    Raises:
        FileExistsError: ``out`` exists.
        NotADirectoryError: ``out`` lies under a file.
        CheckpointNotFoundError, CheckpointCorruptError: a link of the chain is missing or
            damaged.
        TypeError: ``path`` or ``out`` is not a str or os.PathLike.
        ValueError: ``chunk_rows`` is not an int >= 1.
    """
    checkpoint_path(path)
    target = checkpoint_path(out, "out")
    check_chunk_rows(chunk_rows)
    if target.exists():
        raise FileExistsError(f"{target} exists; give compact() a new directory")
    check_not_under_a_file(target, "out")
    chain = mf.chain(path)
    mf.check_chain(chain)
    newest_dir, newest = chain[-1]
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    world, buckets = newest["world_size"], newest["num_buckets"]
    files, tables = {}, {}
    for name, entry in newest["tables"].items():
        (staging / "tables" / name).mkdir(parents=True)
        layers = []
        for folder, manifest in reversed(chain):
            if name in manifest["tables"]:
                layers.append([RowsFile(str(folder / s["rows_file"]))
                               for s in manifest["tables"][name]["shards"]])
        shards = []
        for shard in sorted(entry["shards"], key=lambda s: s["rank"]):
            rank = shard["rank"]
            merged = LazyRows(layers, rank_buckets(rank, world, buckets), entry["dim"],
                              entry["state_width"])
            rows_name = f"tables/{name}/rank-{rank:05d}-of-{world:05d}.rows"
            writer = RowsFileWriter(str(staging / rows_name), dim=entry["dim"],
                                    width=entry["state_width"], num_buckets=buckets,
                                    rows=merged.count(chunk_rows))
            try:
                for ids, records in merged.chunks(chunk_rows):
                    writer.append_records(ids, records)
                files[rows_name] = {"bytes": writer.commit()}
            except BaseException:
                writer.abort()
                raise
            shutil.copyfile(newest_dir / shard["aux"], staging / shard["aux"])
            files[shard["aux"]] = newest["files"][shard["aux"]]
            shards.append({**shard, "rows_file": rows_name, "rows": writer.layout.rows,
                           "deleted": 0, "live_change": writer.layout.rows})
        tables[name] = {**entry, "shards": shards, "rows": entry["live_rows"], "deleted": 0}
    if newest.get("dense"):
        shutil.copyfile(newest_dir / DENSE, staging / DENSE)
        files[DENSE] = newest["files"][DENSE]
    for file in files:
        with open(staging / file, "rb+") as f:
            os.fsync(f.fileno())
    # every folder between a file and the staging directory (``tables/`` too): the
    # manifest below commits them, and the caller may delete the delta chain next
    folders = {parent for file in files for parent in Path(file).parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        mf.fsync_dir(staging / folder)
    manifest = {**newest, "kind": "full", "parent": None, "chain_length": 1,
                "compacted": time.time(), "tables": tables, "files": files}
    mf.write_atomic(staging / mf.MANIFEST, mf.encode(manifest))
    os.replace(staging, target)
    mf.fsync_dir(target.parent)
    return target
