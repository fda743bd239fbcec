"""Handlers: from request examples to predictions, for one loaded model package.

An *example* is a JSON object of feature -> value: one key (str or int) for an unpooled
feature, a list of keys for a pooled one. The built-in handler checks every example against
the manifest (so a bad request fails alone, before it joins a batch), looks the features of
a whole batch up in the read-only tables (unseen keys get the default vector and are
counted, never inserted), runs the exported dense program and applies the output transform.

A package may name a custom handler (``custom:<file>.py:<Class>``); it runs only where the
operator allowed it for that model name (``dynembed serve --allow-custom-handler NAME``).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import logging
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from dynembed.errors import CheckpointCorruptError, DynembedError
from dynembed.nn.collection import EmbeddingCollection
from dynembed.serving import dense_source
from dynembed.serving.package import (
    BUILTIN_HANDLER,
    Package,
    PackageError,
    build_embeddings,
    load_tables,
)
from dynembed.table.stats import Counters

logger = logging.getLogger(__name__)


class _Served:
    """What answers a batch, swapped as one: tables and dense program of one checkpoint.

    Attributes:
        embeddings: the tables.
        dense: the dense program.
        dense64: the dense program in float64 (None: it runs in float32, and a prediction
            may differ in its last bit with the batch it joined).
    """

    __slots__ = ("__weakref__", "dense", "dense64", "embeddings")  # weakref: see DenseCopies

    def __init__(self, embeddings: EmbeddingCollection, dense: torch.nn.Module,
                 dense64: torch.nn.Module | None) -> None:
        self.embeddings, self.dense, self.dense64 = embeddings, dense, dense64

_TABLE_COUNTERS = ("hits", "misses", "defaults_served", "loaded")
"""The table counters the handler reports (see :meth:`EmbeddingModelHandler.table_stats`)."""


class InputError(DynembedError, ValueError):
    """A request's inputs do not fit the model (HTTP 400); the message says what and where."""


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_WEIGHTED_FIELDS = frozenset(("keys", "weights"))


def _finite_weights(weights) -> bool:
    """Whether ``weights`` is a list of numbers (not bools) that stay finite as float32,
    checked in C (this runs on the event loop for every request): a JSON ``1e39``, or an
    integer of 400 digits, became an inf weight and an inf or NaN prediction."""
    if type(weights) is not list or not set(map(type, weights)) <= {int, float}:
        return False
    try:
        values = np.array(weights, dtype=np.float64)
    except OverflowError:  # an int beyond float64
        return False
    return bool((np.abs(values) <= _FLOAT32_MAX).all())  # NaN compares False


def _check_weighted(value, where: str) -> list:
    """Checks a weighted feature's ``{"keys": [...], "weights": [...]}``; returns its keys
    (for the caller's key checks).

    Raises:
        InputError: not such an object, weights that are not finite numbers, or not one
            weight per key.
    """
    if not isinstance(value, dict) or value.keys() != _WEIGHTED_FIELDS:
        raise InputError(f"{where} is weighted: give {{\"keys\": [...], \"weights\": [...]}}, "
                         f"one weight per key, got {value!r}")
    keys, weights = value["keys"], value["weights"]
    if not _finite_weights(weights):
        raise InputError(f"{where}: weights must be a list of finite numbers (within "
                         f"float32's range), got {weights!r}")
    if isinstance(keys, list) and len(keys) != len(weights):
        raise InputError(f"{where}: {len(keys)} keys but {len(weights)} weights; give one "
                         "weight per key")
    return keys


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_key(value, kind: str, where: str) -> None:
    if kind == "int64":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where} must be an int64 key, got {value!r}")
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InputError(f"{where} must be an int64 key, got {value}, outside the int64 "
                             "range [-2**63, 2**63 - 1]")
    elif not isinstance(value, str):
        hint = ("; the package declares this feature's keys as strings (export_package's "
                "default): a model trained on int ids is exported with feature_types="
                "{feature: 'int64'}") if isinstance(value, int) else ""
        raise InputError(f"{where} must be a string key, got {value!r}{hint}")


