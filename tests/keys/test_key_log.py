"""KeyLog: id -> original key, add/lookup/discard and a weights_only state dict."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynembed as de
from dynembed.keys import KeyLog, hash_bytes, hash_strings

characters = st.one_of(st.characters(), st.characters(categories=["Cs"]),
                       st.sampled_from(["\x00", "é", "😀"]))


def ids(keys):
    return hash_strings(keys) if not keys or isinstance(keys[0], str) else hash_bytes(keys)


def saved_and_loaded(log: KeyLog, tmp_path, name="log.pt") -> KeyLog:
    path = tmp_path / name
    torch.save(log.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"ids", "utf8", "lengths", "raw_ids", "raw", "raw_lengths"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = KeyLog()
    fresh.load_state_dict(state)
    return fresh


def test_add_lookup_discard():
    log = KeyLog()
    assert len(log) == 0
    keys = ["cat", "dog", "é", ""]
    log.add(ids(keys), keys)
    assert len(log) == 4
    assert log.lookup(ids(keys)) == keys
    assert log.lookup(np.array([12345, -1], dtype=np.int64)) == [None, None]
    log.discard(ids(["dog", "never-added"]))
    assert len(log) == 3
    assert log.lookup(ids(keys)) == ["cat", None, "é", ""]
    log.add(ids(["dog", "cat"]), ["dog", "cat"])  # re-adding is idempotent
    assert len(log) == 4
    assert log.lookup(ids(["dog"])) == ["dog"]
    log.discard(np.empty(0, dtype=np.int64))
    log.add(np.empty(0, dtype=np.int64), [])
    assert len(log) == 4


def test_discard_with_duplicate_ids():
    log = KeyLog()
    log.add(ids(["a", "b"]), ["a", "b"])
    log.discard(ids(["a", "a", "a"]))
    assert log.lookup(ids(["a", "b"])) == [None, "b"]


def test_later_add_overwrites_same_id():
    log = KeyLog()
    log.add(np.array([7], dtype=np.int64), ["first"])
    log.add(np.array([7], dtype=np.int64), ["second"])
    assert log.lookup(np.array([7])) == ["second"] and len(log) == 1


def test_nul_and_non_ascii_keys():
    keys = ["\x00", "a\x00b", "\x00\x00", "日本語", "😀", "x\x00😀\x00", "\ud800", "", "end\x00"]
    log = KeyLog()
    log.add(ids(keys), keys)
    assert log.lookup(ids(keys)) == keys


def test_bytes_keys_are_logged_as_str():
    raw = [b"cat", "caf\u00e9".encode(), b"a\x00b", b"\x00", b"", "😀".encode()]
    log = KeyLog()
    log.add(ids(raw), raw)
    assert log.lookup(ids(raw)) == ["cat", "café", "a\x00b", "\x00", "", "😀"]
    # Bytes and their str share ids, so both spellings find the same entry.
    assert log.lookup(hash_strings(["cat", "café"])) == ["cat", "café"]


def test_bytes_keys_that_are_not_utf8_are_logged_as_bytes(tmp_path):
    """They were logged as surrogate-escaped str, which hashes to another id: feeding an
    exported key back reached another row."""
    raw = [b"\xff", b"a\x80b", b"\xc3", b"\x00\xff"]
    mixed = [b"ok", *raw, "caf\u00e9".encode()]
    log = KeyLog()
    log.add(ids(mixed), mixed)
    assert log.lookup(ids(mixed)) == ["ok", *raw, "café"]
    assert len(log) == len(mixed)
    fresh = saved_and_loaded(log, tmp_path)
    assert fresh.lookup(ids(mixed)) == ["ok", *raw, "café"]
    log.add(ids([b"\xff"]), ["now a str"])  # a later add of the id wins, whatever its type
    log.discard(ids([b"a\x80b"]))
    assert log.lookup(ids(raw)) == ["now a str", None, b"\xc3", b"\x00\xff"]
    other = KeyLog()
    other.add(ids([b"ok"]), [b"\xfe"])  # merge: the other's key wins
    log.merge(other)
    assert log.lookup(ids([b"ok"])) == [b"\xfe"]
    emb = de.DynamicEmbedding(dim=2, key_log=True, optimizer=None)
    emb([b"\xff\xfe", b"x"])
    key = emb.table.keys_of(emb.table.ids_of([b"\xff\xfe"]).ids)[0]
    assert key == b"\xff\xfe" and torch.equal(emb([key]), emb([b"\xff\xfe"]))


def test_bytearray_keys():
    raw = [bytearray(b"ab"), bytearray(b"c\x00")]
    log = KeyLog()
    log.add(ids([bytes(r) for r in raw]), raw)
    assert log.lookup(ids([b"ab", b"c\x00"])) == ["ab", "c\x00"]


def test_state_dict_round_trip(tmp_path):
    keys = ["cat", "dog", "é", "日本語", "😀", "", "\ud83d"]
    log = KeyLog()
    log.add(ids(keys), keys)
    fresh = saved_and_loaded(log, tmp_path)
    assert len(fresh) == len(keys)
    assert fresh.lookup(ids(keys)) == keys
    state = log.state_dict()
    assert state["ids"].dtype == torch.int64 and state["lengths"].dtype == torch.int64
    assert state["utf8"].dtype == torch.uint8


def test_state_dict_round_trip_with_nul_keys(tmp_path):
    keys = ["a\x00b", "\x00", "plain", "", "\x00\x00\x00", "tail\x00", "é\x00😀"]
    log = KeyLog()
    log.add(ids(keys), keys)
    fresh = saved_and_loaded(log, tmp_path)
    assert fresh.lookup(ids(keys)) == keys
    assert len(fresh) == len(keys)


def test_state_dict_round_trip_bytes_keys(tmp_path):
    raw = [b"cat", b"\xff\xfe", b"a\x00\x80", b"", "é".encode()]
    log = KeyLog()
    log.add(ids(raw), raw)
    fresh = saved_and_loaded(log, tmp_path)
    assert fresh.lookup(ids(raw)) == log.lookup(ids(raw))
    assert [t if isinstance(t, bytes) else t.encode() for t in fresh.lookup(ids(raw))] == raw


def test_state_dict_empty_and_single_empty_string(tmp_path):
    fresh = saved_and_loaded(KeyLog(), tmp_path, "empty.pt")
    assert len(fresh) == 0
    log = KeyLog()
    log.add(np.array([5], dtype=np.int64), [""])
    fresh = saved_and_loaded(log, tmp_path, "one.pt")
    assert fresh.lookup(np.array([5, 6])) == ["", None]


def test_load_replaces_existing_entries(tmp_path):
    log = KeyLog()
    log.add(ids(["a"]), ["a"])
    other = KeyLog()
    other.add(ids(["b"]), ["b"])
    other.load_state_dict(log.state_dict())
    assert other.lookup(ids(["a", "b"])) == ["a", None]


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.text(alphabet=characters, max_size=20), max_size=15, unique=True))
def test_round_trip_property(keys):
    log = KeyLog()
    log.add(ids(keys), keys)
    state = log.state_dict()
    fresh = KeyLog()
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert len(fresh) == len(keys)
    assert fresh.lookup(ids(keys)) == keys


def test_table_key_log_through_torch_save(tmp_path):
    table = de.DynamicTable(de.TableConfig(dim=2, seed=3, key_log=True))
    keys = ["cat", "a\x00b", "日本", "😀"]
    table.find_or_insert(keys)
    table.find_or_insert([b"raw\xff"])
    table.erase(["cat"])
    path = tmp_path / "table.pt"
    torch.save(table.state_dict(), path)
    fresh = de.DynamicTable(de.TableConfig(dim=2, seed=3, key_log=True))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.keys_of(hash_strings(keys)) == [None, "a\x00b", "日本", "😀"]
    assert fresh.keys_of(hash_bytes([b"raw\xff"])) == [b"raw\xff"]  # not UTF-8: bytes


def test_equal_length_bytearray_keys_are_logged_as_strings():
    """numpy made a 2-D int array of them: the log held lists, and state_dict failed."""
    emb = de.DynamicEmbedding(dim=2, key_log=True)
    emb([bytearray(b"ab"), bytearray(b"cd")])
    assert emb.table.key_log.lookup(hash_strings(["ab", "cd"])) == ["ab", "cd"]
    emb.state_dict()  # saves


@pytest.mark.parametrize("keys, logged", [
    (["cat", b"fish", b"\xff\xfe", "\u00e9"], ["cat", "fish", b"\xff\xfe", "\u00e9"]),
    ([b"fish", "cat", b"\xff\xfe"], ["fish", "cat", b"\xff\xfe"]),
])
def test_str_and_bytes_keys_in_one_call(keys, logged, tmp_path):
    """The features of a collection that share a table are logged in one call, one feature
    str and another bytes: the bytes were once stored as str (state_dict then raised), or
    the call raised mid-lookup when the bytes came first."""
    key_ids = np.concatenate([ids([k]) for k in keys])
    log = KeyLog()
    log.add(key_ids, keys)
    assert log.lookup(key_ids) == logged
    assert saved_and_loaded(log, tmp_path).lookup(key_ids) == logged


key_values = st.one_of(st.text(alphabet=characters, max_size=6),
                       st.binary(max_size=4).map(lambda b: b + b"\xff"))  # never UTF-8
operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.tuples(st.integers(0, 30), key_values),
                                       max_size=12)),
    st.tuples(st.just("among"), st.lists(st.tuples(st.integers(0, 30), key_values),
                                         max_size=12), st.sets(st.integers(0, 30))),
    st.tuples(st.just("discard"), st.lists(st.integers(0, 30), max_size=8)),
    st.tuples(st.just("keep_odd")),
    st.tuples(st.just("merge"), st.lists(st.tuples(st.integers(0, 30), key_values),
                                         max_size=6)),
    st.tuples(st.just("reload")),
), max_size=25)


def _as_logged(key):
    """What the log gives back: bytes that are UTF-8 come back as the str they spell."""
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            return key
    return key


@settings(max_examples=150, deadline=None)
@given(ops=operations, compact_at=st.sampled_from([0, 3, 1 << 16]))
def test_the_log_behaves_as_a_dict(ops, compact_at):
    """Against a dict id -> key over random adds (the last key of a repeated id wins),
    admitted subsets (the first key of each admitted id), discards, filters, merges and
    reloads; ``compact_at`` makes it rewrite itself early, often or never."""
    with mock.patch("dynembed.keys.key_log.COMPACT_FLOOR", compact_at):
        _check_against_a_dict(ops)


def _check_against_a_dict(ops):
    log, model = KeyLog(), {}
    for op in ops:
        if op[0] in ("add", "merge"):
            pairs = op[1]
            ids_ = np.array([i for i, _ in pairs], dtype=np.int64)
            target = log if op[0] == "add" else KeyLog()
            target.add(ids_, [k for _, k in pairs])
            if op[0] == "merge":
                log.merge(target)
            model.update((i, _as_logged(k)) for i, k in pairs)
        elif op[0] == "among":
            pairs, admitted = op[1], op[2]
            log.add_among(np.array([i for i, _ in pairs], dtype=np.int64),
                          [k for _, k in pairs], np.array(sorted(admitted), dtype=np.int64))
            for i, k in reversed(pairs):
                if i in admitted:
                    model[i] = _as_logged(k)
        elif op[0] == "discard":
            log.discard(np.array(op[1], dtype=np.int64))
            for i in op[1]:
                model.pop(i, None)
        elif op[0] == "keep_odd":
            log.keep_only(lambda ids_: ids_ % 2 == 1)
            model = {i: k for i, k in model.items() if i % 2 == 1}
        else:
            fresh = KeyLog()
            fresh.load_state_dict({k: v.clone() for k, v in log.state_dict().items()})
            log = fresh
        assert len(log) == len(model)
    every = np.arange(-1, 32, dtype=np.int64)
    assert log.lookup(every) == [model.get(i) for i in every.tolist()]


def test_the_log_is_compact_and_frees_what_it_forgets():
    """A dict of Python ints and strs took some 140 bytes a key; discards are given back
    once the dead entries outnumber the live ones."""
    keys = [f"user:{i}" for i in range(200_000)]
    key_ids = hash_strings(keys)
    log = KeyLog()
    log.add(key_ids, keys)
    per_key = log.nbytes / len(log)
    assert per_key < 64 + np.mean([len(k) for k in keys])
    log.discard(key_ids[:150_000])
    assert len(log) == 50_000
    assert log.nbytes < 0.4 * per_key * 200_000
    assert log.lookup(key_ids[149_999:150_002]) == [None, *keys[150_000:150_002]]


def test_add_among_logs_the_first_key_of_each_admitted_id_only():
    log = KeyLog()
    log.add_among(np.array([1, 2, 1, 3], dtype=np.int64), ["a", "b", "c", b"d\xff"],
                  np.array([1, 3, 9], dtype=np.int64))
    assert log.lookup(np.array([1, 2, 3, 9], dtype=np.int64)) == ["a", None, b"d\xff", None]


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(lengths=torch.tensor([3, -1])), "does not fit"),
    (lambda s: s.update(lengths=torch.tensor([3, 9])), "does not fit"),
    (lambda s: s.update(lengths=torch.tensor([3])), "does not fit"),
    (lambda s: s.update(utf8=torch.tensor([0xC3, 0x28], dtype=torch.uint8)), "decode"),
    (lambda s: s.update(raw_lengths=torch.tensor([5])), "does not fit"),
    # the same total split elsewhere: key 2 would start inside "é" and hold the NUL
    (lambda s: s.update(lengths=torch.tensor([1, 2])), "does not fit"),
    (lambda s: s.update(lengths=torch.tensor([3, 0])), "does not fit"),
    (lambda s: s.update(raw_ids=torch.tensor([3, 4, 5, 6]),  # lengths whose sum wraps to 2
                        raw=torch.tensor([255, 1], dtype=torch.uint8),
                        raw_lengths=torch.tensor([2**62, 2**62, 2**62, 2**62 + 2])),
     "does not fit"),
    (lambda s: s.update(ids=s["ids"].reshape(1, 2), lengths=s["lengths"].reshape(1, 2)),
     "'ids' must be a 1-D torch.int64 tensor"),
    (lambda s: s.update(raw_ids=s["raw_ids"][0]), "'raw_ids' must be a 1-D"),
    (lambda s: s.update(utf8=s["utf8"].long()), "'utf8' must be a 1-D torch.uint8 tensor"),
    (lambda s: s.update(lengths=s["lengths"].int()), "'lengths' must be a 1-D torch.int64"),
])
def test_a_damaged_state_is_refused_and_the_log_kept(change, message):
    log = KeyLog()
    log.add(np.array([1, 2], dtype=np.int64), ["a\u00e9", "b"])
    log.add(np.array([3], dtype=np.int64), [b"\xff"])
    state = log.state_dict()
    change(state)
    with pytest.raises(ValueError, match=message):
        log.load_state_dict(state)
    assert log.lookup(np.array([1, 2, 3], dtype=np.int64)) == ["a\u00e9", "b", b"\xff"]


def test_ids_of_any_integer_array_and_one_key_each():
    """Big-endian ids were read as the int64 of their bytes (other ids); a call with
    fewer keys than ids forgot the ids' old keys before it failed."""
    log = KeyLog()
    log.add(torch.tensor([1, 2]), ["a", "b"])
    assert log.lookup(np.array([2, 1], dtype=">i8")) == ["b", "a"]
    log.add_among([3, 4], ["c", "d"], np.array([4], dtype=">u8"))
    assert log.lookup(torch.tensor([3, 4])) == [None, "d"]
    with pytest.raises(ValueError, match="one key per id: 2 ids, 1 keys"):
        log.add(np.array([1, 2]), ["x"])
    with pytest.raises(ValueError, match="ids must be 1-D"):
        log.lookup(np.array([[1, 2]]))
    with pytest.raises(TypeError, match="integer array"):
        log.discard(np.array([1.0]))
    assert log.lookup(np.array([1, 2, 4])) == ["a", "b", "d"]


