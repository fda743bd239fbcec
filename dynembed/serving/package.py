"""Model packages: what ``dynembed export`` writes and the server loads.

A package is a directory::

    MANIFEST.json     name, version, features and their types, tables, handler, versions
    dense.pt2         the dense part of the model as a torch.export program
    tables/           the embedding tables as a dynembed checkpoint (opened lazily)

Loading a package parses JSON, loads the exported program with ``weights_only`` enforced
(torch would otherwise fall back to unpickling) and opens the checkpoint: nothing from the
package is unpickled or run. ``torch.export.load`` alone does not guarantee that: it
``eval``s the program's symbolic shape expressions (``sympy.sympify``), ``exec``s its input
guards and unpickles "opaque object" constants with plain ``pickle``. So the archive is
checked first (:func:`check_archive`): shape expressions and guards must be built from an
allowlist of tokens, and constants other than tensors are refused. Tables are rebuilt from
the manifest's plain fields; their optimizer comes from a fixed list of dynembed's optimizer
classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import threading
import time
import tokenize
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynembed import optim
from dynembed._args import check_int
from dynembed._version import __version__
from dynembed.checkpoint import manifest as checkpoint_manifest
from dynembed.checkpoint.api import checkpoint_path, load, save
from dynembed.errors import DynembedError
from dynembed.nn.collection import EmbeddingCollection, FeatureConfig
from dynembed.serving import dense_source
from dynembed.table.config import TableConfig
from dynembed.table.table import DynamicTable

MANIFEST = "MANIFEST.json"
FORMAT = "dynembed-model-package"
FORMAT_VERSION = 1
BUILTIN_HANDLER = "dynembed.embedding_model"
"""The built-in handler: features -> embedding collection -> dense program -> outputs."""
OUTPUTS = ("identity", "sigmoid", "softmax")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_OPTIMIZERS = {cls.__name__: cls for cls in (optim.SGD, optim.Adagrad, optim.RowWiseAdagrad,
                                             optim.Adam, optim.FTRL)}
_SAFE_LOAD = threading.Lock()


class PackageError(DynembedError, ValueError):
    """A model package is missing, malformed, or asks for something not allowed."""


def check_name(value: str, arg: str) -> str:
    """Returns ``value`` if it is a model name or version: letters, digits, ``_.-``."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{arg} must be 1-128 letters, digits, '_', '.' or '-' (not starting "
                         f"with a symbol), got {value!r}")
    return value


@dataclass(frozen=True)
class Package:
    """A loaded package: what the handler needs to answer requests."""

    path: Path
    manifest: dict
    embeddings: EmbeddingCollection
    dense: nn.Module
    preloaded: bool = False
    """The tables' rows were read into memory at load, not opened lazily."""

    @property
    def name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def version(self) -> str:
        return self.manifest["model"]["version"]

    @property
    def handler(self) -> str:
        return self.manifest["model"]["handler"]


_KIND_OF_TYPE = {"string": "str", "int64": "int"}


def _feature_types(embeddings: EmbeddingCollection, given: dict | None) -> dict[str, str]:
    """Each feature's key type: as given, else as the feature was looked up in this process
    (int keys: "int64"), else "string".

    Raises:
        ValueError: a type other than "string" or "int64", an unknown feature, or a type
            that contradicts the keys the feature was looked up with (requests would hash to
            other ids than training's, and every key would get the default vector).
    """
    if given is not None and not isinstance(given, dict):
        raise TypeError(f"feature_types must be a dict of feature -> 'string' or 'int64', "
                        f"e.g. {{'user': 'int64'}}, got {type(given).__name__}")
    types = dict(given or {})
    for name in embeddings.features:
        seen = embeddings.key_kinds.get(name, set())
        types.setdefault(name, "int64" if seen == {"int"} else "string")
        if types[name] not in ("string", "int64"):
            raise ValueError(f"feature_types[{name!r}] must be 'string' or 'int64', got "
                             f"{types[name]!r}")
        if seen and _KIND_OF_TYPE[types[name]] not in seen:
            raise ValueError(f"feature_types[{name!r}] is {types[name]!r}, but the feature was "
                             f"looked up with {'int' if seen == {'int'} else 'string'} keys; "
                             "requests would hash to other ids than training's and get "
                             "default vectors. Give the type it was trained with")
    unknown = sorted(set(types) - set(embeddings.features))
    if unknown:
        raise ValueError(f"feature_types names features the collection does not have: "
                         f"{unknown}")
    return types


