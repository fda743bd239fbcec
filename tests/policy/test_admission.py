"""Admission policies: a key gets a row only once it has earned one.

Count-min sketch (frequency threshold, decay, fixed memory), probabilistic admission, Bloom
"seen before", admit-all; and what a table does with keys not admitted yet (default vector,
dropped gradient, counters).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynembed as de
from dynembed.kernels import sketch as k
from dynembed.table.index import EMPTY

WIDE = 1 << 16  # wide enough that a few hundred keys never share all their counters


def _table(admission=None, *, dim=4, seed=1, **kw):
    return de.DynamicTable(de.TableConfig(dim=dim, seed=seed, admission=admission, **kw))


def _lookup(table, keys, counts=None):
    """One training lookup of distinct ``keys``; returns their slots (EMPTY = no row)."""
    keys = np.asarray(keys, dtype=np.int64)
    counts = np.ones_like(keys) if counts is None else np.asarray(counts, dtype=np.int64)
    return table.lookup_slots(keys, counts, insert=True)


def _estimates(admitter, ids):
    """The sketch's current count of each id (estimate with nothing added), in lookups."""
    ids = np.asarray(ids, dtype=np.int64)
    return k.cms_estimate(admitter.sketch, ids, np.zeros_like(ids), admitter.seeds) \
        / getattr(admitter, "scale", 1)


# ---------------------------------------------------------------------- admit all
def test_default_admits_every_key_at_its_first_lookup():
    t = _table()
    assert t.config.admission is None
    slots = _lookup(t, np.arange(100))
    assert (slots != EMPTY).all() and t.size() == 100
    totals = t.stats().totals
    assert totals.not_admitted == 0 and totals.defaults_served == 0 and totals.inserts == 100


def test_admit_all_policy_admits_every_key():
    t = _table(de.policy.AdmitAll())
    slots = _lookup(t, np.arange(-50, 50), np.full(100, 3))
    assert (slots != EMPTY).all() and t.size() == 100
    assert t.stats().totals.not_admitted == 0


# ---------------------------------------------------------------------- count-min sketch
@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.tuples(st.integers(-2**63, 2**63 - 1) | st.integers(0, 40),
                                           st.integers(1, 5)), max_size=20), max_size=12),
       width=st.sampled_from([1, 4, 16]), depth=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_sketch_never_under_counts(batches, width, depth, seed):
    # A narrow sketch collides a lot: it may over-count, never under-count.
    admitter = de.policy.FrequencyAdmission(width=width, depth=depth).create(seed)
    exact: Counter = Counter()
    for step, batch in enumerate(batches, start=1):
        merged: Counter = Counter()
        for key, n in batch:
            merged[key] += n
        if not merged:
            continue
        ids = np.array(list(merged), dtype=np.int64)
        counts = np.array(list(merged.values()), dtype=np.int64)
        # the estimate with this lookup added counts it too
        want_now = np.array([exact[i] + merged[i] for i in merged])
        assert (k.cms_estimate(admitter.sketch, ids, counts, admitter.seeds) >= want_now).all()
        admitter.record(ids, counts, step)
        exact.update(merged)
    if exact:
        keys = list(exact)
        assert (_estimates(admitter, keys) >= np.array([exact[i] for i in keys])).all()


@settings(max_examples=40, deadline=None)
@given(stream=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=8), max_size=15),
       threshold=st.integers(1, 4), width=st.sampled_from([2, 8, 64]))
def test_a_key_gets_its_row_no_later_than_its_threshold_th_lookup(stream, threshold, width):
    # Over-counting can only admit early; a key that reached the threshold has its row.
    t = _table(de.policy.FrequencyAdmission(threshold=threshold, width=width, depth=2))
    seen: Counter = Counter()
    for batch in stream:
        ids, counts = np.unique(np.array(batch, dtype=np.int64), return_counts=True)
        slots = _lookup(t, ids, counts)
        seen.update(dict(zip(ids.tolist(), counts.tolist())))
        due = np.array([seen[i] >= threshold for i in ids.tolist()])
        assert (slots[due] != EMPTY).all()
        # a key with a row keeps it (no budget here)
    earned = [i for i, n in seen.items() if n >= threshold]
    assert t.contains(earned).all()


