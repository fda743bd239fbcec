"""Shared plumbing of the modules that own dynamic tables: state dicts, stats, steps."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import sys
import warnings

import torch
from torch import nn

from dynembed._caller import warn_at_caller
from dynembed.errors import StateDictError
from dynembed.table.config import TableConfig
from dynembed.table.stats import TableStats
from dynembed.table.table import DynamicTable
from dynembed.table.updates import step_together

_WITH_TABLES = contextvars.ContextVar("dynembed_state_dict_tables", default=True)


@contextlib.contextmanager
def without_tables():
    """Within this block, ``state_dict()`` / ``load_state_dict()`` of any module skip the
    rows of dynembed tables (checkpoints save those separately, streaming)."""
    token = _WITH_TABLES.set(False)
    try:
        yield
    finally:
        _WITH_TABLES.reset(token)


_UNTRACED: dict = {}
"""Module forwards wrapped by ``torch.compiler.disable``, made on first use once
torch._dynamo is imported (making one imports it, a second: never at import)."""

_DYNAMO = "torch._dynamo"


_EAGER_REASON = (
    "dynembed lookups run eagerly (compiled kernels on the keys' values, which torch.compile "
    "cannot trace); the graph breaks around them, so fullgraph=True cannot hold a model "
    "with dynembed tables: compile without it, or compile the dense part alone")
"""Why a lookup breaks torch.compile's graph (torch shows it, e.g. under fullgraph=True)."""


def _transformed(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor among a lookup's arguments (or a collection's feature inputs, or
    a (values, offsets) pair) is wrapped by a torch.func transform."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for value in (*args, *kwargs.values()):
        parts = value.values() if isinstance(value, dict) else (value,)
        for part in parts:
            items = part if isinstance(part, tuple) else (part,)
            if any(isinstance(x, torch.Tensor) and wrapped(x) for x in items):
                return True
    return False


