"""Run by test_crash.py in a child process: trains and checkpoints until it is killed.

Usage: python crash_worker.py DIR MODE
  MODE "hang": commit step 1, then hang in the middle of writing step 2's rows.
  MODE "loop": commit a checkpoint every step (deltas, compacted every 3) forever.
Each committed step is printed as "committed N" and flushed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dynembed as de
from dynembed.checkpoint import rows_file
from tests.checkpoint.helpers import batches, make_table, train


def state_at(step: int) -> de.DynamicTable:
    """The table after ``step`` steps (deterministic, so the test can rebuild it)."""
    table = make_table()
    for s in range(1, step + 1):
        train(table, batches(2, 20_000, size=3000, seed=s), seed=s)
    return table


def main() -> None:
    directory, mode = Path(sys.argv[1]), sys.argv[2]
    manager = de.checkpoint.CheckpointManager(directory, keep_last=3, max_chain=3)
    table = make_table()
    step = 0
    while True:
        step += 1
        train(table, batches(2, 20_000, size=3000, seed=step), seed=step)
        if mode == "hang" and step == 2:
            def slow_append(self, ids, records, original=rows_file.RowsFileWriter.append_records):
                original(self, ids, records)
                (directory / "saving").touch()
                time.sleep(60)

            rows_file.RowsFileWriter.append_records = slow_append
        manager.save(step, tables={"t": table}, extra={"step": step})
        print(f"committed {step}", flush=True)


if __name__ == "__main__":
    main()