def test_admission_happens_exactly_at_the_threshold_th_lookup():
    keys = np.arange(1000, 1200)
    t = _table(de.policy.FrequencyAdmission(threshold=3, width=WIDE, depth=4))
    assert (_lookup(t, keys) == EMPTY).all()
    assert (_lookup(t, keys) == EMPTY).all()
    assert t.size() == 0
    assert (_lookup(t, keys) != EMPTY).all()
    assert t.size() == 200
    totals = t.stats().totals
    assert totals.not_admitted == 400 and totals.inserts == 200


def test_occurrences_within_one_lookup_count_towards_the_threshold():
    t = _table(de.policy.FrequencyAdmission(threshold=3, width=WIDE))
    slots = _lookup(t, [1, 2, 3], [3, 2, 1])
    assert (slots != EMPTY).tolist() == [True, False, False]
    slots = _lookup(t, [2, 3], [1, 1])
    assert (slots != EMPTY).tolist() == [True, False]
    assert t.stats().totals.not_admitted == 2 + 1 + 1


def test_frequency_admission_through_the_module_with_duplicates():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1,
                              admission=de.policy.FrequencyAdmission(threshold=2, width=WIDE),
                              max_rows=1000)
    assert emb.table.max_rows == 1000
    emb(torch.tensor([5, 6])).sum().backward()
    assert emb.table.size() == 0
    emb(torch.tensor([5, 5, 7])).sum().backward()  # 5 reaches 2 here; 7 is at 1
    assert emb.table.contains([5, 6, 7]).tolist() == [True, False, False]


def test_decay_halves_counts_so_a_key_needs_more_lookups():
    pol = de.policy.FrequencyAdmission(threshold=3, width=WIDE, decay=0.5, decay_every=10)
    plain = _table(de.policy.FrequencyAdmission(threshold=3, width=WIDE))
    decayed = _table(pol)
    for t in (plain, decayed):
        _lookup(t, [5])
        _lookup(t, [5])  # count 2
        for i in range(10):  # steps 3..12 with unseen keys; the decay falls at step 10
            _lookup(t, [10_000 + i])
    assert _estimates(plain.admitter, [5])[0] == 2
    assert _estimates(decayed.admitter, [5])[0] == 1
    assert (_lookup(plain, [5]) != EMPTY).all()  # 2 + 1 reaches 3
    assert (_lookup(decayed, [5]) == EMPTY).all()  # 1 + 1 does not
    assert (_lookup(decayed, [5]) != EMPTY).all()


def test_decay_applies_even_when_the_steps_between_are_all_hits():
    # Steps pass while only admitted keys are looked up; the decay periods that elapsed
    # still apply to the next decision: count 2 decays to 0 over 3 periods of halving.
    pol = de.policy.FrequencyAdmission(threshold=3, width=WIDE, decay=0.5, decay_every=10)
    t = _table(pol)
    assert (_lookup(t, [99], [3]) != EMPTY).all()  # admitted at once
    _lookup(t, [5])
    _lookup(t, [5])  # count 2
    for _ in range(30):
        _lookup(t, [99])  # hits only
    assert t.step == 33
    assert (_lookup(t, [5]) == EMPTY).all(), "decayed count 0 + 1 must not reach 3"


def test_decay_zero_forgets_everything():
    t = _table(de.policy.FrequencyAdmission(threshold=2, width=WIDE, decay=0.0, decay_every=2))
    _lookup(t, [5])  # step 1, count 1
    _lookup(t, [6])  # step 2: the decay zeroes the sketch before 6 is added
    assert _estimates(t.admitter, [5])[0] == 0
    assert (_lookup(t, [5]) == EMPTY).all()


def test_a_key_looked_up_at_every_step_under_slow_decay_is_admitted():
    """Decayed integer counters were truncated: with decay=0.99 each step, every count below
    100 lost a whole lookup per step, so a key looked up at every step stayed at 1 and was
    never admitted. Its count is 1, 1.99, 2.97, then 3.94 >= 3 at the 4th lookup."""
    pol = de.policy.FrequencyAdmission(threshold=3, width=WIDE, decay=0.99, decay_every=1)
    t = _table(pol)
    admitted = [bool((_lookup(t, [7]) != EMPTY).all()) for _ in range(6)]
    assert admitted == [False, False, False, True, True, True]


