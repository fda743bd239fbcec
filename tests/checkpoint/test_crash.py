"""SIGKILL during a save: the previous checkpoint stays the latest and loads intact."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dynembed as de

from .crash_worker import state_at
from .helpers import assert_same_rows, batches, make_table, train

WORKER = Path(__file__).with_name("crash_worker.py")


def start(directory: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(directory), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill(process: subprocess.Popen) -> list[int]:
    process.send_signal(signal.SIGKILL)
    out, err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, err
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]


def test_sigkill_in_the_middle_of_writing_rows_leaves_the_previous_checkpoint(tmp_path):
    process = start(tmp_path, "hang")
    deadline = time.monotonic() + 120
    while not (tmp_path / "saving").exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the worker never reached the save"
        time.sleep(0.05)
    assert kill(process) == [1]
    assert (tmp_path / "step-0000000002.partial").exists()  # the torn save
    assert not (tmp_path / "step-0000000002").exists()
    manager = de.checkpoint.CheckpointManager(tmp_path)
    assert manager.latest() == tmp_path / "step-0000000001"
    table = make_table()
    assert manager.restore(tables={"t": table}) == {"step": 1}
    assert_same_rows(state_at(1), table)
    manager.cleanup()
    assert not (tmp_path / "step-0000000002.partial").exists()


@pytest.mark.parametrize("delay", [0.7, 1.9, 3.1])
def test_sigkill_at_any_moment_leaves_a_loadable_latest_checkpoint(tmp_path, delay):
    process = start(tmp_path, "loop")
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob("step-*")):  # wait until it is saving
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    committed = kill(process)
    manager = de.checkpoint.CheckpointManager(tmp_path)
    latest = manager.latest()
    if latest is None:  # killed before the first commit
        assert committed == []
        return
    table = make_table()
    step = manager.restore(tables={"t": table})["step"]
    # the latest is the last one reported, or one committed just before the kill
    assert step >= (committed[-1] if committed else 0)
    assert_same_rows(state_at(step), table)
    manager.cleanup()  # a fresh manager removes what the crash left
    assert not list(tmp_path.glob("*.partial"))
    print(f"killed after {committed[-1] if committed else 0} commits; restored {step}")


@pytest.mark.parametrize("how", ["save", "compact"])
def test_every_directory_is_synced_before_the_manifest_commits(tmp_path, monkeypatch, how):
    """A power loss after the commit must not lose a directory entry the manifest's files
    lie under. compact() synced the files and their own folders but not ``tables/``, whose
    entry for each table's folder could then vanish while the manifest stayed, and the
    CheckpointManager deletes the delta it compacted right after."""
    from dynembed.checkpoint import api
    from dynembed.checkpoint import manifest as mf

    table, other = make_table(), make_table()
    train(table, batches(2, 1000))
    api.save(tmp_path / "c0", tables={"t": table, "u": other}, extra={"step": 1})
    train(table, batches(1, 1000, seed=2))
    if how == "compact":
        api.save(tmp_path / "c1", tables={"t": table, "u": other}, parent=tmp_path / "c0")
    synced, missing = set(), []
    original_sync, original_write = mf.fsync_dir, mf.write_atomic

    def fsync_dir(path):
        synced.add(Path(path).resolve())
        original_sync(path)

    def write_atomic(path, data):
        if path.name == mf.MANIFEST:  # the commit: everything under it must be durable
            staging = path.parent.resolve()
            missing.extend(str(d.relative_to(staging)) for d in staging.rglob("*")
                           if d.is_dir() and d.name != "parts" and d.resolve() not in synced)
        original_write(path, data)

    monkeypatch.setattr(mf, "fsync_dir", fsync_dir)
    monkeypatch.setattr(mf, "write_atomic", write_atomic)
    if how == "save":
        api.save(tmp_path / "c1", tables={"t": table, "u": other}, parent=tmp_path / "c0")
    else:
        de.checkpoint.compact(tmp_path / "c1", tmp_path / "c1-full")
    assert missing == []
