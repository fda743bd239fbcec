"""Eviction against a reference model, over random lookup sequences.

The model keeps every key's (count, last step) and which keys are in memory, and checks
each training lookup of a small table (whose eviction window is the whole arena, so the
choice is exact) over a store: the sweep removes exactly the rows the documented policy
calls expired, in memory and (its pass over the store, one block here) in the store, as a
lookup does rows it reads back expired; the budget
evicts exactly ``need + max_rows // 128`` rows, none of this lookup's, and none scoring
above a row that stays; at the end the store and memory hold every other key's metadata as
the model does (nothing lost). Ties may go either way, so the model
follows the table's choice among equal scores.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dynembed as de
from dynembed.storage import MemoryStore
from dynembed.table.index import EMPTY

POLICIES = [
    (de.policy.LRU(), None),
    (de.policy.LFU(), None),
    (de.policy.LFU(half_life=2.5), None),
    (de.policy.LFU(half_life=2.0, min_score=1.0), 2),
    (de.policy.TTL(steps=3), 1),
    (de.policy.TTL(steps=5), 4),
    (de.policy.ScoreFunction(fn=lambda c, last, s: c - 0.5 * (s - last)), None),
]


def _scores(policy, counts, last, step):
    """The documented score of each row (larger means keep)."""
    counts, last = np.asarray(counts, float), np.asarray(last, float)
    if isinstance(policy, (de.policy.LRU, de.policy.TTL)):
        return last
    if isinstance(policy, de.policy.LFU):
        decay = 1.0 if policy.half_life is None else 2.0 ** (-(step - last) / policy.half_life)
        return counts * decay
    return counts - 0.5 * (step - last)


def _expired(policy, counts, last, step):
    if isinstance(policy, de.policy.TTL):
        return step - np.asarray(last) > policy.steps
    if isinstance(policy, de.policy.LFU) and policy.min_score is not None:
        return _scores(policy, counts, last, step) < policy.min_score
    return np.zeros(len(counts), dtype=bool)


lookups = st.lists(st.lists(st.tuples(st.integers(0, 29), st.integers(1, 3)), min_size=1,
                            max_size=6), min_size=8, max_size=40)


@settings(max_examples=50, deadline=None)
@given(policy=st.sampled_from(POLICIES), limit=st.sampled_from([7, 12, 30]), calls=lookups)
# key 1 goes to the store at step 7, after the pass that started then read the store: that
# pass must end with its one block, so that step 8's sweep starts one that sees key 1
@example(policy=POLICIES[4], limit=7,
         calls=[[(0, 1)], [(0, 1)], [(0, 1)], [(1, 1)], [(4, 1), (7, 1)],
                [(2, 1), (3, 1), (5, 1), (6, 1)], [(0, 1)], [(0, 1)]])
def test_training_lookups_evict_as_the_documented_policy_says(policy, limit, calls):
    policy, evict_every = policy
    table = de.DynamicTable(de.TableConfig(dim=2, seed=1, eviction=policy, max_rows=limit,
                                           evict_every=evict_every, store=MemoryStore()))
    meta: dict[int, list[int]] = {}  # key -> [count, last step]
    memory: set[int] = set()
    step, expired_rows = 0, 0
    for call in calls:
        counts: dict[int, int] = {}
        for key, n in call:
            counts[key] = counts.get(key, 0) + n
        keys = np.array(sorted(counts), dtype=np.int64)
        table.lookup_slots(keys, np.array([counts[k] for k in keys.tolist()]), insert=True)
        known = np.array(sorted(set(meta) | set(counts)), dtype=np.int64)
        now = set(known[table.index.find(known) != EMPTY].tolist())
        evicted = memory - now
        here = set(counts)
        assert now == here | (memory - evicted)  # every key of the call has its row
        assert not evicted & here, "a row of the lookup itself was evicted"
        candidates = sorted(memory - here)
        step += 1
        swept, swept_below = set(), set()
        if evict_every and step % evict_every == 0:  # a sweep at the lookup's step
            old = [k for k in candidates if meta[k][1] != step]
            expired = _expired(policy, [meta[k][0] for k in old], [meta[k][1] for k in old],
                               step)
            swept = {k for k, e in zip(old, expired) if e}
            stored = sorted(set(meta) - memory - here)  # the store's pass: one block here
            gone = _expired(policy, [meta[k][0] for k in stored],
                            [meta[k][1] for k in stored], step)
            swept_below = {k for k, e in zip(stored, gone) if e}
        assert swept <= evicted, "an expired row stayed through the sweep"
        # expired rows are removed, not kept below memory; so are the call's own rows read
        # back from the store expired (their keys start again)
        back = [k for k in sorted(here - memory) if k in meta and meta[k][1] != step]
        stale = _expired(policy, [meta[k][0] for k in back], [meta[k][1] for k in back], step)
        for key in swept | swept_below | {k for k, e in zip(back, stale) if e}:
            del meta[key]
            expired_rows += 1
        budget = evicted - swept
        left = [k for k in candidates if k not in swept]
        need = len(memory) - len(swept) + len(here - memory) - limit
        if need <= 0:
            assert not budget, "rows were evicted under the budget"
        else:
            assert len(budget) == min(len(left), need + limit // 128)
            scores = dict(zip(left, _scores(policy, [meta[k][0] for k in left],
                                            [meta[k][1] for k in left], step - 1)))
            kept = set(left) - budget
            if budget and kept:
                assert max(scores[k] for k in budget) <= min(scores[k] for k in kept)
        for key, n in counts.items():
            row = meta.setdefault(key, [0, 0])
            row[0] += n
            row[1] = step
        memory = now
    assert table.step == step
    export = table.export()  # memory and store
    got = {int(i): [int(c), int(s)] for i, c, s in zip(export.ids, export.counts,
                                                        export.last_step)}
    assert got == meta, "an evicted row's metadata did not survive the store"
    totals = table.stats().totals
    assert totals.discarded == 0 and totals.evicted == totals.store_writes
    assert totals.expired == expired_rows
