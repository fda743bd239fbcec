"""A table's clock (``step``, ``update_step``) travels with its rows through the store: a
table reopened over a flushed store trains on as the one that wrote it would have.

It once restarted at step 0: Adam's bias correction and Adagrad's lr decay began again (the
next Adam update of trained rows was 41% larger than in-process continuation), and rows
carried ``last_step`` values ahead of the new table's clock, so TTL never expired them.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import redis
import rocksdict
import torch

import dynembed as de
from dynembed.storage import RedisStore, RocksDBStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ["a", "b", "c", "d"]
_namespaces = itertools.count()


def _emb(optimizer, store=None, **kwargs) -> de.DynamicEmbedding:
    return de.DynamicEmbedding(dim=4, optimizer=optimizer, seed=2, store=store, **kwargs)


def _train(emb, steps: int, keys=KEYS) -> None:
    for _ in range(steps):
        emb(keys).pow(2).sum().backward()


def _rows(emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and optimizer state of KEYS (brought into memory if stored only)."""
    table = emb.table
    table.find_or_insert(KEYS)  # reads stored rows in; creates none (all exist)
    slots = table.index.find(table.ids_of(KEYS).ids)
    index = torch.from_numpy(slots)
    return table.arena.weights[index].clone(), table.arena.state[index].clone()


def _assert_same_rows(got, want) -> None:
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()


def _train_alike(reference, other, steps: int) -> None:
    """Trains both ``steps`` steps; their rows must then be equal, bit for bit."""
    _train(reference, steps)
    _train(other, steps)
    _assert_same_rows(_rows(other), _rows(reference))


class _Backend:
    """Opens the same store (a RocksDB directory or a Redis namespace) again and again."""

    def __init__(self, kind: str, tmp_path, request) -> None:
        self.kind = kind
        self.path = tmp_path / "db"
        self.namespace = f"clock{next(_namespaces)}"
        self.url = request.getfixturevalue("redis_server").url if kind == "redis" else None

    def open(self):
        if self.kind == "rocksdb":
            return RocksDBStore(self.path)
        return RedisStore(self.url, namespace=self.namespace, shards=4)

    def remove_clock_record(self) -> None:
        """What a store written before stores kept a clock looks like: the raw record
        removed with the backend's own client (the store must be closed)."""
        if self.kind == "rocksdb":
            db = rocksdict.Rdict(str(self.path), rocksdict.Options(raw_mode=True))
            try:
                assert db.get(b"dynembed:clock") is not None
                db.delete(b"dynembed:clock")
            finally:
                db.close()
        else:
            client = redis.Redis.from_url(self.url)
            try:
                assert client.delete(f"{self.namespace}:clock".encode()) == 1
            finally:
                client.close()


@pytest.fixture(params=["rocksdb", "redis"])
def backend(request, tmp_path) -> _Backend:
    return _Backend(request.param, tmp_path, request)


_TRAIN_AND_FLUSH = """
    import os
    import dynembed as de
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.01), seed=2,
                              store=de.storage.RocksDBStore({path!r}))
    for _ in range(50):
        emb({keys!r}).pow(2).sum().backward()
    emb.table.flush()
    print(emb.table.step, emb.table.update_step, flush=True)
    os._exit(0)  # no close(): the flush alone must leave the store complete
"""


def test_adam_reopened_in_another_process_continues_bit_exactly(tmp_path):
    """The README's journey: train, flush, reopen the store in another process."""
    path = str(tmp_path / "db")
    code = textwrap.dedent(_TRAIN_AND_FLUSH.format(path=path, keys=KEYS))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["50", "50"]
    # in-process continuation, the reference
    continued = _emb(de.optim.Adam(lr=0.01), RocksDBStore(tmp_path / "ref"))
    _train(continued, 50)
    continued.table.flush()
    reopened = _emb(de.optim.Adam(lr=0.01), RocksDBStore(path))
    assert (reopened.table.step, reopened.table.update_step) == (50, 50)
    _assert_same_rows(_rows(reopened), _rows(continued))  # the store held every row
    for _ in range(3):
        _train_alike(continued, reopened, 1)
    assert (reopened.table.step, reopened.table.update_step) == (53, 53)
    continued.table.close()
    reopened.table.close()


