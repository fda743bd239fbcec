"""User input -> int64 id arrays.

Accepted keys: a torch integer tensor, a numpy integer/str/bytes/object array, or a list or
tuple of Python ``int``, ``str`` or ``bytes``. Strings hash to ids (see
:mod:`dynembed.keys.hashing`); integers are ids already. Jagged input for bags is
``(values, offsets)`` as in ``torch.nn.EmbeddingBag``, a list of lists, or a 2-D array.
Conversion is done by numpy/torch C code and compiled kernels, never a per-key Python loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dynembed.errors import DynembedError, KeyInputError, KeyValueError
from dynembed.keys.hashing import DEFAULT_HASH_SEED, hash_bytes, hash_strings

INT_KEYS = "int"
STR_KEYS = "str"
NO_KEYS = "empty"

_INT64_MAX = np.iinfo(np.int64).max
_ACCEPTED = ("a torch integer tensor, a numpy int/str/bytes array, or a list of int, "
             "str or bytes (or a (B, L) list of such lists)")


@dataclass(frozen=True)
class KeyBatch:
    """Keys turned into ids.

    Attributes:
        ids: (n,) int64 ids, flattened.
        shape: shape of the keys as given (an N-D tensor keeps its shape for the output).
        kind: ``"int"``, ``"str"`` (str or bytes keys) or ``"empty"``.
        strings: the original str/bytes keys in id order when kind is ``"str"``, else None.
    """

    ids: np.ndarray
    shape: tuple[int, ...]
    kind: str
    strings: Sequence | None = None


def _empty(shape: tuple[int, ...] = (0,)) -> KeyBatch:
    return KeyBatch(np.empty(0, dtype=np.int64), shape, NO_KEYS)


def _check_int_array(arr: np.ndarray, arg: str) -> np.ndarray:
    kind = arr.dtype.kind
    if kind == "b":
        raise KeyInputError(f"{arg}: got bool keys; keys must be int64 ids, str or bytes. "
                            "Convert flags to ints first if they are really ids.")
    if kind in "fc":
        raise KeyInputError(f"{arg}: got {arr.dtype} (floating point) keys; keys must be "
                            "int64 ids, str or bytes. Cast to int64 if the values are ids "
                            "(e.g. tensor.long()).")
    if kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > _INT64_MAX:
        raise KeyValueError(f"{arg}: a uint64 key exceeds the int64 range; keys must lie in "
                            "[-2**63, 2**63 - 1]. Reinterpret with arr.view(np.int64) if the "
                            "values are hashes.")
    if kind not in "iu":
        raise KeyInputError(f"{arg}: unsupported key dtype {arr.dtype}; expected {_ACCEPTED}")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)


_OUT_OF_RANGE = ("an int key is outside the int64 range [-2**63, 2**63 - 1]; hash larger "
                 "numbers, or pass them as str")


def _describe_mixed(seq: Sequence, first: type, arg: str) -> DynembedError:
    """Error for a list whose elements are not all of the first element's key type."""
    families = ((str,), (bytes, bytearray), (int, np.integer))
    allowed = next((f for f in families if issubclass(first, f)), (first,))
    for i, x in enumerate(seq):  # error path only
        if x is None:
            return KeyInputError(f"{arg}: item {i} is None; None is not a key. Drop missing "
                                 "values or map them to a sentinel key such as '<missing>'.")
        if isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 0:
            return KeyInputError(f"{arg}: item {i} is a 0-d {type(x).__name__}; pass the keys "
                                 "as one tensor or array (torch.stack(items)), or as plain "
                                 "ints (item.item())")
        if isinstance(x, (list, tuple, np.ndarray, torch.Tensor)):
            return KeyInputError(f"{arg}: item {i} is a {type(x).__name__}; nesting is deeper "
                                 "than allowed here. Pass a flat sequence of keys or a (B, L) "
                                 "list of equal-length lists, or use DynamicEmbeddingBag / "
                                 "(values, offsets) for bags of keys.")
        if isinstance(x, (float, np.floating)):
            return KeyInputError(f"{arg}: item {i} is the float {x!r}; keys must be int64 ids, "
                                 "str or bytes.")
        if isinstance(x, (bool, np.bool_)):
            return KeyInputError(f"{arg}: item {i} is the bool {x!r}; keys must be int64 ids, "
                                 "str or bytes. Convert flags to ints first if they are ids.")
        if (isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
                and not -2**63 <= int(x) <= _INT64_MAX):
            return KeyValueError(f"{arg}: item {i}: {_OUT_OF_RANGE}.")
        if not isinstance(x, allowed):
            return KeyInputError(
                f"{arg}: mixed key types: item 0 is {first.__name__} but item {i} is "
                f"{type(x).__name__}. A batch must be all str, all bytes, or all int ids; "
                "convert them to one type (e.g. str(x) for every key).")
    return KeyInputError(f"{arg}: keys could not be converted; expected {_ACCEPTED}")