def untraced(forward):
    """Makes a module's ``forward`` run outside torch.compile's graph (a graph break).

    A lookup runs numba kernels and numpy code on the keys, which torch.compile cannot
    trace (it failed inside numba's dispatcher). Under torch.compile the call goes to a
    ``torch.compiler.disable`` copy of ``forward``, so the rows come out as a graph input
    and their backward still updates the table. So does every call once torch._dynamo is
    imported: torch.compile may run a frame eagerly (torch 2.11 did so with this wrapper
    when a module got string keys, no tensor) and still compile the frames it calls, and
    compiling the lookup's numpy code failed. A process that never imported torch._dynamo
    calls ``forward`` itself (the copy costs 0.4 us a call; making it, 1 s of import).
    """

    @functools.wraps(forward)
    def call(self, *args, **kwargs):
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # a trace would bake this call's rows in as constants (torch.jit.trace only
            # warned, and answered every key with them); torch.export failed deep inside
            raise TypeError(
                f"{type(self).__name__} cannot be traced or exported (torch.jit.trace, "
                "torch.export): its lookups run compiled kernels on the keys' values, so a "
                "trace would hold this batch's rows as constants. Export the dense part "
                "alone, or package the model for serving with dynembed export / "
                "de.serving.export_package; torch.compile works (the lookup runs eagerly)")
        if torch._C._are_functorch_transforms_active() and _transformed(args, kwargs):
            # keys (or offsets, weights) as functorch wrappers have no storage: the conversion
            # failed with "Cannot access data pointer of Tensor that doesn't have storage"
            raise TypeError(
                f"{type(self).__name__} cannot run under torch.func transforms (vmap, grad, "
                "jacrev, ...): its lookups run compiled kernels on the keys' values. Look the "
                "rows up outside the transform and pass them in as a tensor "
                "(torch.func.functional_call works on the dense part)")
        if torch.compiler.is_compiling() or _DYNAMO in sys.modules:
            disabled = _UNTRACED.get(forward)
            if disabled is None:
                disabled = _UNTRACED[forward] = torch.compiler.disable(
                    forward, reason=_EAGER_REASON)
            return disabled(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    return call


def named_tables(model: nn.Module) -> dict[str, DynamicTable]:
    """Every dynamic table inside ``model`` by dotted name (``<module path>.<table name>``);
    a table shared by several modules appears once, under its first name."""
    out, seen = {}, set()
    for path, module in model.named_modules():
        if isinstance(module, TableModule):
            for name, table in module.named_tables().items():
                if id(table) not in seen:
                    seen.add(id(table))
                    out[f"{path}.{name}" if path else name] = table
    return out


def anchor_names(model: nn.Module) -> list[str]:
    """Qualified names of the dynembed modules' zero-size anchor Parameters in ``model``."""
    return [f"{path}._anchor" if path else "_anchor" for path, m in model.named_modules()
            if isinstance(m, TableModule)]


def anchor_ids(model: nn.Module) -> set[int]:
    """``id()`` of each dynembed module's zero-size anchor Parameter in ``model``."""
    return {id(m._anchor) for m in model.modules() if isinstance(m, TableModule)}


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``model``'s Parameters other than the dynembed modules' zero-size anchors."""
    anchors = anchor_ids(model)
    return [p for p in model.parameters() if id(p) not in anchors]


_LOAD_TORCH_WEIGHT = ("insert the rows of a (V, dim) weight matrix W as keys 0..V-1 with "
                      "emb.table.insert_or_assign(torch.arange(V), W)")
_NO_WEIGHT_MATRIX = {
    "weight": "a dynamic table has no weight matrix (rows are created as keys arrive); read "
              "rows with emb.table.find(keys).values or emb.table.export(), and "
              + _LOAD_TORCH_WEIGHT,
    "num_embeddings": "there is no vocabulary size; emb.table.size() is the rows held now",
    "embedding_dim": "the row width is emb.dim",
}
"""What to use instead of torch.nn.Embedding's attributes."""


_TORCH_HINTS = {
    "include_last_offset": "include_last_offset is an argument of forward: "
                           "bag(values, offsets, include_last_offset=True)",
    "num_embeddings": "num_embeddings: there is no vocabulary size, rows are created as keys "
                      "arrive (max_rows= or memory_budget= bound them)",
    "embedding_dim": "embedding_dim is dim=",
    "max_norm": "max_norm / norm_type: rows are not renormalised on lookup (the optimizer's "
                "max_grad_norm= clips each row's gradient, a different thing)",
    "scale_grad_by_freq": "scale_grad_by_freq: a key's gradients are summed, never scaled by "
                          "its count in the batch",
    "sparse": "sparse=: updates are always sparse here (only the touched rows change), the "
              "argument is not needed",
    "_weight": "_weight / from_pretrained: " + _LOAD_TORCH_WEIGHT,
    "_freeze": "_freeze: call emb.requires_grad_(False) on the dynembed module",
    "padding_idx": "padding_idx is padding_key= (any one key: an int id, str or bytes)",
}
"""How to say what torch.nn.Embedding(Bag)'s constructor arguments are called here."""


def make_table(dim, table: DynamicTable | None, config: TableConfig | None,
               options: dict) -> DynamicTable:
    """Builds the table of a module from exactly one of ``table``, ``config`` or ``dim``.

    Raises:
        TypeError: an option that is no TableConfig field (torch's constructor arguments
            say what they are called here), or not exactly one of the three.
    """
    fields = [f.name for f in dataclasses.fields(TableConfig) if f.name != "dim"]
    unknown = sorted(set(options) - set(fields))
    if unknown:  # e.g. torch's constructor arguments: TableConfig's error named only them
        aliases = {"norm_type": "max_norm"}
        hints = list(dict.fromkeys(_TORCH_HINTS[aliases.get(name, name)] for name in unknown
                                   if aliases.get(name, name) in _TORCH_HINTS))
        raise TypeError(f"unknown table option(s) {unknown}: the keywords beside dim= are "
                        f"TableConfig fields {fields}" + "".join(f"; {h}" for h in hints))
    given = [name for name, v in (("dim", dim), ("config", config), ("table", table))
             if v is not None]
    if len(given) != 1:
        raise TypeError("give exactly one of dim= (with table options as keywords), config= "
                        f"(a TableConfig) or table= (a DynamicTable to share); got {given}")
    if (config is not None or table is not None) and options:
        raise TypeError(f"table options {sorted(options)} go into the TableConfig when "
                        "config= or table= is given")
    if table is not None:
        if not isinstance(table, DynamicTable):
            raise TypeError(f"table must be a DynamicTable, got {type(table).__name__}")
        return table
    return DynamicTable(config if config is not None else TableConfig(dim=dim, **options))


class TableModule(nn.Module):
    """Base of modules holding named dynamic tables.

    The tables' rows appear in ``state_dict()`` as plain tensors under
    ``<prefix><table name>.<tensor>`` so ``torch.save`` / ``torch.load(weights_only=True)``
    work and checkpoints never pickle dynembed classes.
    """

    def __init__(self) -> None:
        super().__init__()
        # Rows are not Parameters; this zero-size Parameter ties lookups into autograd
        # (each training lookup's backward gives it an empty gradient, so DDP counts it
        # used), and freezing the model the torch way (model.requires_grad_(False), or each
        # of its parameters) reaches it. It is left out of state dicts.
        self._anchor = nn.Parameter(torch.empty(0))
        # Where outputs go: rows live in host memory as float32 whatever .to() asks.
        self._output_dtype = torch.float32
        self._output_device = torch.device("cpu")

    def requires_grad_(self, requires_grad: bool = True) -> TableModule:
        """Freezes (``False``) or unfreezes this module's lookups.

        A frozen module's rows get no gradient, so neither backward nor
        :func:`sparse_step` changes them; in train mode its lookups still insert and count
        new keys (a frozen ``nn.Embedding`` also returns rows for every index). A parent's
        ``requires_grad_(False)`` freezes it too, as does setting ``requires_grad`` on
        each of the model's parameters: the module's one Parameter, a zero-size anchor, is
        what its lookups' gradients hang on. Another module sharing the same table still
        trains it.

        Raises:
            TypeError: ``requires_grad`` is not a bool.
        """
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad must be True or False, got {requires_grad!r}")
        return super().requires_grad_(requires_grad)  # the anchor is a Parameter

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(), .double() ... reach every module through _apply: the
        # rows stay in host memory as float32, and lookups deliver their outputs where
        # and as the model asked (autograd brings the gradient back). fn is applied to an
        # empty tensor of the outputs' current dtype and device, as it is to a float
        # parameter, so .half() then .to(device) keeps float16; a non-float result (.type()
        # with an int type) leaves the outputs as they were.
        probe = fn(torch.empty(0, dtype=self._output_dtype, device=self._output_device))
        if probe.device.type == "meta":  # lookups gave meta outputs that backward refused
            raise RuntimeError(
                f"{type(self).__name__} cannot move to the meta device: its rows are data in "
                "host memory, and its outputs must be real tensors. Move the rest of the "
                "model (its dense modules), or build the tables after the meta-device step")
        if probe.is_floating_point():
            self._output_dtype, self._output_device = probe.dtype, probe.device
        return super()._apply(fn, recurse)

    def _deliver(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` on the device and in the float dtype this module was moved to."""
        if out.dtype != self._output_dtype or out.device != self._output_device:
            return out.to(device=self._output_device, dtype=self._output_dtype)
        return out

    def named_tables(self) -> dict[str, DynamicTable]:
        """Tables owned by this module, by state-dict name."""
        raise NotImplementedError

    def _freeze_anchor_of_untrainable_tables(self) -> None:
        """Subclasses call it once their tables are set: without a trainable table (no
        optimizer, read-only) no lookup gives the anchor a gradient, and a Parameter that
        requires one but never gets it stops DistributedDataParallel at its next step."""
        if not any(t.trainable for t in self.named_tables().values()):
            self._anchor.requires_grad_(False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(f"{prefix}_anchor", None)  # no state: state dicts stay as they were
        if not _WITH_TABLES.get():
            return
        for name, table in self.named_tables().items():
            for key, tensor in table.state_dict().items():
                destination[f"{prefix}{name}.{key}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = self.named_tables()
        ours = {}
        for name in names:
            head = f"{prefix}{name}."
            ours[name] = {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
        rest = {k: v for k, v in state_dict.items()
                if not any(k.startswith(f"{prefix}{n}.") for n in names)}
        anchor = f"{prefix}_anchor"
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if anchor in missing_keys and anchor not in state_dict:  # never saved (no state)
            missing_keys.remove(anchor)
        if not _WITH_TABLES.get():
            return
        given = {name: part for name, part in ours.items() if part}
        if not given and f"{prefix}weight" in rest:
            # a warning, not an error: strict=False loads of the dense part stay possible
            # (torch hands every module strict=True, whatever the caller asked)
            warn_at_caller(f"'{prefix}weight' looks like a torch.nn.Embedding's weight, "
                           "which a dynamic table does not load; " + _LOAD_TORCH_WEIGHT)
        missing_keys.extend(f"{prefix}{name}.weights" for name in names if name not in given)
        for name, part in given.items():  # all checked before any loads: all or none change
            try:
                names[name].check_state_dict(part)
            except StateDictError as e:
                raise StateDictError(f"table '{prefix}{name}': {e}") from None
            unexpected_keys.extend(f"{prefix}{name}.{k}"
                                   for k in names[name].unused_state_keys(part))
        for name, part in given.items():
            try:
                names[name].load_state_dict(part, strict=False)  # reported above
            except StateDictError as e:
                raise StateDictError(f"table '{prefix}{name}': {e}") from None

    def sparse_step(self) -> None:
        """Applies deferred-mode gradients of every table (no-op in fused mode), as one
        step: see :func:`sparse_step`."""
        step_together(self.named_tables())

    def sparse_zero_grad(self) -> None:
        """Drops deferred-mode gradients not yet applied."""
        for table in self.named_tables().values():
            table.zero_grad()


class SingleTableModule(TableModule):
    """A module over one table, built from ``dim`` + options, a ``config`` or a ``table``."""

    def __init__(self, dim: int | None, table: DynamicTable | None,
                 config: TableConfig | None, options: dict) -> None:
        super().__init__()
        self.table = make_table(dim, table, config, options)
        self._freeze_anchor_of_untrainable_tables()

    @property
    def dim(self) -> int:
        """Row width."""
        return self.table.dim

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError as e:
            if name in _NO_WEIGHT_MATRIX:  # torch.nn.Embedding's names, e.g. in migrated code
                raise AttributeError(f"{e}: {_NO_WEIGHT_MATRIX[name]}") from None
            raise

    def named_tables(self) -> dict[str, DynamicTable]:
        return {"table": self.table}

    def stats(self) -> TableStats:
        """Sizes and counters of the table (see :meth:`DynamicTable.stats`)."""
        return self.table.stats()

    def prefetch(self, keys) -> None:
        """Reads the stored rows of a coming batch's keys in the background (flat keys;
        see :meth:`DynamicTable.prefetch`)."""
        self.table.prefetch(keys)


def sparse_step(model: nn.Module) -> None:
    """Applies the deferred sparse gradients of every dynembed module inside ``model``.

    Call it where you call your dense optimizer's ``step()`` when tables use
    ``update_mode="deferred"`` (gradient accumulation).

    Every table's gradients are summed and checked before any row changes, so a batch
    with NaN/inf gradients changes no table.

    Raises:
        NonFiniteGradientError: a summed gradient row is NaN or inf and its table has
            ``nonfinite_grads="raise"`` (named in the message); no table changed, and every
            table's queued gradients were dropped (counted in ``skipped_gradients``).
        StoreError: reading evicted rows back failed.
        TypeError: ``model`` is not a module.
    """
    _check_model(model, "table.step_optimizer()")
    step_together(named_tables(model))


def _check_model(model, table_verb: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module holding dynembed modules, got "
                        f"{type(model).__name__}; for one table call {table_verb}")


def sparse_zero_grad(model: nn.Module) -> None:
    """Drops the deferred sparse gradients of every dynembed module inside ``model``.

    Raises:
        TypeError: ``model`` is not a module.
    """
    _check_model(model, "table.zero_grad()")
    for module in model.modules():
        if isinstance(module, TableModule):
            module.sparse_zero_grad()


def set_sparse_lr(model: nn.Module | DynamicTable, lr: float) -> None:
    """Sets the learning rate of every dynembed table in ``model`` (or of one table): call
    it where a torch learning-rate scheduler steps, for warm-up or decay.

    Sparse optimizers are frozen configs that ``torch.optim.lr_scheduler`` cannot see; this
    replaces each table's optimizer (and its config's, which checkpoints and ``inspect``
    report) with one of learning rate ``lr``, keeping the optimizer state. Tables without
    an optimizer are left as they are.

    Raises:
        TypeError: ``model`` is neither a module nor a table.
        ValueError: ``lr`` is not a finite number > 0 (checked before any table changes).
    """
    if isinstance(model, DynamicTable):
        tables = [model]
    elif isinstance(model, nn.Module):
        tables = list(named_tables(model).values())
    else:
        raise TypeError(f"model must be a torch.nn.Module or a DynamicTable, got "
                        f"{type(model).__name__}")
    new = [None if t.optimizer is None else dataclasses.replace(t.optimizer, lr=lr)
           for t in tables]  # each validates lr: all built before any is set
    for table, optimizer in zip(tables, new):
        if optimizer is not None:
            table.optimizer = optimizer
            with warnings.catch_warnings():  # the config's warnings came when it was made
                warnings.simplefilter("ignore")
                table.config = dataclasses.replace(table.config, optimizer=optimizer)
