"""What a checkpoint holds: tables, rows, sizes, optimizer, top keys; rows over time.

Used by ``dynembed inspect``; everything is also available as plain dicts for scripts.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from dynembed.checkpoint import manifest as mf
from dynembed.checkpoint.api import checkpoint_path
from dynembed.checkpoint.lazy import LazyRows
from dynembed.checkpoint.rows_file import RowsFile
from dynembed.errors import CheckpointError
from dynembed.keys.key_log import KeyLog

logger = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)")


def _finite(value):
    """``value`` (a number, or nested lists of them) with NaN and infinities as the strings
    "nan", "inf" and "-inf": JSON has no literal for them, and ``json.dumps`` would write
    NaN / Infinity, which strict parsers (jq, JavaScript) refuse. A best loss kept in
    ``extra`` starts at inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(float(value))  # float(): a numpy float64 is a float, with another repr
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _brief(value):
    """A value of ``extra`` as shown (plain JSON types): small values whole, big ones
    summarised, tensors and other objects inside containers too."""
    if isinstance(value, torch.Tensor):
        return _finite(value.tolist()) if value.numel() <= 8 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple)) and len(repr(value)) > 80:
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, dict):
        return {str(k): _brief(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_brief(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return _finite(value)
    return repr(value)  # e.g. a numpy scalar: shown, never a JSON error


def _top_keys(chain, name: str, entry: dict, top: int) -> list[dict]:
    """The ``top`` rows with the highest counts (streamed), with their strings when the
    table kept a key log."""
    layers = [[RowsFile(str(folder / s["rows_file"])) for s in m["tables"][name]["shards"]]
              for folder, m in reversed(chain) if name in m["tables"]]
    merged = LazyRows(layers, range(chain[-1][1]["num_buckets"]), entry["dim"],
                      entry["state_width"])
    best_ids, best_counts = np.empty(0, np.int64), np.empty(0, np.int64)
    for block in merged.rows():
        ids = np.concatenate([best_ids, block.ids])
        counts = np.concatenate([best_counts, block.counts])
        keep = np.argsort(-counts, kind="stable")[:top]
        best_ids, best_counts = ids[keep], counts[keep]
    keys = [None] * best_ids.shape[0]
    if entry.get("key_log"):
        folder, manifest = chain[-1]
        log = KeyLog()
        for shard in manifest["tables"][name]["shards"]:
            aux = torch.load(folder / shard["aux"], weights_only=True, map_location="cpu")
            part = KeyLog()
            part.load_state_dict({k[len("key_log."):]: v for k, v in aux.items()
                                  if k.startswith("key_log.")})
            log.merge(part)
        keys = log.lookup(best_ids)
    # a bytes key that is not UTF-8 is given as its Python literal (b'\xff...'), and
    # key_is_bytes says so: the summary is printed and written as JSON, which has no bytes
    return [{"id": int(i), "key": repr(k) if isinstance(k, bytes) else k, "count": int(c),
             "key_is_bytes": isinstance(k, bytes)}
            for i, k, c in zip(best_ids, keys, best_counts)]


def describe(path: str | os.PathLike, *, top: int = 10) -> dict:
    """A summary of the checkpoint at ``path``.

    Returns:
        ``{"path", "id", "kind", "parent", "chain_length", "created", "world_size",
        "num_buckets", "extra", "tables": {name: {"rows", "rows_in_files", "deleted",
        "dim", "state_width", "optimizer", "bytes", "top_keys"}}}``.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError: a link of the chain is missing,
            or a file is damaged.
        ValueError: ``top`` is not an int >= 0.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an int >= 0 (0: no top keys), got {top!r}")
    chain = mf.chain(checkpoint_path(path))
    for link, link_manifest in chain:
        mf.check_files(link, link_manifest)
    folder, manifest = chain[-1]
    extra = None
    if manifest.get("dense"):
        # mapped, on the CPU: only extra is read, and a GPU job's state loads anywhere
        dense = torch.load(folder / manifest["dense"], weights_only=True, mmap=True,
                           map_location="cpu")
        extra = {k: _brief(v) for k, v in (dense.get("extra") or {}).items()}
    tables = {}
    for name, entry in manifest["tables"].items():
        size = sum(manifest["files"][s["rows_file"]]["bytes"] for s in entry["shards"])
        tables[name] = {
            "rows": entry["live_rows"], "rows_in_files": entry["rows"],
            "deleted": entry["deleted"], "dim": entry["dim"],
            "state_width": entry["state_width"], "optimizer": entry["optimizer"],
            "bytes": size, "top_keys": _top_keys(chain, name, entry, top) if top else []}
    return {"path": str(folder), "id": manifest["id"], "kind": manifest["kind"],
            "parent": (manifest["parent"] or {}).get("path"),
            "chain_length": manifest["chain_length"], "created": manifest["created"],
            "world_size": manifest["world_size"], "num_buckets": manifest["num_buckets"],
            "extra": extra, "tables": tables}


def history(directory: str | os.PathLike) -> list[dict]:
    """Rows per table of every committed checkpoint in ``directory``, oldest first:
    ``[{"path", "step", "created", "kind", "rows": {table: rows}}]`` (step from the
    directory name ``step-N``, else None)."""
    out = []
    for entry in sorted(checkpoint_path(directory, "directory").iterdir()):
        if ".damaged" in entry.name or entry.name.endswith((".partial", ".deleting")) \
                or not (entry / mf.MANIFEST).exists():
            continue  # set aside by CheckpointManager.restore, never committed, or going
        try:
            manifest = mf.read(entry)
        except CheckpointError as e:
            logger.warning("skipping %s: %s", entry, e)
            continue
        match = _STEP.match(entry.name)
        out.append({"path": str(entry), "step": int(match.group(1)) if match else None,
                    "created": manifest["created"], "kind": manifest["kind"],
                    "rows": {n: t["live_rows"] for n, t in manifest["tables"].items()}})
    out.sort(key=lambda h: (h["step"] if h["step"] is not None else -1, h["created"]))
    return out


def history_of(path: str | os.PathLike) -> list[dict]:
    """:func:`history` of what ``path`` belongs to: a directory of checkpoints, or one
    checkpoint with its job's others (``step-N`` siblings, as a CheckpointManager keeps
    them). A checkpoint named otherwise stands alone: the directory beside it may hold
    anything (another model's checkpoint was listed as this one's history)."""
    path = checkpoint_path(path)
    if not (path / mf.MANIFEST).exists():
        return history(path)
    if _STEP.match(path.name):
        return [p for p in history(path.parent) if _STEP.match(Path(p["path"]).name)]
    return [p for p in history(path.parent) if Path(p["path"]) == path]


def plot_history(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Draws rows per table across the checkpoints of ``directory`` (or, for one
    checkpoint, of :func:`history_of` it) into a PNG.

    Raises:
        ValueError: the directory holds no checkpoint.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoint_path(out, "out", "PNG file")
    points = history_of(checkpoint_path(directory, "directory"))
    if not points:
        raise ValueError(f"{directory} holds no committed checkpoint to plot")
    by_step = all(p["step"] is not None for p in points)
    xs = [p["step"] if by_step else i for i, p in enumerate(points)]
    names = sorted({n for p in points for n in p["rows"]})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        ax.plot(xs, [p["rows"].get(name, np.nan) for p in points], marker="o", label=name)
    ax.set_xlabel("step" if by_step else "checkpoint")
    ax.set_ylabel("rows")
    ax.set_title(f"Rows per table: {Path(directory).name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