@pytest.mark.parametrize("decay, periods, want", [(0.9, 1, 4.5), (0.99, 1, 4.95),
                                                  (0.5, 3, 0.625), (0.999, 10, 5 * 0.999**10)])
def test_decay_takes_off_the_fraction_it_names(decay, periods, want):
    admitter = de.policy.FrequencyAdmission(threshold=2, width=WIDE, decay=decay,
                                            decay_every=10).create(0)
    ids = np.array([5], dtype=np.int64)
    admitter.record(ids, np.array([5]), 1)
    admitter.decide(ids, np.ones(1, dtype=np.int64), 1 + 10 * periods)  # applies the decays
    assert _estimates(admitter, ids)[0] == pytest.approx(want, abs=periods / 2**16)


def test_a_sketch_saved_before_counts_were_scaled_loads_as_the_same_counts():
    decaying = de.policy.FrequencyAdmission(threshold=3, width=WIDE, decay=0.5, decay_every=10)
    ids = np.array([5, 6], dtype=np.int64)
    old = de.policy.FrequencyAdmission(threshold=3, width=WIDE).create(0)
    old.record(ids, np.array([2, 40_000]), 1)
    state = {key: value for key, value in old.state_dict().items() if key != "scale"}
    admitter = decaying.create(0)
    admitter.load_state_dict(state)  # integer counts, as saved before
    saturated = (2**31 - 1) / 2**16  # 40,000 lookups saturate the scaled counters
    assert _estimates(admitter, ids).tolist() == [2, saturated]
    merged = decaying.create(0)
    merged.merge_state_dict(state)
    assert _estimates(merged, ids).tolist() == [2, saturated]
    again = de.policy.FrequencyAdmission(threshold=3, width=WIDE).create(0)
    again.load_state_dict(admitter.state_dict())  # and back into a policy without decay
    assert _estimates(again, ids).tolist() == [2, 32767]
    assert not again.decide(ids[:1], np.zeros(1, dtype=np.int64), 2).any()
    assert again.decide(ids[:1], np.ones(1, dtype=np.int64), 2).all()  # 2 + 1 reaches 3


def test_a_decaying_threshold_beyond_the_scaled_counters_is_refused():
    with pytest.raises(ValueError, match=r"threshold must be at most 32767 with decay_every"):
        de.policy.FrequencyAdmission(threshold=40_000, decay_every=10)
    de.policy.FrequencyAdmission(threshold=32767, decay_every=10)
    de.policy.FrequencyAdmission(threshold=40_000)


def test_sketch_memory_is_fixed():
    pol = de.policy.FrequencyAdmission(threshold=2, width=1000, depth=3)
    t = _table(pol)
    sketch = t.admitter.sketch
    assert sketch.shape == (3, 1024) and sketch.dtype == np.int32  # width rounded up
    assert sketch.nbytes == 4 * 3 * 1024
    for start in range(0, 50_000, 5_000):
        _lookup(t, np.arange(start, start + 5_000))
    assert t.admitter.sketch is sketch and sketch.shape == (3, 1024)
    default = de.policy.FrequencyAdmission().create(0).sketch
    assert default.nbytes == 16 * 2**20  # "16 MiB by default"
    assert de.policy.FrequencyAdmission(width=1 << 10, depth=1).create(0).sketch.shape \
        == (1, 1024)


def test_sketch_counters_saturate_instead_of_wrapping():
    admitter = de.policy.FrequencyAdmission(width=64, depth=2).create(0)
    ids = np.array([7], dtype=np.int64)
    admitter.record(ids, np.array([2**40], dtype=np.int64), 1)
    admitter.record(ids, np.array([2**40], dtype=np.int64), 2)
    assert _estimates(admitter, ids)[0] == 2**31 - 1
    assert admitter.decide(ids, np.ones(1, dtype=np.int64), 3).all()