def test_adagrad_lr_decay_continues_after_close_and_reopen(backend):
    def adagrad():
        return de.optim.Adagrad(lr=0.1, lr_decay=0.5)

    continued = _emb(adagrad())
    _train(continued, 20)
    writer = _emb(adagrad(), backend.open())
    _train(writer, 20)
    writer.table.close()  # close flushes: rows, then the clock
    reopened = _emb(adagrad(), backend.open())
    assert (reopened.table.step, reopened.table.update_step) == (20, 20)
    _train_alike(continued, reopened, 5)
    reopened.table.close()


def test_a_store_without_a_clock_record_opens_at_step_0_and_gets_one_at_the_next_flush(
        backend):
    """A store written before stores kept a clock keeps working."""
    writer = _emb(de.optim.Adam(lr=0.01), backend.open())
    _train(writer, 10)
    trained = _rows(writer)
    writer.table.close()
    backend.remove_clock_record()
    old = _emb(de.optim.Adam(lr=0.01), backend.open())
    assert (old.table.step, old.table.update_step) == (0, 0)
    assert old.table.tier.store.read_clock() is None
    with pytest.warns(UserWarning, match="holds rows but no clock record"):
        _assert_same_rows(_rows(old), trained)  # its rows read as before
    _train(old, 3)
    old.table.flush()
    assert old.table.tier.store.read_clock() == {"step": 3, "update_step": 3, "seed": 2}
    old.table.close()
    again = _emb(de.optim.Adam(lr=0.01), backend.open())
    assert (again.table.step, again.table.update_step) == (3, 3)
    again.table.close()


def test_a_checkpoint_restored_over_a_store_brings_its_own_clock(backend, tmp_path):
    """The checkpoint's clock wins over the one the store recorded since."""
    reference = _emb(de.optim.Adam(lr=0.01))
    _train(reference, 20)
    writer = _emb(de.optim.Adam(lr=0.01), backend.open())
    _train(writer, 20)
    de.checkpoint.save(tmp_path / "ck", writer)
    _train(writer, 30)
    writer.table.close()  # the store's clock: 50
    restored = _emb(de.optim.Adam(lr=0.01), backend.open())
    assert restored.table.step == 50
    de.checkpoint.load(tmp_path / "ck", restored)
    assert (restored.table.step, restored.table.update_step) == (20, 20)
    # until the next flush the store has no clock rather than one ahead of its rows
    assert restored.table.tier.store.read_clock() is None
    _train_alike(reference, restored, 1)
    restored.table.close()
    reopened = _emb(de.optim.Adam(lr=0.01), backend.open())
    assert (reopened.table.step, reopened.table.update_step) == (21, 21)
    _train_alike(reference, reopened, 2)
    reopened.table.close()


def test_load_state_dict_over_a_store_never_leaves_its_clock_ahead_of_the_rows(
        redis_server):
    """Between the load and the next flush, another process opening the namespace must not
    see the store's newer clock over the state's older rows."""
    namespace = f"clock{next(_namespaces)}"

    def store():
        return RedisStore(redis_server.url, namespace=namespace, shards=4)

    emb = _emb(de.optim.Adam(lr=0.01), store())
    _train(emb, 20)
    state = emb.table.state_dict()
    _train(emb, 30)
    emb.table.flush()
    assert store().read_clock() == {"step": 50, "update_step": 50, "seed": 2}
    emb.table.load_state_dict(state)
    assert store().read_clock() is None  # the rows are step 20's: no clock of step 50
    emb.table.flush()
    assert store().read_clock() == {"step": 20, "update_step": 20, "seed": 2}
    reopened = _emb(de.optim.Adam(lr=0.01), store())
    assert (reopened.table.step, reopened.table.update_step) == (20, 20)
    emb.table.close()
    reopened.table.close()


