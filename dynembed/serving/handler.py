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

import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch

from dynembed.errors import DynembedError
from dynembed.serving.package import BUILTIN_HANDLER, Package, PackageError, load_tables


class InputError(DynembedError, ValueError):
    """A request's inputs do not fit the model (HTTP 400); the message says what and where."""


def _check_key(value, kind: str, where: str) -> None:
    if kind == "int64":
        if isinstance(value, bool) or not isinstance(value, int) or not \
                -(2**63) <= value < 2**63:
            raise InputError(f"{where} must be an int64 key, got {value!r}")
    elif not isinstance(value, str):
        raise InputError(f"{where} must be a string key, got {value!r}")


class EmbeddingModelHandler:
    """The built-in handler: ``output(dense(embeddings(features, concat=True)))``.

    Args:
        package: the loaded package.
    """

    def __init__(self, package: Package) -> None:
        self.package = package
        self.embeddings = package.embeddings
        """The live tables; :meth:`refresh` swaps in newer ones between batches."""
        self.features = package.manifest["features"]
        self.transform = package.manifest["output"]["transform"]
        self._swap = threading.Lock()
        self.refreshes = 0

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
                    if not isinstance(value, list):
                        raise InputError(f"{where} is pooled: give a list of keys, got "
                                         f"{value!r}")
                    for j, key in enumerate(value):
                        _check_key(key, spec["type"], f"{where}[{j}]")
        return examples

    def _columns(self, examples: list[dict]) -> dict:
        columns = {}
        for name, spec in self.features.items():
            values = [e[name] for e in examples]
            if spec["pooling"] is None and spec["type"] == "int64":
                columns[name] = torch.from_numpy(np.array(values, dtype=np.int64))
            else:
                columns[name] = values
        return columns

    @torch.no_grad()
    def predict(self, examples: list[dict]) -> list:
        """Predictions for validated examples: one float (or list) per example."""
        embeddings = self.embeddings  # one consistent set of tables for the whole batch
        x = embeddings(self._columns(examples), concat=True)
        y = self.package.dense(x)
        if self.transform == "sigmoid":
            y = torch.sigmoid(y)
        elif self.transform == "softmax":
            y = torch.softmax(y, dim=-1)
        return y.tolist()

    def refresh(self, checkpoint: str | Path) -> None:
        """Serves the tables of a newer checkpoint (of the training job) from now on.

        The checkpoint is opened lazily into new tables, which replace the live ones in one
        assignment: a batch in flight finishes with the tables it started with.
        """
        from dynembed.serving.package import build_embeddings

        fresh = build_embeddings(self.package.manifest)
        load_tables(fresh, checkpoint)
        with self._swap:
            self.embeddings = fresh
            self.refreshes += 1

    def table_stats(self) -> dict:
        """Per table: lookups' hits, misses, default vectors served, rows loaded."""
        out = {}
        for name, table in self.embeddings.tables.items():
            totals = table.stats().totals
            out[name] = {"hits": totals.hits, "misses": totals.misses,
                         "defaults_served": totals.defaults_served, "loaded": totals.loaded}
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
        raise PackageError(f"model {package.name!r} asks for the custom handler {spec!r}, "
                           "which runs code from the package; the operator must allow it "
                           f"(dynembed serve --allow-custom-handler {package.name})")
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
    module_spec.loader.exec_module(module)
    handler = getattr(module, cls_name)(package)
    for method in ("validate", "predict"):
        if not callable(getattr(handler, method, None)):
            raise PackageError(f"custom handler {cls_name} has no {method}() method")
    return handler
