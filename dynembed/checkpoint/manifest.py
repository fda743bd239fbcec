"""The manifest: the file that makes a checkpoint directory a checkpoint.

A checkpoint is committed by writing ``MANIFEST.json`` last (written to a temporary name,
synced, renamed) into a staging directory that is then renamed into place, so a reader sees
either the whole checkpoint or none of it. The manifest lists every file with its size (and
a CRC-32 for the small ones), every table with its shape and shards, the parent a delta is
chained to, and a checksum of itself.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from dynembed.errors import CheckpointCorruptError, CheckpointNotFoundError

MANIFEST = "MANIFEST.json"
FORMAT = "dynembed-checkpoint"
VERSION = 1


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new file inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a synced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_crc(path: Path) -> int:
    """CRC-32 of a whole (small) file."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _checksum(body: dict) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def encode(manifest: dict) -> bytes:
    """The manifest as JSON bytes, with its checksum."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return json.dumps({**body, "checksum": _checksum(body)}, indent=1,
                      sort_keys=True).encode()


def read(path: str | os.PathLike) -> dict:
    """The manifest of the checkpoint at ``path``, validated.

    Raises:
        CheckpointNotFoundError: ``path`` holds no committed checkpoint.
        CheckpointCorruptError: the manifest is damaged or of an unknown format.
    """
    file = Path(path) / MANIFEST
    try:
        raw = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: ``path`` is a file
        raise CheckpointNotFoundError(
            f"{path}: no committed checkpoint here ({MANIFEST} is missing); give a "
            "checkpoint directory, or use CheckpointManager.latest() to find one") from None
    try:
        manifest = json.loads(raw)
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        ok = manifest.get("checksum") == _checksum(body)
    except (ValueError, AttributeError):
        ok, manifest = False, {}
    if not ok:
        raise CheckpointCorruptError(f"{file}: the manifest is damaged (bad JSON or "
                                     "checksum); load an earlier checkpoint", path=file)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointCorruptError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('version')!r} "
            f"is not {FORMAT!r} version {VERSION}; upgrade dynembed", path=file)
    return manifest


def check_chain(links: list[tuple[Path, dict]]) -> None:
    """Checks the files a restore of a chain (:func:`chain`) reads: every link's with their
    sizes, and the newest link's with their CRC-32 too.

    The small files (dense state, per-table aux state with the whole key log) are read
    from the newest link only; the older links give their rows files, whose blocks check
    their own CRCs as they are read. Checking every link's small files read up to
    ``max_chain`` key logs at each save (the manager looks for the newest sound
    checkpoint), and one damaged in an older link, which no restore of the newest reads,
    made the newest count as damaged.

    Raises:
        CheckpointCorruptError: a file is missing, truncated, or fails its CRC.
    """
    for i, (folder, manifest) in enumerate(links):
        check_files(folder, manifest, crc=i == len(links) - 1)


DAMAGE_MARK = ".damaged"
"""Suffix of the marker file :func:`mark_damaged` leaves beside a damaged file."""


def mark_damaged(file: str | os.PathLike, reason: str) -> None:
    """Remembers that ``file`` of a committed checkpoint was found damaged when read, in a
    marker file beside it (``<file>.damaged``, holding ``reason``), which
    :func:`check_files` then reports.

    Rows files check their blocks only as they are read, so a lazy restore accepted a
    checkpoint with a damaged block and training failed at the first read of it; a job
    restarted with a plain :class:`~dynembed.checkpoint.CheckpointManager` restored the
    same checkpoint and failed again, for ever. Where the marker cannot be written (a
    read-only checkpoint), nothing is remembered: the damage is found again at its read.
    """
    marker = Path(f"{file}{DAMAGE_MARK}")
    try:
        with open(marker, "x") as f:
            f.write(reason)
    except OSError:  # marked already, or a read-only checkpoint
        pass


def check_files(path: Path, manifest: dict, *, crc: bool = True) -> None:
    """Checks that every file the manifest lists is there with its size (and CRC-32 where
    the manifest has one, unless ``crc`` is False), and that no earlier read found it
    damaged (:func:`mark_damaged`).

    Raises:
        CheckpointCorruptError: a file is missing, truncated, fails its CRC, or was found
            damaged when it was read.
    """
    for name, info in manifest["files"].items():
        file = path / name
        marker = file.with_name(file.name + DAMAGE_MARK)
        if marker.exists():
            try:
                reason = marker.read_text(errors="replace").strip()
            except OSError:  # removed meanwhile: the name says enough
                reason = ""
            raise CheckpointCorruptError(
                f"{file}: found damaged when it was read ({reason or 'see ' + str(marker)}); "
                "load an earlier checkpoint", path=file)
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{file}: missing; the checkpoint is incomplete, "
                                         "load an earlier one", path=file) from None
        if size != info["bytes"]:
            raise CheckpointCorruptError(f"{file}: {size} bytes, the manifest says "
                                         f"{info['bytes']} (truncated or replaced)", path=file)
        if crc and "crc32" in info and file_crc(file) != info["crc32"]:
            raise CheckpointCorruptError(f"{file}: its CRC-32 does not match the manifest; "
                                         "the file is damaged, load an earlier checkpoint",
                                         path=file)


def chain(path: str | os.PathLike) -> list[tuple[Path, dict]]:
    """The checkpoints a restore of ``path`` reads: its base first, then each delta.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError: a link of the chain is missing or
            damaged, or a parent is not the checkpoint the delta was written against.
    """
    out = []
    here = Path(path).resolve()
    while True:
        manifest = read(here)
        out.append((here, manifest))
        parent = manifest.get("parent")
        if parent is None:
            break
        there = (here / parent["path"]).resolve()
        try:
            parent_manifest = read(there)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"{here}: this delta checkpoint needs its parent {there}, which is gone; "
                "restore another checkpoint (CheckpointManager keeps chains whole)") from None
        if parent_manifest["id"] != parent["id"]:
            raise CheckpointCorruptError(
                f"{here}: its parent {there} is checkpoint {parent_manifest['id']}, not "
                f"{parent['id']} that the delta was written against", path=here)
        here = there
        if len(out) > 10_000:
            raise CheckpointCorruptError(f"{path}: the delta chain loops", path=path)
    return out[::-1]
