"""Stores that fail: locked, killed mid-write, unreachable, full, corrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.errors import (
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreUnavailableError,
)
from dynembed.storage import RedisStore, RocksDBStore, RowBlock
from dynembed.storage.rows import encode_ids
from dynembed.testing import RedisServer

from .test_conformance import rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_rocksdb_locked_by_another_process(tmp_path):
    path = tmp_path / "db"
    holder = python(f"""
        import sys, time
        from dynembed.storage import RocksDBStore
        store = RocksDBStore({str(path)!r})
        print("open", flush=True)
        sys.stdin.readline()
    """, stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreLockedError, match="locked") as info:
            RocksDBStore(path)
        assert str(path) in str(info.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    RocksDBStore(path).close()  # free again once the holder is gone


def test_rocksdb_damaged_file_is_corruption_not_a_lock(tmp_path):
    """RocksDB's "block checksum mismatch" contains "lock"; it must not read as locked."""
    path = tmp_path / "db"
    store = RocksDBStore(path)
    store.bind(4, 0)
    n = 2000
    store.put(RowBlock(np.arange(n), np.ones((n, 4), np.float32), np.zeros((n, 0), np.float32),
                       np.zeros(n, np.int64), np.zeros(n, np.int64)))
    store.close()  # closing flushes the memtable into an SST file
    sst = min(path.glob("*.sst"))
    with open(sst, "r+b") as f:  # damage the first data block
        f.seek(100)
        f.write(b"\xff" * 64)
    store = RocksDBStore(path, cache_bytes=1 << 20)
    with pytest.raises(StoreCorruptError, match="damaged") as info:
        store.bind(4, 0)  # reads the store's layout record
        store.get(np.arange(n))
    assert not isinstance(info.value, StoreLockedError) and str(path) in str(info.value)
    store.close()