def _float64_copy(dense, input_dim: int):
    """A float64 copy of the dense program, or None where it does not run in float64.

    float32 matrix products round differently for different batch sizes (the kernels block
    the batch dimension differently), so an example's prediction would depend on the batch
    it happened to join. Computing in float64 and rounding the result to float32 makes it
    independent of the batch (a float64 difference survives the rounding only at a float32
    rounding boundary).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense64 = copy.deepcopy(dense).double()
        x = torch.linspace(-1, 1, 3 * input_dim).reshape(3, input_dim)
        with torch.no_grad():
            y32, y64 = dense(x), dense64(x.double())
        if y64.dtype != torch.float64 or not torch.allclose(y64.float(), y32, rtol=1e-4,
                                                            atol=1e-5):
            return None
        return dense64
    except Exception:  # noqa: BLE001 - a program with fixed dtypes inside: stay float32
        return None


def check_input_dim(manifest: dict) -> None:
    """Checks that a package's ``dense.input_dim`` is the total width of its features'
    tables: the width of the rows the built-in handler concatenates for the dense program.

    It needs the manifest only (as :func:`~dynembed.serving.package.read_manifest` checked
    it), so a registration checks it before loading anything, and an asynchronous one
    refuses such a package instead of answering 202 and only logging the failure.

    Raises:
        PackageError: the widths differ, or a table's ``dim`` is missing or not an integer.
    """
    name, tables = manifest["model"]["name"], manifest["tables"]
    try:
        widths = {f: int(tables[spec["table"]]["dim"])
                  for f, spec in manifest["features"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise PackageError(f"package {name!r}: a table of its manifest has no integer dim "
                           f"({type(e).__name__}: {e}); re-export the package (dynembed "
                           "export)") from None
    width, input_dim = sum(widths.values()), int(manifest["dense"]["input_dim"])
    if input_dim != width:
        raise PackageError(f"package {name!r}: dense.input_dim is {input_dim} but its "
                           f"features' rows are {width} wide together ({widths}); re-export "
                           "the package (dynembed export) or correct dense.input_dim")


def check_dense(package: Package) -> None:
    """Checks that the package's dense program takes what the built-in handler feeds it and
    answers the shape its manifest declares: :func:`check_input_dim`, then one run on a zero
    input (2 examples).

    Without this a package whose program does not fit its manifest (a hand-edited manifest,
    a ``dense.pt2`` from another export) registers fine and then fails every prediction.

    Raises:
        PackageError: ``dense.input_dim`` is not the features' total width, the program
            does not run on a ``(2, input_dim)`` input, or its output is not
            ``(2, *dense.output_shape)``.
    """
    # again here, not only in Registry.reserve: a handler is also made from a package opened
    # directly (open_package), and a manifest may be rewritten between reservation and load
    check_input_dim(package.manifest)
    dense = package.manifest["dense"]
    input_dim = int(dense["input_dim"])
    expected = [2, *dense["output_shape"]]
    try:
        with torch.no_grad():
            y = package.dense(torch.zeros(2, input_dim))
    except Exception as e:  # noqa: BLE001 - whatever the program raises: it does not fit
        raise PackageError(f"package {package.name!r}: its dense program does not run on the "
                           f"(batch, {input_dim}) input its manifest declares "
                           f"(dense.input_dim): {type(e).__name__}: {e}; re-export the "
                           "package with the dense module trained on these features") from None
    if not isinstance(y, torch.Tensor) or list(y.shape) != expected:
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise PackageError(f"package {package.name!r}: its dense program answers {got} for 2 "
                           f"examples, but its manifest declares dense.output_shape "
                           f"{dense['output_shape']} (so {expected}); re-export the package")


class EmbeddingModelHandler:
    """The built-in handler: ``output(dense(embeddings(features, concat=True)))``.

    Args:
        package: the loaded package.

    Raises:
        PackageError: its dense program does not fit its manifest (see
            :func:`check_dense`).
    """

    def __init__(self, package: Package) -> None:
        check_dense(package)
        self.package = package
        self.features = package.manifest["features"]
        self._names = frozenset(self.features)
        self._key_types = [(name, spec["pooling"] is not None,
                            int if spec["type"] == "int64" else str, spec["weighted"])
                           for name, spec in self.features.items()]
        self._weighted = [name for name, spec in self.features.items() if spec["weighted"]]
        self.transform = package.manifest["output"]["transform"]
        self._swap = threading.Lock()
        self._retired: dict[str, dict[str, int]] = {}  # totals of tables swapped out ...
        self._retiring: dict[str, Counters] = {}  # ... but the last ones', still counting
        self.refreshes = 0
        self._dense_names = package.manifest["dense"].get(dense_source.FIELD)
        """Where the dense weights live in the training model (None: not recorded, and a
        refresh changes the tables only)."""
        input_dim = int(package.manifest["dense"]["input_dim"])
        self._served = _Served(package.embeddings, package.dense,
                               _float64_copy(package.dense, input_dim))
        """What answers now; :meth:`refresh` swaps in a newer one between batches."""
        self._dense_copies = dense_source.DenseCopies(
            package.dense, float64=self._served.dense64 is not None)
        self._previous: _Served | None = None
        """What the last refresh replaced, served again if its tables turn out damaged (see
        :meth:`predict`)."""
        self.fallbacks = 0
        """Times a refreshed checkpoint turned out damaged and the tables before it were
        served again."""

    @property
    def embeddings(self) -> EmbeddingCollection:
        """The live tables."""
        return self._served.embeddings

    @property
    def follows_dense(self) -> bool:
        """Whether :meth:`refresh` serves the checkpoint's dense weights too (the package
        was exported with the training model), not only its tables."""
        return bool(self._dense_names)

    def validate(self, examples) -> list[dict]:
        """Checks a request's examples; returns them as a list.

        Raises:
            InputError: not a list of objects, a missing or unknown feature, a key of the
                wrong type (named by example index and feature).
        """
        if isinstance(examples, dict):
            examples = [examples]
        if not isinstance(examples, list) or not examples:
            raise InputError("the request must be a JSON object of feature -> keys, or a "
                             "non-empty list of them")
        for i, example in enumerate(examples):
            if not self._plainly_valid(example):
                self._check(i, example)  # raises, naming the example and feature
        return examples

    def _plainly_valid(self, example) -> bool:
        """True for an example of exactly the features, string keys where strings are
        expected, lists where pooled and one finite weight per key where weighted (the
        common case, checked in C without per-feature messages: this runs on the event loop
        for every request)."""
        if type(example) is not dict or example.keys() != self._names:
            return False
        for name, pooled, key_type, weighted in self._key_types:
            keys = example[name]
            if weighted:
                if type(keys) is not dict or keys.keys() != _WEIGHTED_FIELDS:
                    return False
                keys, weights = keys["keys"], keys["weights"]
                if type(keys) is not list or not _finite_weights(weights) \
                        or len(weights) != len(keys):
                    return False
            if pooled:
                if type(keys) is not list or not set(map(type, keys)) <= {key_type}:
                    return False
                if key_type is int and keys and not (_INT64_MIN <= min(keys)
                                                     and max(keys) <= _INT64_MAX):
                    return False
            elif type(keys) is not key_type or (key_type is int
                                                and not _INT64_MIN <= keys <= _INT64_MAX):
                return False
        return True

    def _check(self, i: int, example) -> None:
        """Raises InputError for what is wrong with example ``i`` (if anything)."""
        if not isinstance(example, dict):
            raise InputError(f"example {i} must be a JSON object of feature -> keys, got "
                             f"{type(example).__name__}")
        missing = [f for f in self.features if f not in example]
        unknown = [f for f in example if f not in self.features]
        if missing or unknown:
            raise InputError(f"example {i}: missing features {missing}, unknown features "
                             f"{unknown}; the model takes {list(self.features)}")
        for name, spec in self.features.items():
            value, where = example[name], f"example {i}, feature {name!r}"
            if spec["pooling"] is None:
                _check_key(value, spec["type"], where)
            else:
                if spec["weighted"]:
                    value = _check_weighted(value, where)
                if not isinstance(value, list):
                    raise InputError(f"{where} is pooled: give a list of keys, got "
                                     f"{value!r}")
                for j, key in enumerate(value):
                    _check_key(key, spec["type"], f"{where}[{j}]")

    def _columns(self, examples: list[dict]) -> tuple[dict, dict | None]:
        """(feature -> keys of every example, feature -> (n,) float32 weights of every key
        of the weighted features, or None without any)."""
        columns = {}
        for name, spec in self.features.items():
            values = [e[name] for e in examples]
            if spec["pooling"] is None and spec["type"] == "int64":
                columns[name] = torch.from_numpy(np.array(values, dtype=np.int64))
            elif spec["weighted"]:
                columns[name] = [v["keys"] for v in values]
            else:
                columns[name] = values
        if not self._weighted:
            return columns, None
        weights = {name: torch.tensor(list(itertools.chain.from_iterable(
                       e[name]["weights"] for e in examples)), dtype=torch.float32)
                   for name in self._weighted}
        return columns, weights

    @torch.no_grad()
    def predict(self, examples: list[dict]) -> list:
        """Predictions for validated examples: one float (or list) per example, the same
        whatever batch the examples were run in (see :class:`_Served`)."""
        served = self._served  # one consistent model (tables, dense) for the whole batch
        columns, weights = self._columns(examples)
        try:
            x = served.embeddings(columns, concat=True, per_sample_weights=weights)
        except CheckpointCorruptError as e:
            served = self._fall_back(served, e)
            x = served.embeddings(columns, concat=True, per_sample_weights=weights)
        y = served.dense(x) if served.dense64 is None else served.dense64(x.double())
        if self.transform == "sigmoid":
            y = torch.sigmoid(y)
        elif self.transform == "softmax":
            y = torch.softmax(y, dim=-1)
        return y.float().tolist()

    def refresh(self, checkpoint: str | Path) -> None:
        """Serves the tables of a newer checkpoint (of the training job) from now on, and
        its dense weights where the package recorded where they are (:attr:`follows_dense`).

        The checkpoint is opened into new tables (lazily, or read into memory if the package
        was preloaded), which replace the live ones, with the dense program, in one
        assignment: a batch in flight finishes with the model it started with.

        Raises:
            CheckpointError: the checkpoint does not fit the package (nothing changes).
        """
        # the dense weights first: a checkpoint they do not fit is refused before a preload
        state = None if not self._dense_names else dense_source.dense_state_from_checkpoint(
            self.package.dense, self._dense_names, checkpoint)
        fresh = build_embeddings(self.package.manifest)
        load_tables(fresh, checkpoint, preload=self.package.preloaded)
        if state is None:
            served = _Served(fresh, self._served.dense, self._served.dense64)
        else:
            pair = self._dense_copies.take(state)
            served = _Served(fresh, *pair)
            self._dense_copies.release_when_unused(served, pair)
        with self._swap:
            # counters go on from here, never back to 0; the swapped-out tables' own stay
            # live until the next refresh, for the batches still running on them
            self._retired = self._sum(self._retired, self._retiring)
            self._retiring = {name: table.counters
                              for name, table in self.embeddings.tables.items()}
            # lazily opened tables are kept to fall back to (a preloaded refresh read every
            # block already, and keeping its tables would hold the rows twice)
            self._previous = None if self.package.preloaded else self._served
            self._served = served
            self.refreshes += 1

    def _fall_back(self, failed: _Served, error: Exception) -> _Served:
        """The model to run a batch on again after ``failed``'s tables raised ``error`` (a
        damaged block of the checkpoint they were opened from): the one the last refresh
        replaced, dense weights included.

        A lazily opened checkpoint checks each block when a lookup first reads it, so a
        damaged followed checkpoint once answered 500 to every request that touched the
        block, for as long as it was the newest. The follower does not apply it again;
        a newer checkpoint is applied as usual.

        Raises:
            CheckpointCorruptError: ``error``, when there are no tables to fall back to
                (the package's own checkpoint is damaged).
        """
        with self._swap:
            if self._served is failed:
                if self._previous is None:
                    raise error
                logger.error("the tables refreshed last read a damaged checkpoint (%s); "
                             "serving the model before them again", error)
                self._retiring = {name: table.counters  # they stop counting; the older
                                  for name, table in failed.embeddings.tables.items()}
                self._served, self._previous = self._previous, None
                self.fallbacks += 1
            return self._served

    def table_stats(self) -> dict:
        """Per table: lookups' hits, misses, default vectors served, rows loaded, since the
        handler was made (across refreshes; a batch that outlives two refreshes on
        swapped-out tables is counted up to the second)."""
        with self._swap:
            live = {name: table.counters for name, table in self.embeddings.tables.items()}
            return self._sum(self._sum(self._retired, self._retiring), live)

    @staticmethod
    def _sum(totals: dict[str, dict[str, int]], counters: dict[str, Counters]) -> dict:
        out = {name: dict(values) for name, values in totals.items()}
        for name, table_counters in counters.items():
            now = table_counters.snapshot()
            into = out.setdefault(name, dict.fromkeys(_TABLE_COUNTERS, 0))
            for k in _TABLE_COUNTERS:
                into[k] += getattr(now, k)
        return out


def make_handler(package: Package, *, allow_custom: bool):
    """The handler the package names.

    Raises:
        PackageError: a custom handler the operator did not allow, or a malformed one.
    """
    spec = package.handler
    if spec == BUILTIN_HANDLER:
        return EmbeddingModelHandler(package)
    if not spec.startswith("custom:"):
        raise PackageError(f"unknown handler {spec!r}; expected {BUILTIN_HANDLER!r} or "
                           "'custom:<file>.py:<Class>'")
    if not allow_custom:
        raise PackageError(f"package {package.name!r} asks for the custom handler {spec!r}, "
                           "which runs code from the package; the operator must allow it by "
                           "the package's name, whatever name it is served under (dynembed "
                           f"serve --allow-custom-handler {package.name})")
    try:
        _, file, cls_name = spec.split(":")
    except ValueError:
        raise PackageError(f"custom handler {spec!r} must be 'custom:<file>.py:<Class>'") \
            from None
    source = (package.path / file).resolve()
    if package.path.resolve() not in source.parents or not source.is_file():
        raise PackageError(f"custom handler file {file!r} is not a file inside the package")
    module_spec = importlib.util.spec_from_file_location(f"dynembed_handler_{package.name}",
                                                         source)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        handler = getattr(module, cls_name)(package)
    except Exception as e:  # noqa: BLE001 - the operator's handler code failed: say where
        raise PackageError(f"custom handler {spec!r} of model {package.name!r} failed to "
                           f"load: {type(e).__name__}: {e}") from None
    for method in ("validate", "predict"):
        if not callable(getattr(handler, method, None)):
            raise PackageError(f"custom handler {cls_name} has no {method}() method")
    return handler
