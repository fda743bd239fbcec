"""DynamicEmbeddingBag: pooled bags of keys (sum, mean or max), like nn.EmbeddingBag."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from dynembed.errors import KeyInputError
from dynembed.kernels.hash_index import unique_inverse
from dynembed.keys.convert import KeyBatch, is_values_offsets, to_jagged
from dynembed.nn._autograd import rows_for
from dynembed.nn._base import SingleTableModule, untraced
from dynembed.nn._padding import drop_padding_from_bags
from dynembed.table.config import TableConfig
from dynembed.table.table import DynamicTable

POOLING_MODES = ("sum", "mean", "max")


def check_mode(mode: str, arg: str = "mode") -> None:
    """Raises ValueError unless ``mode`` is a pooling mode."""
    if mode not in POOLING_MODES:
        raise ValueError(f"{arg} must be one of {POOLING_MODES}, got {mode!r}")


def bag_weights(per_sample_weights, mode: str, bounds: np.ndarray,
                arg: str = "per_sample_weights", nonfinite: str = "raise",
                mode_arg: str = "mode") -> torch.Tensor | None:
    """Checks per-value weights against the bags, before any row is looked up (a call with
    bad weights leaves the table as it was).

    Args:
        per_sample_weights: None, or float weights: (n,), (B, L) for bags of one size L, or a
            list of each bag's weights, shaped like the bags (lists of Python numbers of any
            type, or 1-D float tensors or arrays).
        mode: the pooling mode; weights need "sum".
        bounds: (B + 1,) int64 bag boundaries, from 0 to the number of values n.
        arg: the weights' name in error messages.
        nonfinite: the table's ``nonfinite_grads``: with "raise", NaN/inf weights are
            refused here (they would give NaN outputs and a gradient error blaming the loss).
        mode_arg: the mode's name in error messages (a collection's feature says
            ``pooling``).

    Returns:
        (n,) weights, or None.

    Raises:
        TypeError: weights that are not floating point numbers.
        ValueError: weights that do not match the bags, or a mode other than "sum", or
            NaN/inf weights under ``nonfinite="raise"``.
    """
    if per_sample_weights is None:
        return None
    if mode != "sum":
        raise ValueError(f"{arg} needs {mode_arg}='sum', got {mode_arg}={mode!r}")
    weights = _weights_per_value(per_sample_weights, bounds, arg)
    if nonfinite == "raise":
        bad = ~torch.isfinite(weights.detach())
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{arg} holds {int(bad.sum())} NaN or inf weights (the first at value "
                f"{first}: {float(weights[first])}); fix or drop them, or give the table "
                "nonfinite_grads='skip' to let them through (their rows' gradients are then "
                "skipped and counted)")
    return weights


def pool(rows: torch.Tensor, inverse: np.ndarray, bounds: np.ndarray, mode: str,
         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pools rows per bag with torch's fused kernel.

    Args:
        rows: (u, dim) rows of the distinct ids.
        inverse: (n,) int64 index into ``rows`` of each value.
        bounds: (B + 1,) int64 bag boundaries.
        mode: "sum", "mean" or "max".
        weights: optional (n,) float weights from :func:`bag_weights` (mode "sum").

    Returns:
        (B, dim); empty bags give zeros.
    """
    if weights is not None:
        weights = weights.to(rows.device, rows.dtype)  # e.g. a GPU model's weights
    if rows.shape[0] == 0:  # only empty bags: embedding_bag needs a non-empty weight
        # + rows.sum() (a zero) keeps the result in the graph, so backward() still works
        return rows.new_zeros((bounds.shape[0] - 1, rows.shape[1])) + rows.sum()
    return F.embedding_bag(torch.from_numpy(inverse), rows, torch.from_numpy(bounds),
                           mode=mode, per_sample_weights=weights, include_last_offset=True)


_ARRAYS = (np.ndarray, torch.Tensor)


def _per_bag(weights) -> bool:
    """Whether ``weights`` is a list with one entry per bag (lists, or 1-D tensors or arrays
    other than a single weight) rather than one per value (numbers, 0-d tensors)."""
    if not isinstance(weights, (list, tuple)):
        return False
    kinds = set(map(type, weights))  # a C-level scan of the element types
    if any(issubclass(t, (list, tuple)) for t in kinds):
        return True
    return any(issubclass(t, _ARRAYS) for t in kinds) and any(
        isinstance(w, _ARRAYS) and w.ndim > 0 and tuple(w.shape) != (1,) for w in weights)