@pytest.mark.parametrize("arg, value", [
    ("width", 0), ("width", -4), ("width", 2.5), ("width", True),
    ("depth", 0), ("depth", 1.0), ("threshold", 0), ("decay_every", 0),
])
def test_sketch_arguments_are_validated_by_name(arg, value):
    with pytest.raises(ValueError, match=arg):
        de.policy.FrequencyAdmission(**{arg: value})


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, "half"])
def test_decay_must_be_below_one(decay):
    with pytest.raises(ValueError, match="decay"):
        de.policy.FrequencyAdmission(decay=decay, decay_every=10)


def test_sketch_bounds_are_named():
    """threshold 2**40 was accepted though int32 counters stop at 2**31 - 1 (no key was ever
    admitted); width 2**40 failed with numpy's MemoryError naming no argument."""
    with pytest.raises(ValueError, match="threshold must be at most 2147483647"):
        de.policy.FrequencyAdmission(threshold=2**40)
    with pytest.raises(ValueError, match="width x depth must be at most"):
        de.policy.FrequencyAdmission(width=2**40)
    de.policy.FrequencyAdmission(threshold=2**31 - 1)


def test_same_seed_same_sketch_hashes():
    a = de.policy.FrequencyAdmission(width=256).create(7)
    b = de.policy.FrequencyAdmission(width=256).create(7)
    ids = np.arange(500, dtype=np.int64)
    for x in (a, b):
        x.record(ids, np.ones_like(ids), 1)
    assert np.array_equal(a.sketch, b.sketch)


# ---------------------------------------------------------------------- probabilistic
N_COIN = 20_000


def test_probabilistic_admission_rate_is_p():
    p = 0.3
    t = _table(de.policy.ProbabilisticAdmission(probability=p), seed=3)
    admitted = int(np.count_nonzero(_lookup(t, np.arange(N_COIN)) != EMPTY))
    sigma = math.sqrt(N_COIN * p * (1 - p))
    assert abs(admitted - p * N_COIN) < 5 * sigma
    assert t.size() == admitted
    assert t.stats().totals.not_admitted == N_COIN - admitted


def test_probabilistic_draws_again_at_every_lookup():
    # Seen twice, a key has a row with probability 1 - (1 - p)**2.
    p = 0.3
    t = _table(de.policy.ProbabilisticAdmission(probability=p), seed=3)
    _lookup(t, np.arange(N_COIN))
    _lookup(t, np.arange(N_COIN))
    want = 1 - (1 - p) ** 2
    sigma = math.sqrt(N_COIN * want * (1 - want))
    assert abs(t.size() - want * N_COIN) < 5 * sigma


def test_probabilistic_counts_every_occurrence_within_a_call():
    """A key seen 4 times in one call had one coin (p), not 1 - (1 - p)**4 as documented
    and as FrequencyAdmission counts occurrences."""
    p = 0.3
    t = _table(de.policy.ProbabilisticAdmission(probability=p), seed=3)
    _lookup(t, np.arange(N_COIN), np.full(N_COIN, 4))
    want = 1 - (1 - p) ** 4
    sigma = math.sqrt(N_COIN * want * (1 - want))
    assert abs(t.size() - want * N_COIN) < 5 * sigma


def test_probabilistic_admission_is_deterministic_per_seed():
    def admitted(seed):
        t = _table(de.policy.ProbabilisticAdmission(probability=0.5), seed=seed)
        first = _lookup(t, np.arange(2000)) != EMPTY
        second = _lookup(t, np.arange(1000, 3000)) != EMPTY
        return np.concatenate([first, second])

    assert np.array_equal(admitted(11), admitted(11))
    assert not np.array_equal(admitted(11), admitted(12))


def test_probability_one_admits_everything():
    t = _table(de.policy.ProbabilisticAdmission(probability=1.0))
    assert (_lookup(t, np.arange(5000)) != EMPTY).all()


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.01, 2, float("nan"), True, "0.3", None])
def test_probability_is_validated(p):
    with pytest.raises(ValueError, match="probability"):
        de.policy.ProbabilisticAdmission(probability=p)


# ---------------------------------------------------------------------- Bloom
def test_bloom_first_sighting_not_admitted_second_admitted():
    t = _table(de.policy.BloomAdmission(expected_keys=100_000, false_positive_rate=0.01))
    keys = np.arange(5000) * 7919
    assert (_lookup(t, keys) == EMPTY).all()
    assert t.size() == 0
    assert (_lookup(t, keys) != EMPTY).all()  # no false negatives
    totals = t.stats().totals
    assert totals.not_admitted == 5000 and totals.inserts == 5000