def test_rocksdb_sigkill_while_writing_keeps_every_flushed_row(tmp_path):
    path = tmp_path / "db"
    writer = python(f"""
        import numpy as np
        from dynembed.storage import RocksDBStore, RowBlock
        store = RocksDBStore({str(path)!r})
        store.bind(8, 8)
        rng = np.random.default_rng(0)
        for batch in range(100000):  # runs until killed
            ids = np.arange(batch * 1000, (batch + 1) * 1000, dtype=np.int64)
            w = np.full((1000, 8), batch, np.float32)
            store.put(RowBlock(ids, w, -w, ids, ids))
            if batch % 5 == 4:
                store.flush()
                print(batch, flush=True)
    """)
    flushed = -1
    try:
        while flushed < 30:  # let it write a while, then kill it mid-batch
            line = writer.stdout.readline()
            assert line, writer.stderr.read()
            flushed = int(line)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    store = RocksDBStore(path)
    store.bind(8, 8)
    ids = np.arange((flushed + 1) * 1000, dtype=np.int64)
    found, got = store.get(ids)
    assert found.all(), "a flushed row is missing after SIGKILL"
    assert np.array_equal(got.weights[:, 0], (ids // 1000).astype(np.float32))
    total = 0
    for block in store.scan():  # every row left (flushed or not) decodes whole
        assert np.array_equal(block.weights, -block.state)
        assert np.array_equal(block.weights[:, 0], (block.ids // 1000).astype(np.float32))
        total += len(block)
    assert total >= ids.shape[0] and total % 1000 == 0  # whole batches only
    store.close()


def test_redis_unreachable_at_connect():
    server = RedisServer()  # never started: nothing listens on its port
    with pytest.raises(StoreUnavailableError, match="unreachable") as info:
        RedisStore(server.url, namespace="t", retries=1, backoff_base=0.01, timeout=0.5)
    assert f"127.0.0.1:{server.port}" in str(info.value)


def snapshot(table):
    ids, slots = table.index.items()
    return (ids.copy(), slots.copy(), table.arena.weights.clone(), table.arena.state.clone(),
            table.arena.meta.clone(), table.step, table.size())


def _trained(store, optimizer, max_rows: int, batches) -> de.DynamicEmbedding:
    """A dim-4 table over ``store``, trained on ``batches`` (its rows spill to the store)."""
    emb = de.DynamicEmbedding(dim=4, optimizer=optimizer, seed=1, max_rows=max_rows,
                              store=store)
    for keys in batches:
        emb(keys).sum().backward()
    return emb


def test_redis_stopped_mid_run_raises_and_leaves_the_table_intact():
    with RedisServer() as server:
        store = RedisStore(server.url, namespace="mid", retries=2, backoff_base=0.01,
                           backoff_cap=0.05, timeout=0.5)
        emb = _trained(store, de.optim.Adagrad(lr=0.1), 64,
                       [torch.arange(step * 16, step * 16 + 32) for step in range(20)])
        assert emb.table.stats().totals.evicted > 0
        before = snapshot(emb.table)
        server.stop()
        with pytest.raises(StoreUnavailableError, match="unreachable") as info:
            emb(torch.arange(5000, 5064 - 16))  # misses: read-through must fail
        assert "RedisStore" in str(info.value) and "namespace='mid'" in str(info.value)
        after = snapshot(emb.table)
        for x, y in zip(before, after):
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor)
                    else np.array_equal(x, y)), "the failed lookup changed the table"
        # keys already in memory still train without the store
        resident = torch.from_numpy(before[0][:8])
        emb(resident).sum().backward()
        store.close()


def test_redis_full_refuses_the_whole_batch():
    with RedisServer(maxmemory="3mb") as server:
        store = RedisStore(server.url, namespace="full", shards=4)
        store.bind(256, 0)
        small = rows(range(10), dim=256, width=0)
        store.put(small)
        huge = rows(range(10, 10 + 6000), dim=256, width=0)  # ~6 MB of rows
        with pytest.raises(StoreFullError, match="out of memory"):
            store.put(huge)
        assert store.size() == 10  # nothing of the refused batch was written
        found, _ = store.get(huge.ids[:100])
        assert not found.any()
        store.close()


def test_corrupted_row_in_redis_is_detected(redis_server):
    store = RedisStore(redis_server.url, namespace="corrupt", shards=1)
    store.bind(4, 2)
    store.put(rows([1, 2]))
    key = store._keys[0]
    victim = encode_ids(np.array([2], dtype=np.int64))[0]
    assert store._client.hexists(key, victim)
    store._client.hset(key, victim, b"garbage")
    with pytest.raises(StoreCorruptError, match="id 2"):
        store.get(np.array([1, 2], dtype=np.int64))
    store.close()


def test_rocksdb_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a database")
    with pytest.raises(de.StoreError, match="path is a file, not a directory"):
        RocksDBStore(path)


def test_missing_directory_without_create(tmp_path):
    with pytest.raises(de.StoreError, match="does not exist"):
        RocksDBStore(tmp_path / "absent", create=False)


def test_redis_store_argument_errors():
    with pytest.raises(ValueError, match="url"):
        RedisStore("http://x", namespace="a")
    with pytest.raises(ValueError, match="namespace"):
        RedisStore(namespace="")
    with pytest.raises(ValueError, match="shards"):
        RedisStore(namespace="a", shards=3)
    with pytest.raises(ValueError, match="retries"):
        RedisStore(namespace="a", retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        RedisStore(namespace="a", timeout=0)
    for arg in ("timeout", "backoff_base", "backoff_cap"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{arg} must be a finite number"):
                RedisStore(namespace="a", **{arg: value})
    # 2**22 shards built millions of key names before failing for memory; "no" was true
    with pytest.raises(ValueError, match=r"shards must be a power of two in \[1, 65536\]"):
        RedisStore(namespace="a", shards=2**22)
    with pytest.raises(TypeError, match="cluster must be True or False, got 'no'"):
        RedisStore(namespace="a", cluster="no")


@pytest.mark.parametrize("arg", ["create", "background_io"])
def test_rocksdb_store_flags_must_be_bools(tmp_path, arg):
    """background_io="no" turned background I/O on; create="no" was rocksdict's error."""
    with pytest.raises(TypeError, match=f"{arg} must be True or False, got 'no'"):
        RocksDBStore(tmp_path / "db", **{arg: "no"})


def test_rocksdb_store_path_must_be_a_path():
    for bad in (123, None):
        with pytest.raises(TypeError, match="path must be a directory path"):
            RocksDBStore(bad)


def test_rowblock_take_and_concat():
    a = rows([1, 2, 3])
    b = RowBlock.concat([a.take(np.array([2])), a.take(np.array([0]))], 4, 2)
    assert b.ids.tolist() == [3, 1]
    assert np.array_equal(b.weights, a.weights[[2, 0]])


def test_transient_redis_outage_is_retried_with_backoff():
    # a server with persistence: one without comes back empty (see the next test)
    with RedisServer(extra=("--appendonly", "yes")) as server:
        store = RedisStore(server.url, namespace="flaky", retries=40, backoff_base=0.02,
                           backoff_cap=0.2, timeout=1.0)
        store.bind(4, 2)
        server.stop()
        restarter = threading.Timer(0.3, server.start)  # the server comes back shortly
        restarter.start()
        try:
            store.put(rows(range(10)))  # fails at first, succeeds on a retry
        finally:
            restarter.join()
        found, got = store.get(np.arange(10, dtype=np.int64))
        assert found.all()
        assert np.array_equal(got.weights, rows(range(10)).weights)
        store.close()


def test_a_redis_server_that_lost_its_data_is_named_not_read_as_empty():
    """Restarted without persistence, the server answered every row as absent: training
    went on, silently making the trained rows anew from the initializer."""
    with RedisServer() as server:
        store = RedisStore(server.url, namespace="lost", retries=40, backoff_base=0.02,
                           backoff_cap=0.2, timeout=1.0)
        emb = _trained(store, de.optim.SGD(lr=0.1), 50,
                       [torch.arange(step * 40, step * 40 + 40) for step in range(8)])
        assert store.size() > 0
        server.stop()
        server.start()  # no persistence: the namespace is gone
        for call in (lambda: emb(torch.arange(0, 40)), lambda: list(store.scan()),
                     store.size, lambda: store.delete(np.arange(3, dtype=np.int64))):
            with pytest.raises(StoreCorruptError, match="no longer holds the description"):
                call()
        store.close()
        fresh = RedisStore(server.url, namespace="never-bound")  # nothing to lose yet
        assert fresh.size() == 0
        fresh.delete(np.arange(3, dtype=np.int64))
        fresh.close()


def test_a_lost_namespace_described_again_by_another_process_is_still_named(tmp_path):
    """After the server lost its data, an evaluation table opened over the namespace wrote
    its description record again; the trainer's check (is a record there?) passed, and the
    rows it had evicted came back made anew from the initializer, uncounted. The restore
    the error asks for then failed with the same error."""
    with RedisServer() as server:
        store = RedisStore(server.url, namespace="relost", timeout=1.0)
        emb = _trained(store, de.optim.SGD(lr=0.1), 50,
                       [torch.arange(step * 40, step * 40 + 40) for step in range(8)])
        saved = de.checkpoint.save(tmp_path / "ckpt", emb)
        server.stop()
        server.start()  # no persistence: the namespace is gone
        evaluator = de.DynamicEmbedding(
            dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, read_only=True,
            store=RedisStore(server.url, namespace="relost", timeout=1.0))
        assert evaluator(torch.arange(3)).abs().sum() == 0  # described again, empty
        with pytest.raises(StoreCorruptError, match="written again by another process"):
            emb(torch.arange(0, 40))
        de.checkpoint.load(saved, emb)  # empties the namespace, describes it again
        reference = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
        de.checkpoint.load(saved, reference)
        keys = torch.arange(0, 320)
        emb.eval()
        reference.eval()
        with torch.no_grad():
            assert torch.equal(emb(keys), reference(keys))  # store rows read back exact
        evaluator.table.close()
        store.close()


def test_rocksdb_close_ends_an_unfinished_scan(tmp_path):
    """A scan's snapshot once kept the directory open after close(): reopening it failed as
    locked, and the scan went on reading the closed store."""
    store = RocksDBStore(tmp_path / "db")
    store.bind(2, 0)
    store.put(rows(list(range(10)), dim=2, width=0))
    scan = store.scan(batch_size=2)
    assert next(scan).ids.shape[0] >= 1
    store.close()
    RocksDBStore(tmp_path / "db").close()  # the directory is free
    with pytest.raises(de.StoreError, match="is closed"):
        next(scan)  # an error, never a silently shortened scan


def test_redis_store_reopened_with_other_shards_is_refused(redis_server):
    """Which hash holds an id depends on shards: another count once bound, then found 3 of
    100 rows and stored duplicates."""
    store = RedisStore(redis_server.url, namespace="reshard", shards=64)
    store.bind(4, 2)
    store.put(rows(list(range(100))))
    store.close()
    other = RedisStore(redis_server.url, namespace="reshard", shards=4)
    with pytest.raises(StoreCorruptError, match="'shards': 64"):
        other.bind(4, 2)
    other.close()


def test_two_stores_binding_a_new_namespace_at_once_agree_on_its_layout(redis_server):
    """Both read "no record", then both wrote theirs: rows of two dims in one namespace."""
    first = RedisStore(redis_server.url, namespace="race")
    second = RedisStore(redis_server.url, namespace="race")
    missed = first._get_meta  # the first reads before the second writes
    first._get_meta = lambda: None
    second.bind(8, 0)
    first._get_meta = lambda: (setattr(first, "_get_meta", missed), None)[1]
    with pytest.raises(StoreCorruptError, match="'dim': 8"):
        first.bind(4, 0)
    first.close()
    second.close()


def test_redis_cluster_backs_off_while_a_node_is_down():
    """The cluster pipeline retried without waiting: 20 retries were spent in 0.03 s on a
    node down for half a second."""
    from dynembed.testing.redis_server import RedisCluster

    with RedisCluster() as cluster:
        store = RedisStore(cluster.url, namespace="ct", shards=16, cluster=True, retries=20,
                           backoff_base=0.05, backoff_cap=0.2, timeout=1.0)
        store.bind(2, 0)
        block = rows(list(range(50)), dim=2, width=0)
        store.put(block)
        node = cluster.servers[1]
        node.stop()
        restart = threading.Timer(0.5, node.start)
        restart.start()
        try:
            store.put(block)  # waits out the outage
        finally:
            restart.join()
        found, _ = store.get(block.ids)
        assert found.all()
        store.close()


def test_a_foreign_field_in_a_redis_hash_is_named_corruption(redis_server):
    import redis

    store = RedisStore(redis_server.url, namespace="stray", shards=1)
    store.bind(4, 2)
    store.put(rows([1, 2, 3]))
    admin = redis.Redis.from_url(redis_server.url)
    admin.hset(store._keys[0], b"not-an-id", b"x")  # once a bare numpy reshape error
    admin.close()
    with pytest.raises(StoreCorruptError, match="holds a field that is not a row id"):
        list(store.scan())
    store.close()


@pytest.mark.parametrize("column, bad", [
    ("weights", np.ones((3, 1), np.float32)), ("weights", np.ones((3, 4), np.float64)),
    ("state", np.ones((1, 2), np.float32)), ("counts", np.ones(1, np.int64))])
def test_rows_of_the_wrong_shape_or_dtype_are_refused(column, bad):
    """numpy once broadcast or cast them: stored rows that did not read back as written."""
    store = de.storage.MemoryStore()
    store.bind(4, 2)
    block = rows([1, 2, 3])
    setattr(block, column, bad)
    with pytest.raises(ValueError, match=f"rows.{column} must be"):
        store.put(block)
    assert store.size() == 0


def test_refused_redis_credentials_fail_at_once_naming_them():
    """A wrong password was retried with backoff and reported as an unreachable server."""
    with RedisServer(extra=("--requirepass", "s3cret")) as server:
        good = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        RedisStore(good, namespace="auth", retries=5, backoff_base=1.0).close()
        for url in (server.url, f"redis://:wrong@127.0.0.1:{server.port}/0"):
            with pytest.raises(StoreError, match="refused the credentials") as info:
                RedisStore(url, namespace="auth", retries=5, backoff_base=1.0)
            assert not isinstance(info.value, StoreUnavailableError)
            assert "wrong" not in str(info.value)  # the password stays redacted
