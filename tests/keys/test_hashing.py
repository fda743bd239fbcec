"""The string hash is XXH64 of the UTF-8 bytes, read as a signed int64, in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import dynembed as de
from dynembed.keys import DEFAULT_HASH_SEED, hash_bytes, hash_strings, to_key_batch

SEEDS = [0, 1, 42, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 0x9E3779B97F4A7C15, 2**64 - 1]

# Any code point, including NUL, lone surrogates (encoded with 'surrogatepass') and astral
# characters that take 4 UTF-8 bytes.
characters = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),
    st.sampled_from(["\x00", "\x7f", "\x80", "\u07ff", "\u0800", "\uffff", "\U00010000",
                     "\U0010ffff"]),
)
keys_text = st.text(alphabet=characters, max_size=200)


def encode(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def reference(key: str | bytes, seed: int) -> int:
    """xxhash's digest reinterpreted as two's complement int64."""
    data = encode(key) if isinstance(key, str) else bytes(key)
    digest = xxhash.xxh64_intdigest(data, seed=seed)
    return digest - 2**64 if digest >= 2**63 else digest


def reference_ids(keys, seed: int) -> list[int]:
    return [reference(k, seed) for k in keys]


def test_default_seed_is_zero_and_known_vector():
    assert DEFAULT_HASH_SEED == 0
    # XXH64("", 0) is the published test vector 0xEF46DB3751D8E999.
    assert hash_strings([""]).tolist() == [0xEF46DB3751D8E999 - 2**64]
    assert hash_bytes([b""]).tolist() == [0xEF46DB3751D8E999 - 2**64]


def test_output_dtype_and_shape():
    ids = hash_strings(["a", "b", "c"], 7)
    assert ids.dtype == np.int64 and ids.shape == (3,)
    empty = hash_strings([], 7)
    assert empty.dtype == np.int64 and empty.shape == (0,)
    assert hash_bytes([], 7).shape == (0,)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_length_and_tail_path(seed):
    # Lengths 0..200 cover the < 32 and >= 32 byte paths and every combination of the 8-, 4-
    # and 1-byte tails; the byte values are varied so no lane reads constant data.
    rng = np.random.default_rng(seed % 2**32)
    blobs = [bytes(rng.integers(0, 256, size=n, dtype=np.uint8)) for n in range(201)]
    assert hash_bytes(blobs, seed).tolist() == reference_ids(blobs, seed)
    ascii_keys = ["".join(chr(32 + (7 * i + n) % 95) for i in range(n)) for n in range(201)]
    assert hash_strings(ascii_keys, seed).tolist() == reference_ids(ascii_keys, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_multibyte_and_special_code_points(seed):
    keys = ["", "\x00", "\x00\x00", "a\x00b", "\x00" * 40, "é", "é" * 33, "日本語",
            "\ud800", "\udfff", "a\udc80b", "\ud83d\ude00", "😀", "😀" * 9, "\U0010ffff",
            "x" * 31, "x" * 32, "x" * 33, "x\x00" * 20, "\x00é\x00😀\x00"]
    assert hash_strings(keys, seed).tolist() == reference_ids(keys, seed)
    # Each key alone gives the same id as in the batch (no dependence on neighbours).
    for key in keys:
        assert hash_strings([key], seed).tolist() == [reference(key, seed)]


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(keys_text, max_size=12), seed=st.sampled_from(SEEDS))
def test_hash_strings_matches_xxhash(keys, seed):
    ids = hash_strings(keys, seed)
    assert ids.dtype == np.int64
    assert ids.tolist() == reference_ids(keys, seed)


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(st.binary(max_size=200), max_size=12),
       seed=st.integers(min_value=0, max_value=2**64 - 1))
def test_hash_bytes_matches_xxhash(keys, seed):
    assert hash_bytes(keys, seed).tolist() == reference_ids(keys, seed)


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(keys_text, min_size=1, max_size=8), seed=st.sampled_from(SEEDS))
def test_bytes_keys_hash_like_their_str(keys, seed):
    as_bytes = [encode(k) for k in keys]
    assert hash_bytes(as_bytes, seed).tolist() == hash_strings(keys, seed).tolist()
    # Through the key converter too (a list of bytes, bytearrays, a numpy object array).
    by_str = to_key_batch(keys, hash_seed=seed).ids.tolist()
    assert to_key_batch(as_bytes, hash_seed=seed).ids.tolist() == by_str
    assert to_key_batch([bytearray(b) for b in as_bytes], hash_seed=seed).ids.tolist() == by_str
    assert to_key_batch(np.array(as_bytes, dtype=object), hash_seed=seed).ids.tolist() == by_str


def test_seed_changes_ids():
    keys = ["cat", "dog", ""]
    assert hash_strings(keys, 0).tolist() != hash_strings(keys, 1).tolist()
    assert hash_strings(keys, 2**64 - 1).tolist() == reference_ids(keys, 2**64 - 1)


def test_numpy_seed_types():
    keys = ["cat", "dog"]
    expected = reference_ids(keys, 2**64 - 1)
    assert hash_strings(keys, np.uint64(2**64 - 1)).tolist() == expected
    assert hash_bytes([b"cat", b"dog"], np.uint64(2**64 - 1)).tolist() == expected


def test_table_uses_its_hash_seed():
    table = de.DynamicTable(de.TableConfig(dim=2, seed=0, hash_seed=2**64 - 1))
    assert table.ids_of(["cat"]).ids.tolist() == [reference("cat", 2**64 - 1)]


_CHILD = r"""
import json, sys
from dynembed.keys import hash_bytes, hash_strings
keys, seeds = json.loads(sys.argv[1])
out = {str(s): [hash_strings(keys, s).tolist(),
                hash_bytes([k.encode("utf-8", "surrogatepass") for k in keys], s).tolist()]
       for s in seeds}
print(json.dumps(out))
"""


def test_ids_identical_in_a_fresh_process():
    keys = ["", "cat", "dog", "\x00", "a\x00b", "é", "日本語", "😀", "\ud800", "x" * 100,
            "user:123456789", "\U0010ffff" * 10]
    seeds = [0, 1, 2**63, 2**64 - 1]
    # json escapes lone surrogates as \udXXX, which json.loads restores.
    payload = json.dumps([keys, seeds])
    # A different PYTHONHASHSEED makes sure Python's own str hash plays no part.
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], capture_output=True,
                          text=True, timeout=120, check=False,  # the assert shows stderr
                          env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout)
    for seed in seeds:
        here = hash_strings(keys, seed).tolist()
        assert here == reference_ids(keys, seed)
        assert child[str(seed)] == [here, here]



@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_hash_functions_name_a_bad_seed(seed):
    """An out-of-range seed ended in numpy's OverflowError."""
    for hash_keys, keys in ((de.hash_strings, ["a"]), (de.hash_bytes, [b"a"])):
        with pytest.raises(ValueError, match=r"hash_seed must be an int in \[0, 2\*\*64\)"):
            hash_keys(keys, seed)