def _weights_per_value(weights, bounds: np.ndarray, arg: str) -> torch.Tensor:
    """(n,) weights, one per value, from flat weights, a (B, L) tensor of fixed-size bags'
    weights, or a list of each bag's weights (lists or 1-D tensors).

    Raises:
        TypeError: weights that are not floating point numbers.
        ValueError: weights whose shape does not match the bags.
    """
    lengths = np.diff(bounds)
    n = int(bounds[-1])  # bounds start at 0 and end at the number of values
    if _per_bag(weights):
        if len(weights) != lengths.shape[0]:
            raise ValueError(f"{arg} as a list of lists must hold one list per bag "
                             f"({lengths.shape[0]} bags), got {len(weights)} lists")
        flat = [b for b, w in enumerate(weights) if not (
            isinstance(w, (list, tuple)) or isinstance(w, _ARRAYS) and w.ndim == 1)]
        if flat:
            w = weights[flat[0]]
            shape = f" of shape {tuple(w.shape)}" if isinstance(w, _ARRAYS) else ""
            raise ValueError(f"{arg}[{flat[0]}] must be the bag's weights, a list or a 1-D "
                             f"tensor (as the other entries), got {type(w).__name__}{shape}")
        given = np.fromiter(map(len, weights), dtype=np.int64, count=len(weights))
        wrong = np.flatnonzero(given != lengths)
        if wrong.shape[0]:
            b = int(wrong[0])
            raise ValueError(f"{arg}[{b}] has {given[b]} weights but bag {b} has "
                             f"{lengths[b]} keys: give one weight per key")
        if all(isinstance(w, _ARRAYS) for w in weights):
            # a tensor (or array) per bag, as bags of keys may come: concatenated, which
            # keeps their graph (torch.cat would also turn int weights beside floats to float)
            parts = [torch.as_tensor(w) for w in weights]
            wrong = [p.dtype for p in parts if p.numel() and not p.dtype.is_floating_point]
            if wrong:
                raise TypeError(f"{arg} must be floating point, got a {wrong[0]} bag among them")
            weights = torch.cat(parts)
        else:
            weights = list(itertools.chain.from_iterable(weights))  # in C: no per-weight loop
    # one tensor per weight: stacked, so a gradient reaches them (torch.as_tensor would copy
    # their values and cut them from the graph, with only a warning)
    per_weight = isinstance(weights, (list, tuple)) and any(
        issubclass(t, torch.Tensor) for t in set(map(type, weights)))
    if per_weight:
        wrong = [w.dtype for w in weights
                 if isinstance(w, torch.Tensor) and not w.dtype.is_floating_point]
        if wrong:
            raise TypeError(f"{arg} must be floating point, got a {wrong[0]} tensor among them")
    try:  # Python numbers are weights whatever their type; arrays keep theirs, as in torch
        if per_weight:
            tensor = torch.stack([w.reshape(()).to(torch.float32) if isinstance(w, torch.Tensor)
                                  else torch.tensor(w, dtype=torch.float32) for w in weights])
        else:
            tensor = torch.as_tensor(
                weights, dtype=torch.float32 if isinstance(weights, (list, tuple)) else None)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{arg} must be floating point weights (a tensor, array or list), "
                        f"got {type(weights).__name__}: {e}") from None
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{arg} must be floating point, got {tensor.dtype}")
    if tensor.device.type == "meta" or tensor.layout != torch.strided:
        raise TypeError(f"{arg} must be a dense tensor with values (on the cpu), got a "
                        f"{tensor.layout} tensor on {tensor.device}")
    if (tensor.dim() == 2 and tensor.shape[0] == lengths.shape[0]
            and bool((lengths == tensor.shape[1]).all())):
        tensor = tensor.reshape(-1)  # weights of fixed-size bags, as nn.EmbeddingBag takes
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"{arg} must have shape ({n},), one weight per value (or one list "
                         f"of weights per bag), got {tuple(tensor.shape)}")
    return tensor