def test_bloom_false_positive_rate_near_the_configured_rate():
    # 10_500 keys at 5% need 65_473 bits: the filter gets 2**16, so its rate is about 5%.
    n, p, unseen = 10_500, 0.05, 20_000
    t = _table(de.policy.BloomAdmission(expected_keys=n, false_positive_rate=p), seed=5)
    _lookup(t, np.arange(n))  # one batch: judged against the empty filter
    assert t.size() == 0
    # one batch of unseen keys is judged against the filter holding the n keys
    admitted = _lookup(t, np.arange(10**9, 10**9 + unseen)) != EMPTY
    rate = np.count_nonzero(admitted) / unseen
    sigma = math.sqrt(p * (1 - p) / unseen)
    assert abs(rate - p) < 6 * sigma + 0.005, rate


def test_bloom_rate_stays_below_the_configured_rate():
    n, p, unseen = 20_000, 0.01, 50_000
    admitter = de.policy.BloomAdmission(expected_keys=n, false_positive_rate=p).create(9)
    ids = np.arange(n, dtype=np.int64) * 31 + 17
    admitter.record(ids, np.ones_like(ids), 1)
    probe = -np.arange(1, unseen + 1, dtype=np.int64)
    rate = np.count_nonzero(admitter.decide(probe, np.ones_like(probe), 2)) / unseen
    assert rate <= p + 4 * math.sqrt(p * (1 - p) / unseen)


@pytest.mark.parametrize("kw, arg", [
    ({"expected_keys": 0}, "expected_keys"), ({"expected_keys": 1.5}, "expected_keys"),
    ({"false_positive_rate": 0.0}, "false_positive_rate"),
    ({"false_positive_rate": 1.0}, "false_positive_rate"),
    ({"false_positive_rate": -0.5}, "false_positive_rate"),
])
def test_bloom_arguments_are_validated(kw, arg):
    with pytest.raises(ValueError, match=arg):
        de.policy.BloomAdmission(**kw)


def test_admission_must_be_a_policy():
    with pytest.raises(TypeError, match="admission"):
        de.TableConfig(dim=4, admission="bloom")


# ---------------------------------------------------------------------- not admitted yet
def test_unadmitted_key_gets_default_vector_and_no_gradient_then_trains():
    lr = 0.1
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=lr), seed=1, default_value=0.5,
                              admission=de.policy.FrequencyAdmission(threshold=3, width=WIDE))
    emb.train()
    out = emb(torch.tensor([7, 7, 8]))  # 7 at count 2, 8 at 1: neither admitted
    assert torch.equal(out, torch.full((3, 4), 0.5))
    assert out.requires_grad
    out.sum().backward()
    t = emb.table
    assert t.size() == 0 and not t.contains([7, 8]).any()
    totals = t.stats().totals
    assert totals.not_admitted == 3  # key occurrences
    assert totals.defaults_served == 3
    assert totals.unadmitted_gradients == 2  # one gradient row per distinct key
    assert totals.updated_rows == 0 and totals.inserts == 0

    out = emb(torch.tensor([7, 8, 8, 9]))  # 7 and 8 reach 3; 9 is at 1
    initial = de.DynamicTable(de.TableConfig(dim=4, seed=1)).find_or_insert([7, 8]).values
    assert torch.equal(out[0], initial[0])
    assert torch.equal(out[1], initial[1]) and torch.equal(out[2], initial[1])
    assert torch.equal(out[3], torch.full((4,), 0.5))
    (out * 2).sum().backward()
    assert t.contains([7, 8, 9]).tolist() == [True, True, False]
    torch.testing.assert_close(t.find([7]).values[0], initial[0] - lr * 2)
    torch.testing.assert_close(t.find([8]).values[0], initial[1] - lr * 4)
    totals = t.stats().totals
    assert totals.not_admitted == 4 and totals.defaults_served == 4
    assert totals.unadmitted_gradients == 3 and totals.updated_rows == 2
    assert totals.inserts == 2
    assert totals.skipped_gradients == 0  # unadmitted rows are not counted twice