def _table_entry(table: DynamicTable) -> dict:
    c = table.config
    opt = c.optimizer
    return {"dim": c.dim, "hash_seed": c.hash_seed, "default_value": c.default_value
            if isinstance(c.default_value, (int, float)) else list(c.default_value),
            "key_log": c.key_log, "padding_id": table.padding_id,
            "optimizer": None if opt is None else {"type": type(opt).__name__,
                                                   "fields": dataclasses.asdict(opt)}}


def export_package(path: str | os.PathLike, *, embeddings: EmbeddingCollection,
                   dense: nn.Module, name: str, version: str = "1.0",
                   feature_types: dict[str, str] | None = None, output: str = "identity",
                   description: str = "", example_batch: int = 4,
                   source_step: int | None = None, model: nn.Module | None = None) -> Path:
    """Writes a model package: the tables as a checkpoint, the dense part exported.

    The served model computes ``output(dense(embeddings(features, concat=True)))``: every
    feature is looked up (unpooled features take one key per example, pooled ones a list,
    and features declared ``weighted`` their keys and weights), the rows are concatenated
    in feature order into a (B, total_dim) tensor, and ``dense`` maps it to (B,) or (B, k).

    Args:
        path: the package directory to create (must not exist).
        embeddings: the trained collection (its tables are saved whole).
        dense: the dense module, traced by ``torch.export`` with a dynamic batch size.
        name, version: the model's name and version (letters, digits, ``_.-``).
        feature_types: feature -> "string" or "int64", for request validation and the
            Open Inference Protocol's metadata; default: the kind of keys the feature was
            looked up with in this process (int: "int64"), else "string".
        output: "identity", "sigmoid" or "softmax", applied to ``dense``'s output.
        description: free text kept in the manifest.
        example_batch: batch size of the example input used to trace ``dense`` (>= 2:
            ``torch.export`` makes a batch of 1 a constant).
        source_step: the training step of the checkpoint the tables come from (recorded:
            a server that follows the training job's checkpoints then moves only to newer
            ones, not back to an older one at startup); None: unknown.
        model: the whole trained model that ``dense``'s layers are part of. The package
            then records where each of ``dense``'s weights lives in it, and a server that
            follows the training job's checkpoints (``--follow``) serves each one's dense
            weights with its tables. None: the dense part stays as exported (and a followed
            checkpoint updates the tables only).

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists.
        ValueError, TypeError: a bad argument (named); ``dense`` does not export; a feature
            looked up with ``per_sample_weights`` that is not declared ``weighted``.
    """
    target = Path(path)
    check_name(name, "name")
    check_name(version, "version")
    if not isinstance(embeddings, EmbeddingCollection):
        raise TypeError(f"embeddings must be a de.EmbeddingCollection, got "
                        f"{type(embeddings).__name__}")
    if not isinstance(dense, nn.Module):
        raise TypeError(f"dense must be a torch.nn.Module, got {type(dense).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if source_step is not None:
        source_step = check_int("source_step", source_step, minimum=0)
    # torch.export specialises a batch of 1 (or 0) to a constant: the served model would
    # take no other batch size
    example_batch = check_int("example_batch", example_batch, minimum=2)
    if target.exists():
        raise FileExistsError(f"{target} exists; packages are never overwritten")
    types = _feature_types(embeddings, feature_types)
    unweighted = sorted(f for f in embeddings.weights_given
                        if not embeddings.features[f].weighted)
    if unweighted:  # served without their weights, the bags would be pooled unweighted
        raise ValueError(f"embeddings: features {unweighted} were looked up with "
                         "per_sample_weights but are not declared weighted, so the served "
                         "model would pool them unweighted; declare them FeatureConfig(..., "
                         "weighted=True), and requests give their weights")
    total_dim = sum(embeddings.tables[f.table].dim for f in embeddings.features.values())
    from_model = None
    if model is not None:
        from_model, unmatched = dense_source.dense_state_names(dense, model)
        if unmatched and not from_model:
            warnings.warn("dense shares no weight with model (a copy?), so a server "
                          "following the training job's checkpoints will serve dense as "
                          "exported under newer tables; pass the model's own modules as "
                          "dense", stacklevel=2)
        elif unmatched:
            warnings.warn(f"dense state {unmatched[:5]} is not model's own (built for "
                          "serving?): a followed checkpoint leaves it as exported",
                          stacklevel=2)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        was_training = dense.training
        dense.eval()
        example = torch.zeros(example_batch, total_dim)
        batch = torch.export.Dim("batch", min=1, max=1 << 24)
        try:
            program = torch.export.export(dense, (example,), dynamic_shapes=({0: batch},))
        except Exception as e:
            raise ValueError(f"dense could not be exported with torch.export (input "
                             f"(B, {total_dim})): {e}") from e
        finally:
            dense.train(was_training)
        out_shape = list(program.module()(example).shape[1:])
        torch.export.save(program, staging / "dense.pt2")
        save(staging / "tables", tables=dict(embeddings.tables))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {"name": name, "version": version, "handler": BUILTIN_HANDLER,
                      "description": description, "created": time.time(),
                      "created_with": {"dynembed": __version__,
                                       "torch": torch.__version__,
                                       "python": platform.python_version()}},
            "features": {fname: {"table": f.table, "pooling": f.pooling, "type": types[fname],
                                 "weighted": f.weighted}
                         for fname, f in embeddings.features.items()},
            "tables": {tname: _table_entry(t) for tname, t in embeddings.tables.items()},
            "dense": {"file": "dense.pt2", "input_dim": total_dim,
                      "output_shape": out_shape},
            "output": {"transform": output},
            "checkpoint": "tables"}
        if source_step is not None:
            manifest["source"] = {"step": source_step}
        if from_model:
            manifest["dense"][dense_source.FIELD] = from_model
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the package at ``path``, checked.

    Raises:
        PackageError: no package there, or a malformed manifest (named field).
    """
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise PackageError(f"{folder} is not a model package (no {MANIFEST}); write one "
                           "with `dynembed export` or de.serving.export_package") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{folder / MANIFEST} is not valid JSON: {e}") from None
    except OSError as e:  # not a readable file: a directory, a mode the server may not read
        raise PackageError(f"{folder / MANIFEST} cannot be read ({e.strerror}); make it a "
                           "file the server's user may read") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{folder / MANIFEST}: format must be {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{folder / MANIFEST}: format_version "
                           f"{manifest.get('format_version')!r} is not supported (this "
                           f"dynembed reads {FORMAT_VERSION})")
    try:
        check_name(manifest["model"]["name"], "model.name")
        check_name(manifest["model"]["version"], "model.version")
        if not isinstance(manifest["model"]["handler"], str):
            raise TypeError(f"model.handler must be a string, got "
                             f"{manifest['model']['handler']!r}")
        for field in ("features", "tables"):
            if not isinstance(manifest[field], dict):
                raise TypeError(f"{field} must be an object of name -> entry, got "
                                f"{type(manifest[field]).__name__}")
        if not manifest["features"]:
            raise ValueError("features is empty")
        for fname, f in manifest["features"].items():
            f.setdefault("weighted", False)  # packages written before the field
            if f["table"] not in manifest["tables"] or f["type"] not in ("string", "int64") \
                    or not isinstance(f["pooling"], (str, type(None))) \
                    or not isinstance(f["weighted"], bool):
                raise ValueError(f"feature {fname!r} is malformed: {f}")
        if manifest["output"]["transform"] not in OUTPUTS:
            raise ValueError(f"output.transform {manifest['output']['transform']!r}")
        int(manifest["dense"]["input_dim"])
        shape = manifest["dense"]["output_shape"]
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(f"dense.output_shape must be a list of positive ints, got "
                             f"{shape!r}")
        for field, value in (("dense.file", manifest["dense"]["file"]),
                             ("checkpoint", manifest["checkpoint"])):
            inside = (folder / str(value)).resolve()
            if not isinstance(value, str) or folder.resolve() not in inside.parents:
                raise ValueError(f"{field} must be a path inside the package, got {value!r}")
        if "source" in manifest:
            check_int("source.step", manifest["source"]["step"], minimum=0)
    except KeyError as e:
        raise PackageError(f"{folder / MANIFEST} is malformed: missing field {e}") from None
    except (AttributeError, TypeError, ValueError) as e:
        raise PackageError(f"{folder / MANIFEST} is malformed: {e}") from None
    return manifest


def source_step(manifest: dict) -> int | None:
    """The training step a package's tables come from (``export_package(source_step=)``),
    or None if it was not recorded."""
    return manifest.get("source", {}).get("step")


def _optimizer(entry: dict | None):
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise PackageError(f"optimizer must be an object with type and fields, got {entry!r}")
    cls = _OPTIMIZERS.get(entry.get("type"))
    if cls is None:
        raise PackageError(f"unknown optimizer type {entry.get('type')!r}; expected one of "
                           f"{sorted(_OPTIMIZERS)}")
    try:
        return cls(**entry["fields"])
    except (KeyError, TypeError, ValueError) as e:
        raise PackageError(f"optimizer {entry['type']}: {e}") from None


def build_embeddings(manifest: dict) -> EmbeddingCollection:
    """An empty read-only collection with the package's tables and features."""
    tables = {}
    for tname, t in manifest["tables"].items():
        try:
            tables[tname] = TableConfig(
                dim=int(t["dim"]), hash_seed=int(t["hash_seed"]),
                default_value=t["default_value"], optimizer=_optimizer(t["optimizer"]),
                key_log=bool(t.get("key_log", False)), padding_key=t.get("padding_id"),
                read_only=True)
        except (KeyError, TypeError, ValueError) as e:
            raise PackageError(f"table {tname!r} of the manifest is malformed: {e}") from None
    features = {fname: FeatureConfig(table=f["table"], pooling=f["pooling"],
                                     weighted=f["weighted"])
                for fname, f in manifest["features"].items()}
    return EmbeddingCollection(tables=tables, features=features).eval()