def _read_as_values_offsets(values) -> bool:
    """Whether EmbeddingCollection reads ``values`` as ``(values, offsets)`` (see
    :func:`~dynembed.keys.convert.is_values_offsets`): a tuple of two whose second part is a
    1-D tensor or array, or a flat list of ints beside values that are not one. Two flat int
    lists, which the collection refuses as ambiguous, are two bags here."""
    if not (isinstance(values, tuple) and len(values) == 2):
        return False
    if isinstance(values[1], (torch.Tensor, np.ndarray)) and values[1].ndim != 1:
        return False  # a bag of another shape: to_jagged names it
    try:
        return is_values_offsets(values, "values")
    except KeyInputError:
        return False


class DynamicEmbeddingBag(SingleTableModule):
    """Like ``torch.nn.EmbeddingBag`` with no vocabulary.

    Args:
        dim: row width; other keywords are :class:`TableConfig` fields.
        mode: "sum", "mean" or "max".
        config: a whole :class:`TableConfig` instead of ``dim`` and options.
        table: an existing :class:`DynamicTable` to share instead.

    Example:
        >>> bag = de.DynamicEmbeddingBag(dim=16, mode="sum")
        >>> bag([["red", "shoe"], ["shoe"], []]).shape
        torch.Size([3, 16])
    """

    def __init__(self, dim: int | None = None, *, mode: str = "mean",
                 config: TableConfig | None = None, table: DynamicTable | None = None,
                 **options) -> None:
        check_mode(mode)
        super().__init__(dim, table, config, options)
        self.mode = mode

    @untraced
    def forward(self, values, offsets=None, per_sample_weights=None, *,
                include_last_offset: bool = False) -> torch.Tensor:
        """Pools each bag's rows.

        Args:
            values: (n,) flat keys with ``offsets``; a list of lists of keys; or a (B, L)
                integer tensor of fixed-size bags.
            offsets: (B,) start of each bag in ``values`` (or (B + 1,) with
                ``include_last_offset``).
            per_sample_weights: optional float weights, mode "sum" only: (n,) for flat
                values, (B, L) for a (B, L) tensor, or a list of each bag's weights (lists or
                1-D tensors) shaped like the bags.
            include_last_offset: as in ``torch.nn.EmbeddingBag``.

        Returns:
            (B, dim) float32, or on the device and in the float dtype the module was moved
            to (as :class:`DynamicEmbedding`).

        Raises:
            KeyInputError, KeyValueError: bad keys, nesting deeper than bags of keys, or
                offsets that do not match the values.
            TypeError, ValueError: weights that are not floating point or do not match the
                bags, or weights with a mode other than "sum" (see :func:`bag_weights`).
            MemoryBudgetError: a training lookup needs more distinct rows at once than
                ``memory_budget`` / ``max_rows`` hold.
            StoreError: the table's store failed; memory is unchanged.
        """
        if offsets is None and _read_as_values_offsets(values):
            # EmbeddingCollection reads such a tuple as (values, offsets): refused here, so
            # the same input never means two things in the two modules
            raise KeyInputError(
                "values: a tuple of two whose second part looks like offsets (a 1-D tensor or "
                "array, or a list of ints) may be (values, offsets) or two bags; "
                "EmbeddingCollection reads it as (values, offsets). Here give offsets as their "
                "own argument, bag(values, offsets), or the bags as a list: bag([bag0, bag1])")
        batch, bounds = to_jagged(values, offsets, include_last_offset=include_last_offset,
                                  hash_seed=self.table.config.hash_seed)
        weights = bag_weights(per_sample_weights, self.mode, bounds,
                              nonfinite=self.table.config.nonfinite_grads)
        batch, bounds, weights = drop_padding_from_bags(batch, bounds, weights,
                                                        self.table.padding_id)
        return self._pool(batch, bounds, weights)

    def _pool(self, batch: KeyBatch, bounds: np.ndarray,
              weights: torch.Tensor | None) -> torch.Tensor:
        unique, inverse, counts = unique_inverse(batch.ids)
        rows = rows_for(self.table, self._anchor, unique, counts, training=self.training,
                        strings=batch.strings, string_ids=batch.ids)
        return self._deliver(pool(rows, inverse, bounds, self.mode, weights))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}, rows={self.table.size()}"