def test_a_state_dict_that_does_not_load_keeps_the_stores_clock(redis_server):
    namespace = f"clock{next(_namespaces)}"
    emb = _emb(de.optim.Adam(lr=0.01),
               RedisStore(redis_server.url, namespace=namespace, shards=4))
    _train(emb, 5)
    emb.table.flush()
    state = emb.table.state_dict()
    state["weights"] = state["weights"][:, :2]  # another dim
    with pytest.raises(de.StateDictError):
        emb.table.load_state_dict(state)
    assert emb.table.tier.store.read_clock() == {"step": 5, "update_step": 5, "seed": 2}
    emb.table.close()


def test_a_read_only_table_reads_the_clock_and_never_writes_it(redis_server):
    """A serving table over the namespace its trainer writes must not move the clock."""
    namespace = f"clock{next(_namespaces)}"

    def store():
        return RedisStore(redis_server.url, namespace=namespace, shards=4)

    trainer = _emb(de.optim.Adam(lr=0.01), store())
    _train(trainer, 30)
    trainer.table.flush()
    server = _emb(de.optim.Adam(lr=0.01), store(), read_only=True)
    assert server.table.step == 30
    _train(trainer, 10)
    trainer.table.flush()
    server.table.flush()
    server.table.close()  # closing flushes too
    assert store().read_clock() == {"step": 40, "update_step": 40, "seed": 2}
    trainer.table.close()


def test_ttl_counts_from_the_reopened_clock(tmp_path):
    """Rows keep their last_step in the store; the reopened table's clock continues past
    them, so TTL(steps=) expires a row as the table that wrote it would have."""
    def make():
        return _emb(de.optim.SGD(lr=0.1), RocksDBStore(tmp_path / "db"),
                    eviction=de.policy.TTL(steps=10))

    emb = make()
    _train(emb, 1, ["old", "new"])
    _train(emb, 29, ["new"])  # step 30: "old" was last seen 29 steps ago
    emb.table.close()
    reopened = make()
    assert reopened.table.step == 30
    assert len(reopened.table) == 0  # both rows are in the store only
    assert reopened.table.evict() == 1  # "old" expired, "new" (seen at step 30) not
    assert reopened.table.contains(["old", "new"]).tolist() == [False, True]
    assert reopened.table.stats().totals.expired == 1  # removed from the store
    reopened.table.close()


def test_a_table_without_a_seed_takes_the_stores_so_new_keys_start_alike(backend):
    """With seed=None each process draws its own seed: after a reopen, keys new to the
    store got other initial rows and admission coins than in the table that wrote it (a
    checkpoint's restore took its seed; the store's clock did not)."""
    def emb(store=None, seed=None):
        return de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), store=store,
                                   seed=seed, initializer=de.init.Normal(std=1.0),
                                   admission=de.policy.ProbabilisticAdmission(probability=0.5))

    torch.manual_seed(11)
    writer = emb(backend.open())
    reference = emb(seed=writer.table.seed)  # the writer, trained on without a reopen
    for table in (writer, reference):
        _train(table, 2, ["a", "b"])
    writer.table.close()
    torch.manual_seed(12)  # another process: another drawn seed
    reopened = emb(backend.open())
    assert reopened.table.seed == reference.table.seed
    new = [f"new{i}" for i in range(64)]
    got, want = reopened(new), reference(new)
    assert torch.equal(got, want)  # the same coins, and the same initial rows
    assert 0 < int((want != 0).any(1).sum()) < len(new)
    reopened.table.close()