@contextlib.contextmanager
def _weights_only():
    """torch.export.load falls back to full unpickling when a weights-only load fails;
    forcing weights-only makes a hostile package fail instead."""
    with _SAFE_LOAD:
        old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if old is None:
                del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


_SYMPY_NAMES = frozenset((
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max",
    "Min", "Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality",
    "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And",
    "Or", "Not", "Piecewise", "ExprCondPair", "true", "false", "True", "False", "oo", "zoo",
    "nan", "Infinity", "NegativeInfinity", "NaN", "ComplexInfinity", "Half", "One", "Zero",
    "NegativeOne", "BooleanTrue", "BooleanFalse", "S", "pi", "E"))
_SYMBOL = re.compile(r"^[a-z]{1,3}\d+$")
_SYMPY_STRING = re.compile(r"""^(['"])[A-Za-z0-9_.+-]*\1$""")
_SYMPY_OPS = frozenset(("(", ")", ",", "=", "+", "-", "*", "/", "**", "//", "%", "<", ">",
                        "<=", ">=", "==", "!=", "&", "|", "~"))
_GUARD_TERM = re.compile(r"L(?:\['[A-Za-z_]\w*'\]|\[\d+\])+"
                         r"(?:\.(?:size|stride)\(\)\[\d+\]|\.storage_offset\(\))?"
                         r"|math\.(?:isnan|isinf|inf)\b")