def test_table_stats_count_the_key_logs_bytes():
    plain = de.DynamicTable(de.TableConfig(dim=2, seed=3))
    logged = de.DynamicTable(de.TableConfig(dim=2, seed=3, key_log=True))
    keys = [f"word{i}" for i in range(5_000)]
    for table in (plain, logged):
        table.find_or_insert(keys)
    assert plain.stats().key_log_bytes == 0
    assert logged.stats().key_log_bytes == logged.key_log.nbytes >= 5_000 * (8 + 8 + 8 + 5)
    assert logged.stats().bytes_allocated == plain.stats().bytes_allocated  # the budget's
    logged.erase(keys)  # an empty log still holds its buffers until it compacts
    assert logged.stats().key_log_bytes == logged.key_log.nbytes > 0


def test_state_of_and_merge_state_match_a_built_log():
    """The distributed exchange packs states made straight from keys and merges them into
    the owners' logs, without building a log either side."""
    keys = ["cat", "a\x00b", "\u00e9t\u00e9", b"raw\xff", b"fish", ""]
    key_ids = np.arange(10, 16, dtype=np.int64)
    built = KeyLog()
    built.add(key_ids, keys)
    direct = KeyLog.state_of(key_ids, keys)
    for name, tensor in built.state_dict().items():
        assert torch.equal(direct[name], tensor), name
    log = KeyLog()
    log.add(np.array([10, 99], dtype=np.int64), ["old", "kept"])
    log.merge_state(direct)  # its keys win
    assert log.lookup(np.array([10, 99, 13, 15])) == ["cat", "kept", b"raw\xff", ""]
    damaged = dict(direct, lengths=direct["lengths"][:-1])
    with pytest.raises(ValueError, match="does not fit"):
        log.merge_state(damaged)
    assert len(log) == 7
    with pytest.raises(ValueError, match="one key per id"):
        KeyLog.state_of(key_ids, keys[:2])