def _from_list(seq: Sequence, arg: str, hash_seed: int) -> KeyBatch:
    n = len(seq)
    if n == 0:
        return _empty()
    first = type(seq[0])
    try:
        if issubclass(first, str):
            return KeyBatch(hash_strings(seq, hash_seed), (n,), STR_KEYS, seq)
        if issubclass(first, (bytes, bytearray)):
            return KeyBatch(hash_bytes(seq, hash_seed), (n,), STR_KEYS, seq)
    except TypeError:
        raise _describe_mixed(seq, first, arg) from None
    if not issubclass(first, (int, np.integer)) or issubclass(first, bool):
        raise _describe_mixed(seq, first, arg)
    try:
        arr = np.array(seq)
    except (ValueError, OverflowError, TypeError):
        raise _describe_mixed(seq, first, arg) from None
    # numpy turns True into 1 when ints come first: look for bools explicitly (C-level scan).
    if arr.ndim != 1 or not {bool, np.bool_}.isdisjoint(map(type, seq)):
        raise _describe_mixed(seq, first, arg)
    if arr.dtype.kind == "f" and all(isinstance(x, (int, np.integer)) for x in seq):
        # numpy has no dtype for uint64 beside negative ints and chose float64: go by value
        try:
            arr = np.array([int(x) for x in seq], dtype=np.int64)
        except OverflowError:
            raise _describe_mixed(seq, first, arg) from None
    if arr.dtype.kind not in "iu" or (arr.dtype == np.uint64 and arr.max() > _INT64_MAX):
        raise _describe_mixed(seq, first, arg)  # names the item
    return KeyBatch(_check_int_array(arr, arg), (n,), INT_KEYS)


def _reshaped(flat: KeyBatch, shape: tuple[int, ...]) -> KeyBatch:
    return KeyBatch(flat.ids, tuple(shape), flat.kind, flat.strings)


def _from_rows(rows: Sequence, arg: str, hash_seed: int) -> KeyBatch:
    """A (B, L) batch given as B lists of L keys each (e.g. padded token sequences)."""
    rows_are_lists = all(issubclass(t, (list, tuple)) for t in set(map(type, rows)))
    lengths = set(map(len, rows)) if rows_are_lists else None
    if lengths is None or len(lengths) > 1:
        shown = [len(r) if isinstance(r, (list, tuple)) else type(r).__name__
                 for r in rows[:8]]  # error path only
        raise KeyInputError(
            f"{arg}: a nested list must be (B, L): B lists of keys, all of one length L; got "
            f"rows of {shown}{' ...' if len(rows) > 8 else ''}. Pad the rows (padding_key= "
            "names the pad), or use DynamicEmbeddingBag / (values, offsets) for bags of "
            "keys of different lengths.")
    flat = _from_list(list(itertools.chain.from_iterable(rows)),
                      f"{arg} (flattened row by row)", hash_seed)
    return _reshaped(flat, (len(rows), lengths.pop()))


