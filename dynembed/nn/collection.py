"""EmbeddingCollection: named features over named tables, looked up in one fused call."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dynembed.errors import KeyInputError
from dynembed.kernels.hash_index import unique_inverse
from dynembed.keys.convert import (
    NO_KEYS,
    KeyBatch,
    is_values_offsets,
    to_jagged,
    to_key_batch,
)
from dynembed.nn._autograd import Lookup, index_rows, rows_for_many
from dynembed.nn._base import TableModule, untraced
from dynembed.nn._padding import drop_padding, drop_padding_from_bags, restore_padding
from dynembed.nn.bag import bag_weights, check_mode, pool
from dynembed.table.config import TableConfig
from dynembed.table.stats import TableStats
from dynembed.table.table import DynamicTable


@dataclass(kw_only=True)
class FeatureConfig:
    """One input feature of an :class:`EmbeddingCollection`."""

    table: str
    """Name of the table the feature's keys are looked up in (tables may be shared)."""
    pooling: str | None = None
    """None: one key per sample, output (*shape, dim). "sum", "mean" or "max": a bag of keys
    per sample (a list of lists, a ``(values, offsets)`` tuple or a 2-D tensor), output
    (B, dim). Offsets may be a tensor, an array or a list, but a tuple of two flat int
    lists is refused as ambiguous (two bags?): give such offsets as a tensor."""
    weighted: bool = False
    """The feature's keys come with weights (``per_sample_weights``, pooling "sum"): every
    lookup must give them, and a served model takes them with each request (see
    :mod:`dynembed.serving`), rather than pooling the bag unweighted."""

    def __post_init__(self) -> None:
        if not isinstance(self.table, str):
            raise TypeError(f"table must be a table name (str), got {self.table!r}")
        if self.pooling is not None:
            check_mode(self.pooling, "pooling")
        if not isinstance(self.weighted, bool):
            raise TypeError(f"weighted must be True or False, got {self.weighted!r}")
        if self.weighted and self.pooling != "sum":
            raise ValueError(f"weighted=True needs pooling='sum' (weights scale the keys of a "
                             f"summed bag), got pooling={self.pooling!r}")


def _reads_as_values_offsets(value) -> bool:
    """Whether a pooled feature would read the pair ``value`` as (values, offsets), or
    refuse it as ambiguous (two flat int lists)."""
    try:
        return is_values_offsets(value, "")
    except KeyInputError:
        return True