_GUARD_REST = re.compile(r"^(?:[\d\s()+*/%<>=!&|~-]|\b(?:and|or|not|True|False)\b)*$")
_OBJECT_CONSTANTS = ("custom_obj_", "opaque_obj_")


def _sympy_functions() -> frozenset:
    import sympy
    from torch.utils._sympy import functions

    return frozenset(n for n, obj in vars(functions).items()
                     if isinstance(obj, type) and issubclass(obj, sympy.Basic))


def _check_sym_expr(text, allowed: frozenset) -> None:
    """A symbolic shape expression (which torch parses with ``eval``) holds only sympy
    constructors, symbol names, numbers and arithmetic: no attribute, subscript or other
    name."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise ValueError(f"symbolic expression {text!r:.80} is not a short string")
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    for i, t in enumerate(tokens):
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if t.type == tokenize.NAME:
            keyword = after == "=" and not t.string.startswith("_")
            if not (keyword or t.string in allowed or _SYMBOL.match(t.string)):
                raise ValueError(f"symbolic expression {text!r:.200} uses {t.string!r}")
        elif t.type == tokenize.STRING:
            if not _SYMPY_STRING.match(t.string):
                raise ValueError(f"symbolic expression {text!r:.200} holds the string "
                                 f"{t.string!r:.80}")
        elif t.type == tokenize.OP:
            if t.string not in _SYMPY_OPS:
                raise ValueError(f"symbolic expression {text!r:.200} uses {t.string!r}")
        elif t.type != tokenize.NUMBER:
            raise ValueError(f"symbolic expression {text!r:.200} is not an expression")


def _check_guard(text) -> None:
    """An input guard (which torch runs with ``exec``) compares input sizes and numbers."""
    if not isinstance(text, str) or len(text) > 10_000 or \
            not _GUARD_REST.match(_GUARD_TERM.sub(" 0 ", text)):
        raise ValueError(f"input guard {text!r:.200} is not a comparison of input sizes")


def check_archive(path: str | os.PathLike) -> None:
    """Refuses a dense program whose loading would run code from the file.

    Raises:
        PackageError: not a zip archive, unreadable JSON, or a shape expression, input
            guard or non-tensor constant that torch would ``eval``, ``exec`` or unpickle.
    """
    try:
        allowed = _SYMPY_NAMES | _sympy_functions()
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".json"):
                    continue
                stack = [json.loads(archive.read(info))]
                while stack:
                    node = stack.pop()
                    if isinstance(node, list):
                        stack.extend(node)
                    elif isinstance(node, dict):
                        for key, value in node.items():
                            if key == "expr_str":
                                _check_sym_expr(value, allowed)
                            elif key == "guards_code":
                                for guard in value if isinstance(value, list) else [value]:
                                    _check_guard(guard)
                            elif key == "path_name" and isinstance(value, str) and \
                                    value.startswith(_OBJECT_CONSTANTS):
                                raise ValueError(f"constant {value!r} is a pickled object; "
                                                 "only tensors are loaded")
                            else:
                                stack.append(value)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, ValueError,
            tokenize.TokenError, SyntaxError) as e:
        raise PackageError(f"{path}: not a dense program dynembed loads ({e})") from None


def load_dense(path: Path) -> nn.Module:
    """The package's dense program as a callable module (weights only, never unpickled)."""
    check_archive(path)
    try:
        with _weights_only():
            program = torch.export.load(path)
            return program.module()
    except Exception as e:  # noqa: BLE001 - a damaged or hostile file: say which
        raise PackageError(f"{path}: not a loadable torch.export program ({e})") from None