def to_key_batch(keys, *, hash_seed: int = DEFAULT_HASH_SEED, arg: str = "keys") -> KeyBatch:
    """Converts one batch of keys to ids.

    Args:
        keys: a torch integer tensor or a numpy array of any shape, a flat list/tuple of
            int, str or bytes, or a (B, L) list of B such lists of one length L.
        hash_seed: seed of the string hash.
        arg: the argument name used in error messages.

    Returns:
        The :class:`KeyBatch`.

    Raises:
        KeyInputError (a TypeError): float, bool, None, mixed str and int, nested lists that
            are not (B, L), or an unsupported container.
        KeyValueError (a ValueError): an integer outside the int64 range.
    """
    if isinstance(keys, torch.Tensor):
        if keys.is_nested:
            raise KeyInputError(f"{arg}: got a nested tensor; give bags of keys as a list of "
                                "tensors (DynamicEmbeddingBag, a pooled feature), or flat keys "
                                "as a dense tensor")
        if keys.layout != torch.strided:
            raise KeyInputError(f"{arg}: got a {keys.layout} tensor; keys must be a dense "
                                "integer tensor (e.g. sparse.values() or .to_dense()).")
        if keys.device.type == "meta":
            raise KeyInputError(f"{arg}: got a tensor on the meta device, which holds no "
                                "values; pass the keys on the cpu (or another real device).")
        if keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
            raise KeyInputError(f"{arg}: got a {keys.dtype} tensor; keys must be an integer "
                                "tensor (int64 ids), or str/bytes. Use tensor.long() if the "
                                "values are ids.")
        shape = tuple(keys.shape)
        if keys.dtype == torch.uint64:  # numpy's check catches values above int64's range
            ids = _check_int_array(keys.detach().cpu().numpy(), arg)
        else:
            ids = keys.detach().to("cpu", torch.int64).contiguous().reshape(-1).numpy()
        return KeyBatch(ids, shape, INT_KEYS if ids.size else NO_KEYS)
    if isinstance(keys, np.ma.MaskedArray):  # its masked entries are missing values
        if np.ma.getmaskarray(keys).any():
            raise KeyInputError(f"{arg}: a masked array with {int(keys.mask.sum())} masked "
                                "(missing) keys; drop them or fill them with real keys "
                                "first (e.g. keys.compressed())")
        keys = np.asarray(keys.data)
    if isinstance(keys, np.generic) and not isinstance(keys, (str, bytes)):
        keys = np.asarray(keys)  # a numpy scalar (np.int64(3)) reads as the 0-d array does
    if isinstance(keys, np.ndarray):
        if keys.dtype.kind in "USO":  # any shape, as int keys: the output keeps it
            if keys.dtype.kind == "O" and keys.size \
                    and isinstance(keys.flat[0], (list, tuple, np.ndarray, torch.Tensor)):
                raise KeyInputError(f"{arg}: an object array of {type(keys.flat[0]).__name__}s "
                                    "(e.g. a pandas column of lists); pass keys.tolist(), a "
                                    "(B, L) list of equal-length lists")
            flat = _from_list(keys.reshape(-1).tolist(), arg, hash_seed)
            return flat if keys.ndim == 1 else _reshaped(flat, keys.shape)
        ids = _check_int_array(keys, arg)
        return KeyBatch(ids, tuple(keys.shape), INT_KEYS if ids.size else NO_KEYS)
    if isinstance(keys, (str, bytes, bytearray)):
        raise KeyInputError(f"{arg}: got a single {type(keys).__name__}; pass a list of keys, "
                            f"e.g. [{keys!r}].")
    if isinstance(keys, (list, tuple)):
        if keys and isinstance(keys[0], (list, tuple)):
            return _from_rows(keys, arg, hash_seed)
        return _from_list(keys, arg, hash_seed)
    if hasattr(keys, "to_numpy"):  # pandas Series / Index
        missing = keys.isna() if hasattr(keys, "isna") else None
        if missing is not None and bool(np.asarray(missing).any()):
            raise KeyInputError(f"{arg}: {int(np.asarray(missing).sum())} missing values "
                                "(NA/NaN/None) among the keys; drop them (.dropna()) or fill "
                                "them with real keys first")
        return to_key_batch(np.asarray(keys.to_numpy()), hash_seed=hash_seed, arg=arg)
    raise KeyInputError(f"{arg}: unsupported key container {type(keys).__name__}; "
                        f"expected {_ACCEPTED}")


