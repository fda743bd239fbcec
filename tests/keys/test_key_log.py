"""KeyLog: id -> original key, add/lookup/discard and a weights_only state dict."""

from __future__ import annotations

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