class EmbeddingCollection(TableModule):
    """Several named features over several dynamic tables.

    Features that share a table are looked up together: their ids are deduplicated, found or
    inserted, and gathered in one call per table, and their gradients are combined before
    the table's single sparse update.

    Args:
        tables: table name -> :class:`TableConfig` (or an existing :class:`DynamicTable`).
        features: feature name -> :class:`FeatureConfig` (or just a table name). None gives
            one unpooled feature per table, named like the table.

    Example:
        >>> coll = de.EmbeddingCollection(
        ...     tables={"words": de.TableConfig(dim=8), "user": de.TableConfig(dim=4)},
        ...     features={"title": de.FeatureConfig(table="words", pooling="mean"),
        ...               "query": de.FeatureConfig(table="words", pooling="mean"),
        ...               "user_id": "user"})
        >>> out = coll({"title": [["red", "shoe"]], "query": [["shoe"]], "user_id": [7]})
        >>> coll({"title": [["a"]], "query": [["b"]], "user_id": [7]}, concat=True).shape
        torch.Size([1, 20])

    Raises:
        ValueError: an empty or badly named table map, one DynamicTable under two names,
            two tables over one store object, a feature name that is not a non-empty str, or
            a feature naming an unknown table.
    """

    def __init__(self, tables: Mapping[str, TableConfig | DynamicTable],
                 features: Mapping[str, FeatureConfig | str] | None = None) -> None:
        super().__init__()
        if not isinstance(tables, Mapping) or not tables:
            raise ValueError("tables must be a non-empty dict of name -> TableConfig")
        for name, spec in tables.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"table names must be non-empty str without '.', got {name!r}")
            if not isinstance(spec, (TableConfig, DynamicTable)):
                raise TypeError(f"tables[{name!r}] must be a TableConfig or DynamicTable, got "
                                f"{type(spec).__name__}")
        named = {}
        for name, spec in tables.items():  # under two names, each step would update it twice
            if isinstance(spec, DynamicTable) and named.setdefault(id(spec), name) != name:
                raise ValueError(f"tables[{named[id(spec)]!r}] and tables[{name!r}] are the "
                                 "same DynamicTable; name it once and point several features "
                                 f"at it (features={{...: {named[id(spec)]!r}}})")
        stores = {}
        for name, spec in tables.items():
            # the table built later takes the store object over and the earlier one fails
            # at its first lookup, with an error that names neither table
            store = (spec.config if isinstance(spec, DynamicTable) else spec).store
            if store is not None and stores.setdefault(id(store), name) != name:
                first = stores[id(store)]
                raise ValueError(f"tables[{first!r}] and tables[{name!r}] use the same store "
                                 f"object: tables[{name!r}] would take it over and "
                                 f"tables[{first!r}] fail at its first lookup. Give each table "
                                 "a store of its own (another path or namespace), e.g. a "
                                 "TableConfig per table rather than one for both")
        if features is None:
            features = {name: FeatureConfig(table=name) for name in tables}
        if not isinstance(features, Mapping):
            raise TypeError("features must be a dict of feature name -> FeatureConfig or "
                            f"table name (or None), got {type(features).__name__}")
        if not features:
            raise ValueError("features must name at least one feature (or be None: one "
                             "feature per table, named like it)")
        self.features: dict[str, FeatureConfig] = {}
        for name, spec in features.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"feature names must be non-empty str, got {name!r}")
            spec = FeatureConfig(table=spec) if isinstance(spec, str) else spec
            if not isinstance(spec, FeatureConfig):
                raise TypeError(f"features[{name!r}] must be a FeatureConfig or a table name, "
                                f"got {type(spec).__name__}")
            if spec.table not in tables:
                raise ValueError(f"features[{name!r}] uses table {spec.table!r}, which is not "
                                 f"in tables {sorted(tables)}")
            self.features[name] = spec
        self.key_kinds: dict[str, set[str]] = {}
        """Feature -> the kinds of keys (``"int"``, ``"str"``) it was looked up with in this
        process; an export takes them as the features' types."""
        self.weights_given: set[str] = set()
        """Features looked up with ``per_sample_weights`` in this process; an export refuses
        those not declared ``weighted`` (they would be served unweighted)."""
        # built last: a table over a store takes it over, so a bad argument must fail first
        self.tables: dict[str, DynamicTable] = {
            name: spec if isinstance(spec, DynamicTable) else DynamicTable(spec)
            for name, spec in tables.items()}
        for name, table in self.tables.items():
            table.name = table.name or f"table {name!r}"  # told apart in the logs
        self._freeze_anchor_of_untrainable_tables()

    def named_tables(self) -> dict[str, DynamicTable]:
        return {f"tables.{name}": table for name, table in self.tables.items()}

    def stats(self) -> dict[str, TableStats]:
        """Sizes and counters of each table, by table name."""
        return {name: table.stats() for name, table in self.tables.items()}

    def _convert(self, name: str, spec: FeatureConfig, value, table: DynamicTable,
                 include_last_offset: bool):
        arg = f"inputs[{name!r}]"
        seed = table.config.hash_seed
        if spec.pooling is None:
            if _reads_as_values_offsets(value):
                # (B, L) keys as two rows would train the offsets as keys
                raise KeyInputError(
                    f"{arg}: the feature is not pooled, but got a pair that reads as (values, "
                    "offsets) (pooled features take it so); give its keys (one per example, "
                    "or B lists of L keys as a list), or declare it pooled "
                    "(FeatureConfig(pooling=...))")
            batch, bounds = to_key_batch(value, hash_seed=seed, arg=arg), None
        elif is_values_offsets(value, arg):
            batch, bounds = to_jagged(value[0], value[1], include_last_offset=include_last_offset,
                                      hash_seed=seed, arg=arg)
        else:
            batch, bounds = to_jagged(value, hash_seed=seed, arg=arg)
        return batch, bounds

    def _rows(self, by_table: dict) -> tuple[list[torch.Tensor], list[np.ndarray | None]]:
        """Per table: rows and the row of each of its keys (features in order); None where
        the rows are already one per key, in order."""
        ids_by_table = [np.concatenate([b.ids for _, b, _ in group])
                        for group in by_table.values()]
        tables = [self.tables[name] for name in by_table]
        if all((not self.training or t.read_only) and t.router is None for t in tables):
            # Reads need no dedup (as DynamicEmbedding's): probe every key, one gather.
            return [t.read(ids) for t, ids in zip(tables, ids_by_table)], [None] * len(tables)
        lookups, inverses = [], []
        for table, group, ids in zip(tables, by_table.values(), ids_by_table):
            strings = string_ids = None
            if table.key_log is not None:  # the string features' keys (others are ints)
                named = [b for _, b, _ in group if b.strings is not None]
                if named:
                    strings = list(itertools.chain.from_iterable(b.strings for b in named))
                    string_ids = np.concatenate([b.ids for b in named])
            unique, inverse, counts = unique_inverse(ids)
            lookups.append(Lookup(table, unique, counts, strings, string_ids))
            inverses.append(inverse)
        return rows_for_many(lookups, self._anchor, training=self.training), inverses

    def _check_weights(self, per_sample_weights) -> Mapping:
        """The weights by feature; raises for names that are not pooled features, and for
        features declared ``weighted`` without them."""
        if per_sample_weights is None:
            per_sample_weights = {}
        if not isinstance(per_sample_weights, Mapping):
            raise TypeError("per_sample_weights must be a dict of feature name -> (n,) "
                            f"weights, got {type(per_sample_weights).__name__}")
        for name in per_sample_weights:
            if name not in self.features:
                raise KeyInputError(f"per_sample_weights[{name!r}]: no such feature; "
                                    f"features are {list(self.features)}")
            if self.features[name].pooling is None:
                raise ValueError(f"per_sample_weights[{name!r}]: the feature is not pooled; "
                                 "weights apply to features with pooling='sum'")
        unweighted = [name for name, spec in self.features.items()
                      if spec.weighted and name not in per_sample_weights]
        if unweighted:
            raise KeyInputError(f"per_sample_weights: no weights for features {unweighted}, "
                                "declared weighted=True; give them (per_sample_weights="
                                "{name: weights})")
        return per_sample_weights

    @untraced
    def forward(self, inputs: Mapping[str, object], *, concat: bool = False,
                per_sample_weights: Mapping[str, torch.Tensor] | None = None,
                include_last_offset: bool = False):
        """Looks up every feature.

        Args:
            inputs: feature name -> keys (unpooled) or bags (pooled: a list of lists, a
                ``(values, offsets)`` tuple, or a 2-D tensor). Every feature must be given.
            concat: return one (B, sum of dims) tensor in feature order instead of a dict;
                every output must then be (B, dim) with the same B.
            per_sample_weights: optional feature name -> weights, for "sum" features, in
                any shape :func:`~dynembed.nn.bag.bag_weights` takes; checked before any
                lookup.
            include_last_offset: the offsets of every ``(values, offsets)`` input end with
                the number of values, as TorchRec's ``JaggedTensor.offsets()`` (B + 1
                entries for B bags); as in ``torch.nn.EmbeddingBag``.

        Returns:
            dict feature name -> tensor, or the concatenated (B, total_dim) tensor; float32
            on the CPU, or on the device and in the float dtype the module was moved to
            (as :class:`DynamicEmbedding`).

        Raises:
            KeyInputError: a feature is missing or unknown (in ``inputs`` or
                ``per_sample_weights``), or its keys are bad; a feature declared
                ``weighted`` has no weights.
            TypeError: ``concat`` or ``include_last_offset`` is not a bool.
            ValueError: ``concat`` with outputs of different batch sizes or ranks; weights
                for a feature that is not pooled with "sum", or of the wrong length.
            MemoryBudgetError: a training lookup needs more distinct rows at once than
                ``memory_budget`` / ``max_rows`` hold.
            StoreError: a table's store failed; that table's memory is unchanged, while
                the tables looked up before it in this call have made this call's rows and
                counted its keys (a retry counts them twice; nothing is lost).
        """
        if not isinstance(inputs, Mapping):
            raise KeyInputError(f"inputs must be a dict of feature name -> keys, got "
                                f"{type(inputs).__name__}")
        for arg, flag in (("concat", concat), ("include_last_offset", include_last_offset)):
            if not isinstance(flag, bool):
                raise TypeError(f"{arg} must be True or False, got {flag!r}")
        missing = [f for f in self.features if f not in inputs]
        unknown = [f for f in inputs if f not in self.features]
        if missing or unknown:
            raise KeyInputError(f"inputs: missing features {missing}, unknown features "
                                f"{unknown}; expected exactly {list(self.features)}")
        given = self._check_weights(per_sample_weights)
        by_table: dict[str, list[tuple[str, KeyBatch, np.ndarray | None]]] = {}
        weights: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        kept: dict[str, np.ndarray] = {}  # unpooled features with padding keys: the others
        # Everything that can fail is checked before the lookup, which changes the tables.
        for name, spec in self.features.items():
            table = self.tables[spec.table]
            batch, bounds = self._convert(name, spec, inputs[name], table, include_last_offset)
            if batch.kind != NO_KEYS:
                self.key_kinds.setdefault(name, set()).add(batch.kind)
            if name in given:
                weights[name] = bag_weights(given[name], spec.pooling, bounds,
                                            arg=f"per_sample_weights[{name!r}]",
                                            nonfinite=table.config.nonfinite_grads,
                                            mode_arg="pooling")
            shapes[name] = ((bounds.shape[0] - 1, table.dim) if bounds is not None
                            else (*batch.shape, table.dim))
            if bounds is not None:
                batch, bounds, bag_w = drop_padding_from_bags(batch, bounds, weights.get(name),
                                                              table.padding_id)
                if bag_w is not None:
                    weights[name] = bag_w
            else:
                batch, keep = drop_padding(batch, table.padding_id)
                if keep is not None:
                    kept[name] = keep
            by_table.setdefault(spec.table, []).append((name, batch, bounds))
        if concat and (any(len(s) != 2 for s in shapes.values())
                       or len({s[0] for s in shapes.values()}) > 1):
            raise ValueError("concat=True needs every feature output to be (B, dim) with one "
                             f"B; got shapes {shapes}")

        self.weights_given.update(weights)
        all_rows, inverses = self._rows(by_table)
        outputs: dict[str, torch.Tensor] = {}
        for (table_name, group), rows, inverse in zip(by_table.items(), all_rows, inverses):
            table = self.tables[table_name]
            start = 0
            for name, batch, bounds in group:
                stop = start + batch.ids.shape[0]
                pooling = self.features[name].pooling
                if pooling is not None:
                    part = np.arange(start, stop) if inverse is None else inverse[start:stop]
                    outputs[name] = pool(rows, part, bounds, pooling, weights.get(name))
                else:
                    keyed = (rows[start:stop] if inverse is None  # one row per key already
                             else index_rows(rows, inverse[start:stop]))
                    outputs[name] = restore_padding(keyed, kept.get(name)).reshape(shapes[name])
                start = stop
        ordered = {name: outputs[name] for name in self.features}
        if not concat:
            return {name: self._deliver(out) for name, out in ordered.items()}
        return self._deliver(torch.cat(list(ordered.values()), dim=1))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}->{s.table}" + (f"({s.pooling})" if s.pooling else "")
                         for n, s in self.features.items())