def _offsets_array(offsets, arg: str) -> np.ndarray:
    if isinstance(offsets, torch.Tensor):
        if offsets.device.type == "meta":
            raise KeyInputError(f"{arg}: got offsets on the meta device, which hold no "
                                "values; pass the offsets on the cpu (or another real device).")
        if offsets.dtype.is_floating_point or offsets.dtype.is_complex \
                or offsets.dtype == torch.bool:
            raise KeyInputError(f"{arg}: offsets must be integers, got {offsets.dtype}")
        arr = offsets.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(offsets)
        if arr.size and arr.dtype.kind not in "iu":
            raise KeyInputError(f"{arg}: offsets must be integers, got {arr.dtype}")
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise KeyValueError(f"{arg}: offsets must be positions into the values, got "
                                f"{int(arr.max())}")
        arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise KeyValueError(f"{arg}: offsets must be 1-D, got shape {tuple(arr.shape)}")
    return arr


def validate_offsets(offsets, n: int, *, include_last_offset: bool = False,
                     arg: str = "offsets") -> np.ndarray:
    """Checks bag offsets against ``n`` values and returns the (B + 1,) int64 boundaries.

    Args:
        offsets: (B,) start of each bag, or (B + 1,) with ``include_last_offset``.
        n: number of values.
        include_last_offset: whether the last entry is the end of the last bag.
        arg: the argument name used in error messages.

    Raises:
        KeyValueError: offsets that are not 1-D, do not start at 0, decrease, or point past
            the values.
    """
    arr = _offsets_array(offsets, arg)
    if include_last_offset:
        if arr.size == 0:
            raise KeyValueError(f"{arg}: with include_last_offset=True offsets needs at least "
                                "one entry (the end)")
        if arr[-1] != n:
            raise KeyValueError(f"{arg}: with include_last_offset=True the last offset must "
                                f"equal the number of values ({n}), got {int(arr[-1])}")
        bounds = arr
    else:
        if arr.size == 0 and n:
            raise KeyValueError(f"{arg}: offsets is empty but there are {n} values, which "
                                "would belong to no bag; give one offset per bag, starting "
                                "with 0")
        bounds = np.append(arr, n)
    if bounds[0] != 0:
        raise KeyValueError(f"{arg}: the first offset must be 0 (the first bag starts at the "
                            f"first value), got {int(bounds[0])}")
    if arr.size and arr.max() > n:
        bad = int(np.argmax(arr > n))
        raise KeyValueError(f"{arg}: entry {bad} ({int(arr[bad])}) points past the end of "
                            f"the values ({n}); offsets are positions into the values")
    steps = np.diff(bounds)
    if steps.size and steps.min() < 0:
        bad = int(np.argmax(steps < 0))
        raise KeyValueError(f"{arg}: offsets must be non-decreasing and at most the number of "
                            f"values ({n}); entry {bad + 1} ({int(bounds[bad + 1])}) is "
                            f"smaller than entry {bad} ({int(bounds[bad])})")
    return bounds