def test_unadmitted_keys_in_eval_are_not_recorded():
    emb = de.DynamicEmbedding(dim=4, seed=1, optimizer=de.optim.SGD(lr=0.1),
                              admission=de.policy.FrequencyAdmission(threshold=2, width=WIDE))
    emb.eval()
    for _ in range(5):
        emb(torch.tensor([3]))
    assert not emb.table.admitter.sketch.any()
    emb.train()
    emb(torch.tensor([3]))
    assert emb.table.size() == 0


def test_deferred_mode_counts_unadmitted_gradients():
    emb = de.DynamicEmbedding(dim=4, seed=1, optimizer=de.optim.SGD(lr=0.1),
                              update_mode="deferred",
                              admission=de.policy.FrequencyAdmission(threshold=2, width=WIDE))
    emb(torch.tensor([1, 2])).sum().backward()
    emb.sparse_step()
    totals = emb.stats().totals
    assert totals.unadmitted_gradients == 2 and totals.updated_rows == 0
    assert totals.skipped_gradients == 0
    assert emb.table.size() == 0


def test_find_or_insert_bypasses_admission():
    t = _table(de.policy.FrequencyAdmission(threshold=5, width=WIDE))
    assert t.find_or_insert([1, 2]).inserted.all()
    assert t.size() == 2 and t.stats().totals.not_admitted == 0


@pytest.mark.parametrize("make, field, plain", [
    (lambda: de.policy.FrequencyAdmission(threshold=np.int64(3)), "threshold", 3),
    (lambda: de.policy.FrequencyAdmission(decay=np.float32(0.5), decay_every=10), "decay", 0.5),
    (lambda: de.policy.ProbabilisticAdmission(probability=np.float64(0.25)), "probability",
     0.25),
    (lambda: de.policy.BloomAdmission(false_positive_rate=np.float32(0.5)),
     "false_positive_rate", 0.5),
])
def test_numpy_numbers_are_taken_as_python_numbers(make, field, plain):
    """They were refused with "must be an int >= 1, got np.int64(3)" (optimizers take them);
    kept, they would not serialise to JSON."""
    policy = make()
    value = getattr(policy, field)
    assert value == plain and type(value) is type(plain)


@pytest.mark.parametrize("make, arg", [
    (lambda: de.policy.FrequencyAdmission(decay=False, decay_every=10), "decay"),
    (lambda: de.policy.FrequencyAdmission(threshold=np.bool_(True)), "threshold"),
    (lambda: de.policy.BloomAdmission(false_positive_rate=True), "false_positive_rate"),
])
def test_bools_are_not_numbers(make, arg):
    with pytest.raises(ValueError, match=f"{arg} must be"):
        make()


@pytest.mark.parametrize("kw", [{"expected_keys": 10**13},
                                {"expected_keys": 10**9, "false_positive_rate": 1e-300}])
def test_bloom_size_is_capped_and_the_arguments_named(kw):
    """A huge expected_keys or a tiny false_positive_rate tried to allocate terabytes at the
    table's creation (numpy's MemoryError, naming no argument)."""
    with pytest.raises(ValueError, match="expected_keys.*false_positive_rate.*at most"):
        de.policy.BloomAdmission(**kw)
    de.policy.BloomAdmission(expected_keys=10**9, false_positive_rate=1e-6)  # 4 GiB: the most


@pytest.mark.parametrize("kw", [{"expected_keys": 1000, "false_positive_rate": 1e-300},
                                {"expected_keys": 1826, "false_positive_rate": 1e-15}])
def test_bloom_probes_per_key_are_capped_and_the_arguments_named(kw):
    """A tiny false_positive_rate with few expected_keys fit the size cap but gave about
    1,000 hash probes per key, so every lookup was slow."""
    with pytest.raises(ValueError, match="false_positive_rate.*expected_keys.*at most 80 "
                                         "hash probes.*1e-12"):
        de.policy.BloomAdmission(**kw)
    for n in (1, 285, 1142, 10**6):  # 1e-12 fits the cap at any size (80 probes at 285)
        de.policy.BloomAdmission(expected_keys=n, false_positive_rate=1e-12)