def test_a_store_left_without_a_flush_warns_the_table_that_opens_it():
    """A table reopened over a store whose writer crashed before flushing started at step 0
    with its own seed over rows from later steps, silently (a plain script, without the
    checkpoint manager's used_stores check)."""
    store = de.storage.MemoryStore()
    crashed = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=8,
                                  store=store)
    for step in range(5):  # rows spill to the store; no flush, no close
        crashed(torch.arange(step * 8, step * 8 + 8)).sum().backward()
    assert store.size() > 0 and store.read_clock() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        de.DynamicEmbedding(dim=4, seed=1, store=store, read_only=True)  # a reader: quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the first write, not at construction
        reopened = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                       max_rows=8, store=store)
    with pytest.warns(UserWarning, match="holds rows but no clock record") as caught:
        reopened(torch.arange(3)).sum().backward()
    assert len(caught) == 1 and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened(torch.arange(3)).sum().backward()  # once
        reopened.table.flush()
        # flushed: the clock is there
        de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=8,
                            store=store)(torch.arange(3)).sum().backward()


@pytest.mark.parametrize("settle", ["restore", "start_over", "clear_store"])
def test_a_store_left_without_a_flush_is_settled_quietly_by_a_restore_first(settle):
    """A job restarted under torchrun builds its tables (over the store the failed attempt
    left) and then restores, which deals with the store: each restart warned all the same."""
    store = de.storage.MemoryStore()
    crashed = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=8,
                                  store=store)
    saved = crashed.table.state_dict()
    for step in range(5):
        crashed(torch.arange(step * 8, step * 8 + 8)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                       max_rows=8, store=store)
        if settle == "restore":
            reopened.table.load_state_dict(saved)
        else:
            getattr(reopened.table, settle)()
        reopened(torch.arange(3)).sum().backward()
        reopened.table.flush()


def test_a_failed_start_over_keeps_the_warning_for_the_next_write(monkeypatch):
    store = de.storage.MemoryStore()
    crashed = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=8,
                                  store=store)
    for step in range(5):
        crashed(torch.arange(step * 8, step * 8 + 8)).sum().backward()
    reopened = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                   max_rows=8, store=store)

    def fail():
        raise de.StoreError("the store is down")

    monkeypatch.setattr(store, "clear", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(de.StoreError, match="down"):
            reopened.table.start_over()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="holds rows but no clock record"):
        reopened(torch.arange(3)).sum().backward()


@pytest.mark.parametrize("policy, sightings", [
    (de.policy.FrequencyAdmission(threshold=3), 3),
    (de.policy.BloomAdmission(expected_keys=1000), 2)])
def test_admission_counts_go_on_after_a_flush_and_reopen(backend, policy, sightings):
    """The store kept rows and clock but not the admission state: a key seen twice before
    the reopen started counting again, so 113 of 417 rows an uninterrupted run admitted
    were missing 20 steps after the reopen."""
    def emb(store=None):
        return de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=3,
                                   store=store, admission=policy)

    # keys seen once short of admission before the reopen, once after; and one-off keys
    batches = [[f"x{i}" for i in range(6)] + [f"once{b}"] for b in range(sightings + 1)]
    writer, reference = emb(backend.open()), emb()
    for batch in batches[:sightings - 1]:
        for table in (writer, reference):
            table(batch).sum().backward()
    writer.table.close()
    reopened = emb(backend.open())
    for batch in batches[sightings - 1:]:
        for table in (reopened, reference):
            table(batch).sum().backward()
    got, want = reopened.table.export(), reference.table.export()
    assert sorted(got.ids.tolist()) == sorted(want.ids.tolist())
    assert len(want.ids) == 6  # the x keys, and none of the one-off keys
    assert torch.equal(reopened(["x0"]), reference(["x0"]))  # trained alike since
    reopened.table.close()


def test_admission_state_of_other_settings_starts_empty_with_a_warning(tmp_path):
    store = lambda: RocksDBStore(tmp_path / "db")
    writer = de.DynamicEmbedding(dim=2, seed=1, store=store(), optimizer=de.optim.SGD(lr=0.1),
                                 admission=de.policy.FrequencyAdmission(threshold=2, width=64))
    writer(["a"]).sum().backward()
    writer.table.close()
    with pytest.warns(UserWarning, match="admission state its last flush recorded does not "
                                         "load .* admission starts empty"):
        reopened = de.DynamicEmbedding(
            dim=2, seed=1, store=store(), optimizer=de.optim.SGD(lr=0.1),
            admission=de.policy.FrequencyAdmission(threshold=2, width=128))
    reopened(["a"]).sum().backward()  # counted once now: not admitted yet
    assert len(reopened.table.export().ids) == 0
    reopened.table.close()


