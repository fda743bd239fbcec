"""Stores given the wrong place or used after close: refused by name, never silently."""

from __future__ import annotations

import numpy as np
import pytest

from dynembed.errors import StoreError
from dynembed.storage import MemoryStore, RocksDBStore

from .test_conformance import rows


def test_rocksdb_refuses_a_directory_of_other_files(tmp_path):
    """A checkpoint or data directory given as the store's path got RocksDB's files written
    among its own, silently."""
    (tmp_path / "step-100").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"files that are not a RocksDB.*'notes.txt'.*empty"):
        RocksDBStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-100"]


def test_rocksdb_reopens_its_own_directory_and_an_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    RocksDBStore(tmp_path / "empty").close()
    volume = tmp_path / "volume"  # the root of a mounted volume
    (volume / "lost+found").mkdir(parents=True)
    (volume / ".snapshot").mkdir()
    RocksDBStore(volume).close()
    store = RocksDBStore(tmp_path / "db")
    store.bind(4, 2)
    store.put(rows([1]))
    store.close()
    again = RocksDBStore(tmp_path / "db")  # RocksDB's own files (and rocksdict's) are fine
    again.bind(4, 2)
    assert again.get(np.array([1], dtype=np.int64))[0].all()
    again.close()


def test_an_empty_put_on_a_closed_store_raises(tmp_path):
    """put() of an empty batch returned quietly on a closed store (get and delete raise)."""
    for store in (MemoryStore(), RocksDBStore(tmp_path / "db")):
        store.bind(4, 2)
        store.close()
        with pytest.raises(StoreError, match="is closed"):
            store.put(rows([]))
