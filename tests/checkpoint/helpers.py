"""Shared builders and comparisons for the checkpoint tests."""

from __future__ import annotations

import numpy as np
import torch

import dynembed as de


def make_table(**options) -> de.DynamicTable:
    config = {"dim": 8, "optimizer": de.optim.Adagrad(lr=0.1), "seed": 7}
    config.update(options)
    return de.DynamicTable(de.TableConfig(**config))


def train(table: de.DynamicTable, batches, seed: int = 0) -> None:
    """Training lookups and gradient steps on the table (deterministic)."""
    rng = np.random.default_rng(seed)
    for ids in batches:
        ids = np.asarray(ids, dtype=np.int64)
        unique = np.unique(ids)
        counts = np.ones_like(unique)
        slots = table.lookup_slots(unique, counts, insert=True)
        grads = torch.from_numpy(rng.standard_normal((unique.shape[0], table.dim))
                                 .astype(np.float32))
        table.apply_gradients(unique, slots, grads, erasures_at_lookup=table.erasures)


def batches(n: int, keys: int, size: int = 200, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-keys, keys, size) for _ in range(n)]


def rows_by_id(table: de.DynamicTable) -> dict[str, np.ndarray]:
    """The table's rows (memory, store and lazy checkpoint) sorted by id."""
    export = table.export()
    order = np.argsort(export.ids.numpy())
    return {"ids": export.ids.numpy()[order], "weights": export.weights.numpy()[order],
            "state": export.optimizer_state.numpy()[order],
            "counts": export.counts.numpy()[order],
            "last_step": export.last_step.numpy()[order]}


def assert_same_rows(a: de.DynamicTable, b: de.DynamicTable) -> None:
    ra, rb = rows_by_id(a), rows_by_id(b)
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)


def assert_same_counters(a: de.DynamicTable, b: de.DynamicTable) -> None:
    assert (a.step, a.update_step, a.seed) == (b.step, b.update_step, b.seed)
