"""A job's progress as a small JSON file that rank 0 rewrites, and `dynembed train` shows.

The file is replaced atomically (write, then rename), so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PROGRESS_ENV = "DYNEMBED_PROGRESS_FILE"
"""Environment variable naming the progress file (set by ``dynembed train``)."""


class ProgressFile:
    """Writes ``{"step", "total", "state", "world_size", "restart_count", "metrics",
    "time"}`` to ``path`` at most every ``interval`` seconds (always on state changes).

    Args:
        path: the file; None writes nothing.
        interval: the least seconds between two writes while running.
    """

    def __init__(self, path: str | os.PathLike | None, *, interval: float = 0.5) -> None:
        self.path = Path(path) if path else None
        self.interval = interval
        self._last = 0.0

    def write(self, *, step: int, total: int | None, state: str, world_size: int,
              restart_count: int, metrics: dict, force: bool = False) -> None:
        """Writes the current progress if due (or ``force``)."""
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        record = {"step": step, "total": total, "state": state, "world_size": world_size,
                  "restart_count": restart_count, "metrics": metrics, "time": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)


def read_progress(path: str | os.PathLike) -> dict | None:
    """The last progress written to ``path``, or None if there is none (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