def _checkpoint_names(tables: dict, saved: list[str], checkpoint) -> dict:
    """Maps the package's table names to a checkpoint's: the same name, or the one saved
    name ending in ``.<name>`` (a training job saves ``<module path>.tables.<name>``)."""
    out = {}
    for name, table in tables.items():
        if name in saved:
            out[name] = table
            continue
        matches = [s for s in saved if s.endswith(f".{name}")]
        if len(matches) != 1:
            raise PackageError(f"checkpoint {checkpoint} has no single table for {name!r} "
                               f"(its tables: {sorted(saved)})")
        out[matches[0]] = table
    return out


def load_tables(embeddings: EmbeddingCollection, checkpoint: str | os.PathLike, *,
                preload: bool = False) -> None:
    """Opens a checkpoint's rows for ``embeddings``' tables: lazily (O(1) in table size), or
    with ``preload`` read into memory now.

    The checkpoint may be the package's own or one of the training job's (its tables named
    by their path in the model, e.g. ``embeddings.tables.user``). The tables' counters start
    at zero: they count what serving does, not what training did. The checkpoint's
    admission state is not loaded (serving tables admit nothing), without a warning.
    """
    saved = list(checkpoint_manifest.read(checkpoint)["tables"])
    tables = _checkpoint_names(dict(embeddings.tables), saved, checkpoint)
    # serving tables are built without an admission policy on purpose (read-only, they
    # admit nothing): the training job's admission state is dropped without a warning,
    # which would name a table option the user has no say in here
    load(checkpoint, tables=tables, lazy=not preload, strict=False, dropped=("admission",))
    for table in tables.values():
        table.reset_stats()


def open_package(path: str | os.PathLike, *, preload: bool = False) -> Package:
    """Loads a package for serving: tables read-only, lazily opened.

    Args:
        path: the package directory.
        preload: read the tables' rows into memory now instead. A lazily opened table
            answers at once but reads each lookup's rows from the checkpoint's files (a
            serving table never inserts, so rows read are not kept); a preloaded one takes
            time and memory in proportion to its rows at load, then looks up only in
            memory (2.5x faster batches of 64 in the serving benchmark's model).

    Raises:
        PackageError: not a package, malformed, or its files do not load.
        CheckpointError: the tables' checkpoint is damaged.
    """
    folder = checkpoint_path(path, "path", "package directory")
    manifest = read_manifest(folder)
    embeddings = build_embeddings(manifest)
    load_tables(embeddings, folder / manifest["checkpoint"], preload=preload)
    dense = load_dense(folder / manifest["dense"]["file"])
    if dense_source.FIELD in manifest["dense"]:
        try:
            dense_source.check_state_names(manifest["dense"][dense_source.FIELD], dense,
                                           f"dense.{dense_source.FIELD}")
        except ValueError as e:
            raise PackageError(f"{folder / MANIFEST} is malformed: {e}") from None
    return Package(folder, manifest, embeddings, dense, preloaded=preload)