def _check_array_bags(bags, arg: str) -> None:
    """Raises unless every array or tensor bag is 1-D and not bool (torch.cat would flatten
    a 2-D bag into the next bags' keys, and promote bools among int bags to ids)."""
    for i, bag in enumerate(bags):
        if isinstance(bag, (np.ndarray, torch.Tensor)):
            if bag.ndim != 1:
                raise KeyValueError(
                    f"{arg}: bag {i} is a {bag.ndim}-D {type(bag).__name__} of shape "
                    f"{tuple(bag.shape)}; each bag must be 1-D (one sample's keys). Flatten "
                    "it, or pass a 2-D tensor as the whole batch for fixed-size bags")
            if bag.dtype in (torch.bool, np.bool_):
                raise KeyInputError(f"{arg}: bag {i} holds bools; keys must be integers "
                                    "(int64 ids) or str/bytes. Use .long() if they are ids")


def is_values_offsets(value, arg: str) -> bool:
    """Whether bags given as ``value`` (a pooled feature's input, labels) are
    ``(values, offsets)`` rather than a sequence of bags.

    A tuple of two is ``(values, offsets)`` when its second part can be offsets: a tensor or
    array, or a non-empty flat list of ints. Reading ``(values, [0, 2])`` as two bags once
    trained the offsets as keys. Two flat int lists could be either (``zip(*samples)`` gives
    two bags) and are refused.
    """
    if not (isinstance(value, tuple) and len(value) == 2):
        return False
    values, offsets = value
    if isinstance(offsets, (torch.Tensor, np.ndarray)):
        return True
    if not (isinstance(offsets, (list, tuple)) and offsets
            and _only(offsets, (int, np.integer))):
        return False  # an empty bag, or a bag of strings or lists: bags
    if isinstance(values, (list, tuple)) and _only(values, (int, np.integer)):
        raise KeyInputError(f"{arg}: a tuple of two flat int lists is ambiguous: (values, "
                            "offsets) or two bags? Give offsets as a tensor, e.g. (values, "
                            "torch.tensor(offsets)), or the bags as a list of lists")
    return True


def _only(items, kinds) -> bool:
    """Whether every item is one of ``kinds`` (bools excluded); a C-level scan of types."""
    types = set(map(type, items))
    return all(issubclass(t, kinds) and not issubclass(t, (bool, np.bool_)) for t in types)


