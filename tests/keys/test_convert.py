"""Key conversion: every accepted input form, int64 extremes, and the documented errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.errors import DynembedError, KeyInputError, KeyValueError
from dynembed.keys import hash_bytes, hash_strings, to_jagged, to_key_batch

EXTREMES = [-2**63, 2**63 - 1, 0, -1]
ARG = "item_ids"  # a distinctive argument name that every error message must carry


def ids_of(keys, **kw):
    return to_key_batch(keys, **kw).ids.tolist()


# ----------------------------------------------------------------------------- accepted forms
def test_error_classes():
    assert issubclass(KeyInputError, TypeError) and issubclass(KeyInputError, DynembedError)
    assert issubclass(KeyValueError, ValueError) and issubclass(KeyValueError, DynembedError)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8])
def test_torch_integer_tensor_1d(dtype):
    keys = torch.tensor([3, 1, 4, 1, 5], dtype=dtype)
    batch = to_key_batch(keys)
    assert batch.ids.dtype == np.int64
    assert batch.ids.tolist() == [3, 1, 4, 1, 5]
    assert batch.shape == (5,)
    assert batch.kind == "int"
    assert batch.strings is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_torch_integer_tensor_2d_keeps_shape(dtype):
    keys = torch.arange(12, dtype=dtype).reshape(3, 4) - 6
    batch = to_key_batch(keys)
    assert batch.shape == (3, 4)
    assert batch.ids.tolist() == list(range(-6, 6))


def test_torch_non_contiguous_and_3d():
    base = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    batch = to_key_batch(base.t())  # (3, 2), not contiguous
    assert batch.shape == (3, 2)
    assert batch.ids.tolist() == base.t().reshape(-1).tolist() == [0, 3, 1, 4, 2, 5]
    strided = torch.arange(10, dtype=torch.int64)[::2]  # 1-D, a view with stride 2
    batch = to_key_batch(strided)
    assert batch.ids.flags.c_contiguous and batch.ids.tolist() == [0, 2, 4, 6, 8]
    cube = torch.arange(24, dtype=torch.int32).reshape(2, 3, 4)
    batch = to_key_batch(cube)
    assert batch.shape == (2, 3, 4) and batch.ids.tolist() == list(range(24))


def test_torch_empty_int_tensor():
    batch = to_key_batch(torch.empty(0, dtype=torch.int64))
    assert batch.ids.shape == (0,) and batch.ids.dtype == np.int64
    assert batch.kind == "empty"
    batch = to_key_batch(torch.empty((2, 0), dtype=torch.int64))
    assert batch.shape == (2, 0) and batch.ids.shape == (0,)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.int8, np.uint8,
                                   np.uint16, np.uint32, np.uint64])
def test_numpy_integer_arrays(dtype):
    keys = np.array([7, 0, 9, 7], dtype=dtype)
    batch = to_key_batch(keys)
    assert batch.ids.dtype == np.int64
    assert batch.ids.tolist() == [7, 0, 9, 7]
    assert batch.shape == (4,) and batch.kind == "int"


def test_numpy_2d_and_non_contiguous():
    keys = np.arange(12, dtype=np.int32).reshape(3, 4)
    batch = to_key_batch(keys)
    assert batch.shape == (3, 4) and batch.ids.tolist() == list(range(12))
    sliced = np.arange(20, dtype=np.int64)[::3]
    assert ids_of(sliced) == list(range(0, 20, 3))
    batch = to_key_batch(keys.T)
    assert batch.shape == (4, 3) and batch.ids.tolist() == keys.T.reshape(-1).tolist()


def test_numpy_uint64_within_range():
    keys = np.array([0, 2**63 - 1], dtype=np.uint64)
    assert ids_of(keys) == [0, 2**63 - 1]


STRS = ["cat", "dog", "", "é", "日本", "cat"]


def test_list_of_str():
    batch = to_key_batch(STRS, hash_seed=5)
    assert batch.ids.tolist() == hash_strings(STRS, 5).tolist()
    assert batch.shape == (6,) and batch.kind == "str"
    assert list(batch.strings) == STRS
    assert batch.ids[0] == batch.ids[5]
    assert len(set(batch.ids.tolist())) == 5


def test_list_and_tuple_of_bytes():
    raw = [s.encode() for s in STRS]
    expected = hash_strings(STRS, 5).tolist()
    for keys in (raw, tuple(raw), [bytearray(b) for b in raw]):
        batch = to_key_batch(keys, hash_seed=5)
        assert batch.ids.tolist() == expected
        assert batch.kind == "str" and batch.shape == (6,)
    assert ids_of([b"\x00\xff", b"\xff"], hash_seed=1) == hash_bytes([b"\x00\xff", b"\xff"],
                                                                    1).tolist()


def test_list_and_tuple_of_int():
    keys = [5, -3, 0, 5, 2**40]
    for form in (keys, tuple(keys), [np.int64(k) for k in keys], [np.int32(5), 7]):
        batch = to_key_batch(form)
        assert batch.ids.dtype == np.int64
        assert batch.ids.tolist() == [int(k) for k in form]
        assert batch.shape == (len(form),) and batch.kind == "int"


def test_numpy_str_and_bytes_arrays():
    expected = hash_strings(STRS, 3).tolist()
    assert ids_of(np.array(STRS), hash_seed=3) == expected
    assert ids_of(np.array(STRS, dtype=object), hash_seed=3) == expected
    raw = [s.encode() for s in STRS]
    assert ids_of(np.array(raw, dtype=object), hash_seed=3) == expected
    # Fixed-width bytes arrays ('S'): numpy itself strips trailing NULs, so use keys without.
    ascii_keys = ["a", "bb", "", "ccc"]
    assert ids_of(np.array([k.encode() for k in ascii_keys]), hash_seed=3) == \
        hash_strings(ascii_keys, 3).tolist()
    batch = to_key_batch(np.array(STRS))
    assert batch.kind == "str" and batch.shape == (6,)


def test_numpy_object_int_array():
    keys = np.array([1, -2, 2**63 - 1], dtype=object)
    assert ids_of(keys) == [1, -2, 2**63 - 1]


def test_empty_inputs():
    for keys in ([], (), np.array([], dtype=np.int64), np.array([], dtype=str)):
        batch = to_key_batch(keys)
        assert batch.ids.shape == (0,) and batch.ids.dtype == np.int64
        assert batch.kind == "empty"


def test_pandas_series_and_index():
    import pandas as pd
    assert ids_of(pd.Series([4, 5, 6])) == [4, 5, 6]
    assert ids_of(pd.Series(np.array([4, 5], dtype=np.int32))) == [4, 5]
    assert ids_of(pd.Series(STRS), hash_seed=2) == hash_strings(STRS, 2).tolist()
    assert ids_of(pd.Index(STRS), hash_seed=2) == hash_strings(STRS, 2).tolist()
    assert to_key_batch(pd.Series([1, 2])).shape == (2,)
    with pytest.raises(KeyInputError, match=ARG):
        to_key_batch(pd.Series([1.5, 2.0]), arg=ARG)


@pytest.mark.parametrize("form", ["list", "tuple", "numpy", "torch", "object"])
def test_int64_extremes_round_trip(form):
    make = {"list": list, "tuple": tuple, "numpy": lambda x: np.array(x, dtype=np.int64),
            "torch": lambda x: torch.tensor(x, dtype=torch.int64),
            "object": lambda x: np.array(x, dtype=object)}[form]
    batch = to_key_batch(make(EXTREMES))
    assert batch.ids.dtype == np.int64
    assert batch.ids.tolist() == EXTREMES


def test_extremes_through_a_table():
    table = de.DynamicTable(de.TableConfig(dim=2, seed=0))
    values = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    table.insert_or_assign(EXTREMES, values)
    assert sorted(table.export().ids.tolist()) == sorted(EXTREMES)
    result = table.find(torch.tensor(EXTREMES))
    assert result.found.all()
    assert torch.equal(result.values, values)


# ----------------------------------------------------------------------------- bad inputs
def raises(exc, keys, what=None):
    pattern = ARG if what is None else f"{ARG}.*{what}"
    with pytest.raises(exc, match=pattern):
        to_key_batch(keys, arg=ARG)


@pytest.mark.parametrize("keys", [
    [1.0, 2.0], [1, 2.5], [1, 2.0], (0.5,), [np.float32(1.0)], [np.float64(1.0), 2],
    torch.tensor([1.0, 2.0]), torch.tensor([1.0], dtype=torch.float64),
    torch.tensor([1.0], dtype=torch.float16), torch.tensor([1 + 2j]),
    np.array([1.0, 2.0]), np.array([1.0], dtype=np.float32), np.array([], dtype=np.float64),
    np.array([[1.0]]), np.array([1 + 2j]),
], ids=repr)
def test_float_keys_raise(keys):
    raises(KeyInputError, keys)


def test_float_message_is_helpful():
    raises(KeyInputError, [1, 2.5], "float")
    raises(KeyInputError, torch.tensor([1.0]), "float32")
    raises(KeyInputError, np.array([1.0]), "float64")


@pytest.mark.parametrize("keys", [
    [True, False], [True], [np.True_], np.array([True, False]), torch.tensor([True]),
], ids=repr)
def test_bool_keys_raise(keys):
    raises(KeyInputError, keys, "bool")


@pytest.mark.parametrize("keys", [[1, True], [5, 6, False], [1, np.True_]], ids=repr)
def test_bool_after_int_raises(keys):
    # Documented: bool keys raise KeyInputError. A bool after the first int key must not be
    # silently taken as the id 0 or 1.
    raises(KeyInputError, keys, "bool")


@pytest.mark.parametrize("keys", [[None], [None, 1], [1, None], ["a", None], [b"a", None],
                                  [None, "a"], (1, 2, None)], ids=repr)
def test_none_in_a_list_raises(keys):
    raises(KeyInputError, keys, "None")


@pytest.mark.parametrize("keys", [
    ["a", 1], [1, "a"], ["a", "b", 3], [1, 2, "c"], [b"a", 1], [1, b"a"],
    np.array(["a", 1], dtype=object), np.array([1, "a"], dtype=object),
    ["a", np.int64(1)], [np.int64(1), "a"],
], ids=repr)
def test_mixed_str_and_int_raise(keys):
    raises(KeyInputError, keys)


def test_mixed_message_names_both_types():
    raises(KeyInputError, ["a", 1], "str.*int")
    raises(KeyInputError, [1, "a"], "int.*str")
    # str and bytes do not mix either: the message once said "all str/bytes"
    raises(KeyInputError, ["a", b"a"], "all str, all bytes, or all int ids")


@pytest.mark.parametrize("keys", [
    [[1, 2], [3]], [1, [2]], [["a"], "b"], [[[1]], [[2]]], [np.array([1])],
    [torch.tensor([1])],
], ids=repr)
def test_nested_lists_that_are_not_b_by_l_raise(keys):
    raises(KeyInputError, keys)


def test_object_arrays_of_lists_and_mixed_rows_say_what_to_pass():
    with pytest.raises(KeyInputError, match=r"object array of lists .* pass keys\.tolist\(\)"):
        to_key_batch(_object_array([["a", "b"], ["c", "d"]]), arg=ARG)
    with pytest.raises(KeyInputError, match=rf"{ARG} \(flattened row by row\): mixed key "
                                            r"types: item 0 is str but item 2 is int"):
        to_key_batch([["a", "b"], [1, 2]], arg=ARG)


def _object_array(rows: list) -> np.ndarray:
    arr = np.empty(len(rows), dtype=object)
    arr[:] = rows
    return arr


def test_ragged_rows_name_their_lengths_and_the_fixes():
    with pytest.raises(KeyInputError, match=r"must be \(B, L\).*rows of \[1, 2\]\. Pad the "
                                            r"rows \(padding_key="):
        to_key_batch([["a"], ["b", "c"]], arg=ARG)


@pytest.mark.parametrize("keys, shape", [
    ([["a", "b", "c"], ["d", "e", "f"]], (2, 3)), ((("a",), ("b",)), (2, 1)),
    ([[1, 2], [3, 4]], (2, 2)), ([[], []], (2, 0)),
    (np.array([["a", "b"], ["c", "d"]]), (2, 2)), (np.array([[b"a"], [b"b"]]), (2, 1)),
    (np.array([["a", "b"], ["c", "d"]], dtype=object), (2, 2)),
], ids=repr)
def test_b_by_l_keys_keep_their_shape(keys, shape):
    """Padded token sequences as nested lists or 2-D string arrays were refused (only int
    tensors kept a shape), with a hint to use bags, which pool the sequence away."""
    batch = to_key_batch(keys)
    flat = to_key_batch(list(np.asarray(keys, dtype=object).reshape(-1)))
    assert batch.shape == shape and batch.ids.tolist() == flat.ids.tolist()
    assert (batch.strings is None) == (flat.strings is None)
    if flat.strings is not None:  # the key log's strings, in the ids' order
        assert list(batch.strings) == list(flat.strings)


@pytest.mark.parametrize("keys", ["cat", "", b"cat", bytearray(b"cat")], ids=repr)
def test_single_string_raises(keys):
    raises(KeyInputError, keys, "single")


@pytest.mark.parametrize("keys", [{1, 2}, {1: 2}, iter([1, 2]), 5, 2.0, None, object()],
                         ids=lambda k: type(k).__name__)
def test_unsupported_containers_raise(keys):
    raises(KeyInputError, keys)


@pytest.mark.parametrize("keys", [[2**63], [-2**63 - 1], [2**64], [2**100], [-2**64],
                                  np.array([2**64], dtype=object)], ids=repr)
def test_out_of_range_python_ints_raise(keys):
    raises(KeyValueError, keys, "int64")


@pytest.mark.parametrize("keys", [[0, 2**63], [2**63, -1], [1, 2, -2**63 - 1],
                                  [-1, 2**64]], ids=repr)
def test_out_of_range_int_among_valid_ints_raises_key_value_error(keys):
    # Documented: "KeyValueError (a ValueError): an integer outside the int64 range".
    raises(KeyValueError, keys, "int64")


@pytest.mark.parametrize("keys", [
    np.array([2**63], dtype=np.uint64), np.array([0, 2**64 - 1], dtype=np.uint64),
    np.array([[1], [2**63 + 5]], dtype=np.uint64), [np.uint64(2**63)],
], ids=repr)
def test_uint64_numpy_beyond_int64_raises(keys):
    raises(KeyValueError, keys, "int64")


def test_uint64_torch_tensor_beyond_int64_raises():
    # The same rule as numpy uint64 arrays: values above 2**63 - 1 must not wrap silently.
    keys = torch.tensor([0, 2**64 - 1], dtype=torch.uint64)
    raises(KeyValueError, keys, "int64")


def test_errors_name_the_default_argument_and_table_arguments():
    with pytest.raises(KeyInputError, match="^keys"):
        to_key_batch([1.5])
    table = de.DynamicTable(de.TableConfig(dim=2, seed=0))
    with pytest.raises(KeyInputError, match="keys"):
        table.find([1.5])
    with pytest.raises(KeyValueError, match="keys"):
        table.find_or_insert([2**64])


# ----------------------------------------------------------------------------- to_jagged
def jag(values, offsets=None, **kw):
    batch, bounds = to_jagged(values, offsets, **kw)
    assert bounds.dtype == np.int64
    return batch.ids.tolist(), bounds.tolist()


def test_jagged_list_of_lists():
    assert jag([[1, 2], [3], [4, 5, 6]]) == ([1, 2, 3, 4, 5, 6], [0, 2, 3, 6])
    assert jag(((1,), (2, 3))) == ([1, 2, 3], [0, 1, 3])
    assert jag([np.array([1, 2]), np.array([3])]) == ([1, 2, 3], [0, 2, 3])
    assert jag([torch.tensor([1, 2]), torch.tensor([3])]) == ([1, 2, 3], [0, 2, 3])
    ids, bounds = jag([["a", "b"], ["c"]], hash_seed=9)
    assert ids == hash_strings(["a", "b", "c"], 9).tolist() and bounds == [0, 2, 3]
    ids, bounds = jag([[b"a"], [b"b", b"c"]], hash_seed=9)
    assert ids == hash_strings(["a", "b", "c"], 9).tolist() and bounds == [0, 1, 3]


def test_jagged_empty_bags():
    assert jag([[], [1], [], [2, 3], []]) == ([1, 2, 3], [0, 0, 1, 1, 3, 3])
    assert jag([[], []]) == ([], [0, 0, 0])
    assert jag([]) == ([], [0])
    assert jag([["a"], []])[1] == [0, 1, 1]
    assert jag([torch.tensor([], dtype=torch.int64), torch.tensor([7])]) == ([7], [0, 0, 1])
    assert jag([1, 2], [0, 0, 2, 2]) == ([1, 2], [0, 0, 2, 2, 2])
    assert jag([], [0, 0]) == ([], [0, 0, 0])


@pytest.mark.parametrize("make", [list, np.array, torch.tensor], ids=["list", "numpy", "torch"])
def test_jagged_values_and_offsets(make):
    values = make([10, 11, 12, 13, 14])
    assert jag(values, make([0, 2, 2, 4])) == ([10, 11, 12, 13, 14], [0, 2, 2, 4, 5])
    assert jag(values, make([0, 2, 2, 4, 5]), include_last_offset=True) == (
        [10, 11, 12, 13, 14], [0, 2, 2, 4, 5])
    assert jag(values, make([0])) == ([10, 11, 12, 13, 14], [0, 5])
    assert jag(values, make([0, 5]), include_last_offset=True)[1] == [0, 5]


def test_jagged_string_values_with_offsets():
    ids, bounds = jag(["a", "b", "c"], [0, 1], hash_seed=4)
    assert ids == hash_strings(["a", "b", "c"], 4).tolist() and bounds == [0, 1, 3]
    ids, bounds = jag(np.array(["a", "b", "c"]), torch.tensor([0, 2, 3]),
                      include_last_offset=True, hash_seed=4)
    assert ids == hash_strings(["a", "b", "c"], 4).tolist() and bounds == [0, 2, 3]


@pytest.mark.parametrize("make", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_jagged_2d_array(make):
    batch, bounds = to_jagged(make([[1, 2, 3], [4, 5, 6]]))
    assert batch.ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert bounds.tolist() == [0, 3, 6]
    batch, bounds = to_jagged(torch.empty((3, 0), dtype=torch.int64))
    assert batch.ids.tolist() == [] and bounds.tolist() == [0, 0, 0, 0]


def test_jagged_extremes():
    assert jag([EXTREMES, []]) == (EXTREMES, [0, 4, 4])


def jag_raises(exc, pattern, values, offsets=None, **kw):
    with pytest.raises(exc, match=pattern):
        to_jagged(values, offsets, **kw)


@pytest.mark.parametrize("offsets", [[1], [1, 2], np.array([2]), torch.tensor([1, 3]), [-1, 0]],
                         ids=repr)
def test_offsets_not_starting_at_zero(offsets):
    jag_raises(KeyValueError, "offsets.*first offset must be 0", [1, 2, 3], offsets)


@pytest.mark.parametrize("offsets", [[0, 2, 1], [0, 3, 2, 3], torch.tensor([0, 1, 0]),
                                     [0, -1]], ids=repr)
def test_decreasing_offsets(offsets):
    jag_raises(KeyValueError, "offsets.*non-decreasing", [1, 2, 3], offsets)


@pytest.mark.parametrize("offsets, entry", [([0, 4], 1), ([0, 1, 100], 2),
                                           (np.array([0, 3, 4]), 2)], ids=repr)
def test_offsets_past_the_end(offsets, entry):
    """The message names the entry the caller gave (not the end appended to it)."""
    jag_raises(KeyValueError, rf"offsets: entry {entry} \(\d+\) points past the end of the "
               r"values \(3\)", [1, 2, 3], offsets)


def test_offsets_errors_name_the_values_argument():
    jag_raises(KeyValueError, r"inputs\['q'\] offsets: the first offset must be 0", [1, 2],
               [1], arg="inputs['q']")


@pytest.mark.parametrize("keys", [[np.uint64(5), -1], [np.uint64(5), np.int64(-1)],
                                  [2**63 - 1, np.uint64(2**63 - 1), -2**63]], ids=repr)
def test_int_lists_numpy_has_no_one_dtype_for(keys):
    """uint64 beside negative ints: numpy makes float64 of them, the keys are still ids."""
    assert ids_of(keys) == [int(k) for k in keys]


@pytest.mark.parametrize("keys, item", [([2**63], 0), ([1, 2**63], 1),
                                        ([np.uint64(2**63)], 0)], ids=repr)
def test_int_list_items_past_int64_are_named(keys, item):
    with pytest.raises(KeyValueError, match=rf"{ARG}: item {item}: an int key is outside"):
        to_key_batch(keys, arg=ARG)


@pytest.mark.parametrize("keys, match", [
    (torch.tensor([1, 2], device="meta"), "meta device"),
    (torch.tensor([[0, 1]]).to_sparse(), "sparse_coo tensor; keys must be a dense"),
], ids=["meta", "sparse"])
def test_tensors_without_plain_values_raise(keys, match):
    with pytest.raises(KeyInputError, match=rf"{ARG}: .*{match}"):
        to_key_batch(keys, arg=ARG)


def test_tensor_bags_of_mixed_integer_dtypes():
    bags = [torch.tensor([1, -2]), torch.tensor([3], dtype=torch.uint32),
            torch.tensor([4], dtype=torch.uint64)]
    batch, bounds = to_jagged(bags)
    assert batch.ids.tolist() == [1, -2, 3, 4] and bounds.tolist() == [0, 2, 3, 4]
    with pytest.raises(KeyValueError, match="uint64 key exceeds the int64 range"):
        to_jagged([torch.tensor([1]), torch.tensor([2**63], dtype=torch.uint64)])
    batch, bounds = to_jagged([torch.tensor([1, 2]), torch.tensor([])])  # empty: no dtype
    assert batch.ids.tolist() == [1, 2] and bounds.tolist() == [0, 2, 2]
    for bad in (torch.tensor([1.5, 2.7]), torch.tensor([1j])):  # never cast to keys
        with pytest.raises(KeyInputError, match=rf"{ARG}: bag 1 is a {bad.dtype} tensor"):
            to_jagged([torch.tensor([3]), bad], arg=ARG)


def test_offsets_past_the_end_with_include_last_offset():
    jag_raises(KeyValueError, "offsets.*last offset", [1, 2, 3], [0, 4],
               include_last_offset=True)
    jag_raises(KeyValueError, "offsets", [1, 2, 3], [0, 5, 3], include_last_offset=True)


@pytest.mark.parametrize("offsets", [[[0, 1]], np.zeros((2, 1), dtype=np.int64),
                                     torch.zeros((1, 2), dtype=torch.int64)], ids=repr)
def test_two_dimensional_offsets(offsets):
    jag_raises(KeyValueError, "offsets.*1-D", [1, 2, 3], offsets)


@pytest.mark.parametrize("offsets", [[0.0, 1.0], np.array([0.0]), torch.tensor([0.0, 2.0]),
                                     torch.tensor([True, False])], ids=repr)
def test_float_offsets(offsets):
    jag_raises(KeyInputError, "offsets.*integers", [1, 2, 3], offsets)


def test_offsets_on_the_meta_device():
    jag_raises(KeyInputError, "offsets on the meta device.*pass the offsets on the cpu",
               [1, 2, 3], torch.tensor([0, 1], device="meta"))


@pytest.mark.parametrize("offsets", [[0, 2], [0, 1, 2], [0]], ids=repr)
def test_include_last_offset_with_wrong_last(offsets):
    jag_raises(KeyValueError, "offsets.*last offset must equal the number of values",
               [1, 2, 3], offsets, include_last_offset=True)


def test_include_last_offset_needs_an_entry():
    jag_raises(KeyValueError, "offsets.*at least one entry", [1, 2, 3], [],
               include_last_offset=True)


def test_include_last_offset_first_entry_must_be_zero():
    # As torch.nn.functional.embedding_bag: offsets[0] has to be 0. [3] would describe zero
    # bags and silently drop all three values.
    jag_raises(KeyValueError, "offsets.*first offset must be 0", [1, 2, 3], [3],
               include_last_offset=True)


def test_jagged_values_errors_name_the_argument():
    jag_raises(KeyInputError, "bag_keys", [[[1]]], arg="bag_keys")  # three deep
    jag_raises(KeyInputError, "bag_keys", [[1], [[2, 3]]], arg="bag_keys")
    jag_raises(KeyInputError, "bag_keys", [[1.5]], arg="bag_keys")
    jag_raises(KeyInputError, "bag_keys", [["a"], [1]], arg="bag_keys")
    jag_raises(KeyInputError, "bag_keys", [[1], [None]], arg="bag_keys")
    jag_raises(KeyValueError, "bag_keys", [[2**63]], arg="bag_keys")
    jag_raises(KeyInputError, "bag_keys.*offsets", [1, 2, 3], arg="bag_keys")  # flat, no offsets
    jag_raises(KeyInputError, "bag_keys", [[1], 2], arg="bag_keys")
    jag_raises(KeyInputError, "bag_keys", {"a": [1]}, arg="bag_keys")
    jag_raises(KeyInputError, "bag_keys", "abc", arg="bag_keys")
    jag_raises(KeyValueError, "bag_keys.*1-D", np.array([[1, 2]]), [0], arg="bag_keys")
    jag_raises(KeyInputError, "bag_keys", [1.0, 2.0], [0], arg="bag_keys")


def test_bytes_keys_beside_other_buffers_are_refused():
    """b"".join takes any buffer, whose len need not be its size in bytes: the later keys
    hashed shifted bytes (a valid key got another id) and a large len read past the end."""
    cat = to_key_batch([b"cat"]).ids[0]
    for other in (np.array([1.5]), memoryview(b"xy"), np.zeros((50_000_000, 0))):
        raises(KeyInputError, [b"a", other, b"cat"])
    with pytest.raises(TypeError, match="bytes or bytearray"):
        hash_bytes([b"a", memoryview(b"cat")])
    assert to_key_batch([b"a", bytearray(b"x"), b"cat"]).ids[2] == cat
    with pytest.raises(KeyInputError, match="values"):
        to_jagged([[b"a"], [np.arange(3)]])


def test_masked_arrays_refuse_their_masked_keys():
    """Masked (missing) entries were looked up as keys."""
    raises(KeyInputError, np.ma.array([1, 2, 3], mask=[0, 1, 0]), "masked")
    batch = to_key_batch(np.ma.array([1, 2, 3], mask=[0, 0, 0]))
    assert batch.ids.tolist() == [1, 2, 3]


def test_complex_offsets_are_refused():
    """The imaginary part was dropped with only a warning."""
    jag_raises(KeyInputError, "offsets must be integers", [1, 2, 3],
               torch.tensor([0, 1 + 5j]))


def test_unclear_errors_now_say_what_is_wrong():
    """pandas NA keys were reported as float64 keys to cast; a nested tensor failed inside
    torch; a list of lists with offsets was told to use bags (it already was bags)."""
    import pandas as pd
    raises(KeyInputError, pd.Series([1, None, 3], dtype="Int64"), "1 missing values")
    raises(KeyInputError, pd.Series(["a", None]), "missing values")
    assert to_key_batch(pd.Series([1, 2, 3], dtype="Int64")).ids.tolist() == [1, 2, 3]
    nested = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])],
                                        layout=torch.jagged)
    raises(KeyInputError, nested, "nested tensor")
    jag_raises(KeyInputError, "values: bags given as a list of lists.*drop offsets=",
               [[1, 2], [3]], [0, 2])


def test_bags_mixing_tensors_and_lists_convert_in_any_order():
    """[tensor, list] failed as "nesting deeper than allowed" where [list, tensor] worked."""
    for bags in ([torch.tensor([1, 2]), [3]], [np.array([1, 2]), [3]], [[1, 2], torch.tensor([3])]):
        batch, bounds = to_jagged(bags)
        assert batch.ids.tolist() == [1, 2, 3] and bounds.tolist() == [0, 2, 3]
    jag_raises(KeyInputError, "values", [torch.tensor([1.5]), [3]])


@pytest.mark.parametrize("dtype", ["U", "S", object])
def test_two_dimensional_string_array_is_fixed_size_bags(dtype):
    """A (B, L) str / bytes / object array was refused with "flatten them or use bags"
    although it was given as bags; it is B bags of L keys, as a 2-D integer array."""
    keys = [["red", "shoe"], ["blue", "hat"], ["red", "hat"]]
    values = np.array([[k.encode() for k in bag] for bag in keys] if dtype == "S" else keys,
                      dtype=dtype)
    batch, bounds = to_jagged(values)
    expected, expected_bounds = to_jagged(keys)
    assert np.array_equal(batch.ids, expected.ids)
    assert bounds.tolist() == expected_bounds.tolist() == [0, 2, 4, 6]
    assert batch.kind == "str" and list(batch.strings) == values.reshape(-1).tolist()


@pytest.mark.parametrize("values, match", [
    ([["red", "shoe"], "hat"], r"bag 1 is 'hat' \(str\), not a list of keys"),  # not 3 bags
    ([[1, 2], 3], r"bag 1 is 3 \(int\), not a list of keys.*\[key\] for one"),
    ([[1], None, [2]], r"bag 1 is None \(NoneType\).*\[\] for none"),
    (np.array([[1], [2, 3]], dtype=object), r"1-D ndarray without offsets.*values.tolist\(\)"),
    (torch.ones(2, 2, 2, dtype=torch.long), "got 3-D Tensor without offsets"),
])
def test_bags_beside_something_else_name_it(values, match):
    """A stray key among bags (or an object array of bags, as a pandas column holds them)
    got only "bags must be given as a list of lists", naming neither the bag nor the fix."""
    jag_raises(KeyInputError, match, values)