def test_a_reopened_store_says_at_the_first_write_that_its_strings_are_in_checkpoints(
        tmp_path):
    """A key-logged table reopened over a flushed store listed its stored rows' keys as
    None, silently: the store keeps rows, the key log lives in checkpoints."""
    def emb():
        return de.DynamicEmbedding(dim=2, seed=1, store=RocksDBStore(tmp_path / "db"),
                                   optimizer=de.optim.SGD(lr=0.1), key_log=True)

    writer = emb()
    writer(["cat", "dog"]).sum().backward()
    saved = writer.table.state_dict()
    writer.table.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the first write, not at construction
        reopened = emb()
    with pytest.warns(UserWarning, match="not the 2 strings of its key log") as caught:
        reopened(["eel"]).sum().backward()
    assert len(caught) == 1
    reopened.table.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = emb()
        restored.table.load_state_dict(saved)  # a restore brings the strings: quiet
        restored(["eel"]).sum().backward()
        assert sorted(k for k in restored.table.to_numpy()["key"] if k) == ["cat", "dog",
                                                                             "eel"]
        restored.table.close()
        ints = de.DynamicEmbedding(dim=2, seed=1, store=RocksDBStore(tmp_path / "ints"),
                                   optimizer=de.optim.SGD(lr=0.1), key_log=True)
        ints(torch.tensor([1, 2])).sum().backward()  # int keys: nothing to log
        ints.table.close()
        again = de.DynamicEmbedding(dim=2, seed=1, store=RocksDBStore(tmp_path / "ints"),
                                    optimizer=de.optim.SGD(lr=0.1), key_log=True)
        again(torch.tensor([3])).sum().backward()
        again.table.close()


def test_an_explicit_seed_the_store_overrides_is_named(tmp_path):
    """The store's seed won over seed=999 without a word."""
    writer = de.DynamicEmbedding(dim=2, seed=123, store=RocksDBStore(tmp_path / "db"),
                                 optimizer=de.optim.SGD(lr=0.1))
    writer(["a"]).sum().backward()
    writer.table.close()
    with pytest.warns(UserWarning, match=r"seed=123: this table continues with it, not with "
                                         r"seed=999") as caught:
        reopened = de.DynamicEmbedding(dim=2, seed=999, store=RocksDBStore(tmp_path / "db"),
                                       optimizer=de.optim.SGD(lr=0.1))
    assert caught[0].filename == __file__ and reopened.table.seed == 123
    reopened.table.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same seed, or none given: quiet
        for seed in (123, None):
            de.DynamicEmbedding(dim=2, seed=seed, store=RocksDBStore(tmp_path / "db"),
                                optimizer=de.optim.SGD(lr=0.1)).table.close()


def test_admission_state_too_big_for_the_record_is_left_out_with_a_warning(tmp_path,
                                                                          monkeypatch):
    """A 128 MiB Bloom filter went into the clock record whole (165 MiB, 4.9 s per flush);
    past Redis's 512 MB value limit every flush would fail."""
    from dynembed.table import store_clock
    monkeypatch.setattr(store_clock, "MAX_STORED_ADMISSION", 16)
    emb = de.DynamicEmbedding(dim=2, seed=1, store=RocksDBStore(tmp_path / "db"),
                              optimizer=de.optim.SGD(lr=0.1),
                              admission=de.policy.FrequencyAdmission(threshold=2))
    emb(["a"]).sum().backward()
    with pytest.warns(UserWarning, match="too big for .* clock record .* not stored"):
        emb.table.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb.table.flush()  # once
        emb.table.close()
    store = RocksDBStore(tmp_path / "db")
    store.bind(2, emb.table.arena.state_width)
    assert "admission" not in store.read_clock() and store.read_clock()["step"] == 1
    store.close()
