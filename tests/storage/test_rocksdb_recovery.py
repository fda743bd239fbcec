"""A RocksDB store after a failed write: RocksDB refuses every later write until the
database is reopened, so the store reopens it, and writes work again once the cause (here
a file size limit, as a full disk) is gone.

The failure is a lowered RLIMIT_FSIZE (no root or tiny volume needed), set in a child
process so that it limits nothing else. Also: paths refused before RocksDB writes anything.
"""

from __future__ import annotations

import json

import pytest

from dynembed.errors import StoreError
from dynembed.storage import RocksDBStore

from .test_failures import python

_PRELUDE = """
import json, resource, signal, sys
import numpy as np, torch
import dynembed as de
from dynembed.errors import StoreError
from dynembed.storage import MemoryStore, RocksDBStore, RowBlock

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
SOFT, HARD = resource.getrlimit(resource.RLIMIT_FSIZE)

def limit(nbytes):
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, HARD))

def unlimit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (SOFT, HARD))

def rows(ids):
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.shape[0]
    return RowBlock(ids, np.full((n, 4), 1.5, np.float32), np.full((n, 2), 2.5, np.float32),
                    np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))
"""


def _run(code: str, path) -> dict:
    proc = python(_PRELUDE + code.replace("PATH", repr(str(path))))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_writes_work_again_once_the_cause_of_a_failed_write_is_gone(tmp_path):
    result = _run("""
store = RocksDBStore(PATH)
store.bind(4, 2)
limit(1 << 16)
written, errors = 0, []
try:
    while written < 100_000:
        store.put(rows(np.arange(written, written + 100)))
        written += 100
except StoreError as e:
    errors.append(str(e))
try:  # the limit still holds: refused again, and reads go on
    store.put(rows([-1]))
except StoreError as e:
    errors.append(str(e))
readable = int(store.get(np.arange(written, dtype=np.int64))[0].sum())
unlimit()
store.put(rows([-2]))  # RocksDB refused this for good before the store reopened it
found = store.get(np.arange(-2, written + 100, dtype=np.int64))[0]
store.close()
again = RocksDBStore(PATH)
again.bind(4, 2)
print(json.dumps({"written": written, "errors": errors, "readable": readable,
                  "found": found.tolist(), "size": again.size()}))
again.close()
""", tmp_path / "db")
    written = result["written"]
    assert 0 < written < 100_000 and len(result["errors"]) == 2
    assert all("RocksDBStore" in e for e in result["errors"])
    assert result["readable"] == written
    # every batch written before the failure, none of the failed ones, the one after
    assert result["found"] == [True, False] + [True] * written + [False] * 100
    assert result["size"] == written + 1


def test_training_over_a_store_that_failed_resumes_without_losing_an_update(tmp_path):
    result = _run("""
def table(store):
    return de.DynamicEmbedding(dim=4, seed=3, optimizer=de.optim.Adam(lr=0.1), max_rows=64,
                               store=store)

a, b = table(RocksDBStore(PATH)), table(MemoryStore())
rng = np.random.default_rng(0)
failed = 0
for step in range(60):
    if step == 20:
        limit(1 << 15)
    if step == 40:
        unlimit()
    keys = torch.from_numpy(rng.integers(0, 2000, 48))
    before = a.table.export()
    try:
        out = a(keys)
    except StoreError:
        failed += 1
        after = a.table.export()
        assert all(np.array_equal(getattr(before, f), getattr(after, f)) for f in before._fields)
        continue
    ref = b(keys)  # the reference skips the lookups that failed
    assert torch.equal(out, ref)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
a.table.flush()
x, y = a.table.export(), b.table.export()
ox, oy = np.argsort(x.ids), np.argsort(y.ids)
same = all(np.array_equal(np.asarray(getattr(x, f))[ox], np.asarray(getattr(y, f))[oy])
           for f in x._fields)
print(json.dumps({"failed": failed, "same": same, "evicted": a.table.stats().totals.evicted}))
a.table.close()
""", tmp_path / "db")
    assert result["failed"] > 0 and result["evicted"] > 0
    assert result["same"]


def test_closing_a_store_whose_write_failed_raises_a_store_error_and_frees_it(tmp_path):
    result = _run("""
store = RocksDBStore(PATH)
store.bind(4, 2)
limit(1 << 14)
try:
    for start in range(0, 100_000, 100):
        store.put(rows(np.arange(start, start + 100)))
except StoreError:
    pass
try:
    store.close()
    closed = "no error"
except Exception as e:  # RocksDB repeats the failed write's error at close
    closed = type(e).__name__
unlimit()
again = RocksDBStore(PATH)  # the directory is free again
again.bind(4, 2)
again.put(rows([-1]))
print(json.dumps({"closed": closed, "store_closed": store.closed, "size": again.size()}))
again.close()
""", tmp_path / "db")
    assert result["closed"] in ("no error", "StoreError", "StoreFullError")
    assert result["store_closed"] and result["size"] > 1


def test_an_empty_path_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"path must be a non-empty directory path"):
        RocksDBStore("")
    assert list(tmp_path.iterdir()) == []  # rocksdict wrote its config file here


def test_a_directory_without_a_store_is_refused_by_create_false_and_left_alone(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    with pytest.raises(StoreError, match=r"holds no store .*pass create=True"):
        RocksDBStore(path, create=False)
    assert list(path.iterdir()) == []  # RocksDB left LOCK, LOG and a config file here
    RocksDBStore(path).close()  # made with create=True, it opens with create=False
    RocksDBStore(path, create=False).close()