def to_jagged(values, offsets=None, *, include_last_offset: bool = False,
              hash_seed: int = DEFAULT_HASH_SEED, arg: str = "values") -> tuple[KeyBatch, np.ndarray]:
    """Converts bags of keys to flat ids and bag boundaries.

    Args:
        values: flat keys with ``offsets``; or a list of lists (bags); or a 2-D integer
            tensor/array, or a 2-D str/bytes/object array, (B, L) of fixed-size bags.
        offsets: (B,) starts of bags (or (B + 1,) with ``include_last_offset``), only with
            flat values.
        include_last_offset: as in ``torch.nn.EmbeddingBag``.
        hash_seed: seed of the string hash.
        arg: the argument name used in error messages.

    Returns:
        (keys, bounds): the flat :class:`KeyBatch` and (B + 1,) int64 bag boundaries.

    Raises:
        KeyInputError, KeyValueError: as :func:`to_key_batch`, plus offsets that do not match
            the values, ``include_last_offset`` without offsets, and nesting deeper than a
            list of lists.
        TypeError: ``include_last_offset`` is not a bool.
    """
    if not isinstance(include_last_offset, bool):
        raise TypeError(f"include_last_offset must be True or False, got "
                        f"{include_last_offset!r}")
    if offsets is None and include_last_offset:
        raise KeyInputError(f"{arg}: include_last_offset=True describes offsets, but none "
                            "were given (bags as a list of lists or a 2-D tensor carry their "
                            "own bounds); drop it, or give flat values with offsets")
    if offsets is not None:
        if isinstance(values, (list, tuple)) and values and any(
                issubclass(t, (list, tuple)) for t in set(map(type, values))):
            raise KeyInputError(f"{arg}: bags given as a list of lists carry their own "
                                "bounds; drop offsets=, or give flat values with offsets")
        batch = to_key_batch(values, hash_seed=hash_seed, arg=arg)
        if len(batch.shape) != 1:
            raise KeyValueError(f"{arg}: with offsets, values must be 1-D, got shape "
                                f"{batch.shape}")
        return batch, validate_offsets(offsets, batch.ids.size,
                                       include_last_offset=include_last_offset,
                                       arg="offsets" if arg == "values" else f"{arg} offsets")
    if isinstance(values, (torch.Tensor, np.ndarray)) and values.ndim == 2:
        rows, width = values.shape
        if isinstance(values, np.ndarray) and values.dtype.kind in "USO":
            values = values.reshape(-1)  # string keys convert as a flat 1-D array
        batch = to_key_batch(values, hash_seed=hash_seed, arg=arg)
        return batch, np.arange(rows + 1, dtype=np.int64) * width
    if isinstance(values, (list, tuple)):
        bag_types = set(map(type, values))  # C-level scan; the checks below see each type once
        kinds = (list, tuple, np.ndarray, torch.Tensor)
        if not all(issubclass(t, kinds) for t in bag_types):
            if any(issubclass(t, kinds) for t in bag_types):  # bags beside a stray: name it
                i = next(i for i, v in enumerate(values) if not isinstance(v, kinds))
                shown = repr(values[i])
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise KeyInputError(f"{arg}: bag {i} is {shown} ({type(values[i]).__name__}), "
                                    "not a list of keys; every bag must be a list (or 1-D "
                                    "tensor) of one sample's keys, e.g. [] for none or [key] "
                                    "for one")
            raise KeyInputError(f"{arg}: without offsets, bags must be given as a list of "
                                "lists (one list of keys per sample), a 2-D tensor, or flat "
                                "values with offsets=.")
        if any(issubclass(t, (np.ndarray, torch.Tensor)) for t in bag_types):
            _check_array_bags(values, arg)
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        bounds = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        if bag_types and all(issubclass(t, torch.Tensor) for t in bag_types):
            # one dtype first: torch.cat cannot promote int64 with uint32/uint64
            dtypes = {v.dtype for v in values}
            if len(dtypes) > 1:
                for i, v in enumerate(values):  # an empty bag's dtype says nothing
                    if v.numel() and (v.dtype.is_floating_point or v.dtype.is_complex
                                      or v.dtype == torch.bool):
                        raise KeyInputError(f"{arg}: bag {i} is a {v.dtype} tensor; keys must "
                                            "be integers (int64 ids) or str/bytes")
            same = values if len(dtypes) == 1 else [
                v if v.dtype == torch.uint64 else v.to(torch.int64) for v in values]
            if len({v.dtype for v in same}) > 1:  # uint64 beside others: check the range
                same = [torch.from_numpy(_check_int_array(v.detach().cpu().numpy(), arg))
                        for v in same]
            flat = torch.cat(same) if lengths.sum() else []
        else:  # lists beside arrays or tensors: the arrays' keys as Python ints too (a 0-d
            # tensor first made the batch read as nested, whatever came after)
            flat = list(itertools.chain.from_iterable(
                v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v
                for v in values))
        if isinstance(flat, list):  # a bag is flat: a list inside one is nesting too deep
            return _from_list(flat, arg, hash_seed), bounds
        return to_key_batch(flat, hash_seed=hash_seed, arg=arg), bounds
    got, hint = type(values).__name__, ""
    if isinstance(values, (np.ndarray, torch.Tensor)):
        got = f"{values.ndim}-D {got}"
        if values.dtype == object and values.ndim == 1:
            hint = " (an object array of bags, e.g. a pandas column: pass values.tolist())"
    raise KeyInputError(f"{arg}: bags need offsets=, a list of lists, or a 2-D tensor; got "
                        f"{got} without offsets{hint}")
