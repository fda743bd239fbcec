"""Sampled softmax: consistent with the full softmax, sparse updates, hits, shapes, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.sampling import InBatch, LogUniform, Uniform, Unigram

V, D = 30, 6


def output_table(optimizer=None) -> de.DynamicEmbedding:
    out = de.DynamicEmbedding(dim=D, optimizer=optimizer, seed=3,
                              initializer=de.init.Normal(std=1.0))
    ids = np.arange(V)
    out.table.lookup_slots(ids, (ids + 1) ** 2, insert=True)  # skewed counts
    return out


def gradient(loss_fn, x):
    x = x.clone().requires_grad_(True)
    loss_fn(x).backward()
    return x.grad


@pytest.mark.parametrize("sampler", [Uniform(), Unigram(power=1.0), LogUniform()])
def test_logq_corrected_gradient_estimates_the_full_softmax_gradient(sampler):
    out = output_table()
    out.eval()  # read rows only: the table stays as it is
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 5, 17, 29])
    weights = out.table.find(np.arange(V)).values

    def full(x):
        return torch.nn.functional.cross_entropy(x @ weights.T, labels)

    exact = gradient(full, x)
    rng = np.random.default_rng(1)
    estimates = [gradient(lambda x: de.sampled_softmax_loss(
        out, x, labels, num_sampled=4000, sampler=sampler, generator=rng,
        remove_accidental_hits=False), x) for _ in range(8)]
    mean = torch.stack(estimates).mean(0)
    assert (mean - exact).norm() / exact.norm() < 0.05
    if not isinstance(sampler, Uniform):  # without the correction a skewed sampler is off
        biased = gradient(lambda x: de.sampled_softmax_loss(
            out, x, labels, num_sampled=4000, sampler=sampler, generator=rng,
            remove_accidental_hits=False, logq_correction=False), x)
        assert (biased - exact).norm() / exact.norm() > 0.1


def test_training_updates_positives_and_negatives_without_inserting_negatives():
    out = output_table(optimizer=de.optim.SGD(lr=0.5))
    before = out.table.export()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    got = de.sampled_logits(out, x, [[100], [101, 5], [7]], num_sampled=8, generator=0)
    log_p = torch.log_softmax(got.logits, 1)
    (-(got.targets * torch.where(got.targets > 0, log_p, 0)).sum(1).mean()).backward()
    after = out.table.export()
    assert len(out.table) == V + 2  # the new positives 100 and 101, and no negative
    old = {int(i): w for i, w in zip(before.ids, before.weights)}
    changed = {int(i) for i, w in zip(after.ids, after.weights)
               if int(i) in old and not torch.equal(w, old[int(i)])}
    sampled = set(got.sampled_ids.tolist())
    assert changed == ({5, 7} | sampled) - {100, 101}  # the positives' new rows are not in old
    counts = dict(zip(after.ids.tolist(), after.counts.tolist()))
    assert all(counts[i] == (i + 1) ** 2 for i in sampled - {5, 7, 100, 101})


def test_accidental_hits_are_masked_and_targets_spread_over_positives():
    out = output_table()
    out.eval()
    x = torch.randn(2, D)
    got = de.sampled_logits(out, x, [[1, 2, 3], [4]], num_sampled=50, sampler=Uniform(),
                            generator=5)
    sampled = got.sampled_ids
    negatives = got.logits[:, 3:]
    masked = de.sampling.softmax.MASKED
    assert (negatives[0, torch.from_numpy(np.isin(sampled, [1, 2, 3]))] == masked).all()
    assert (negatives[1, torch.from_numpy(sampled == 4)] == masked).all()
    assert (negatives[0, torch.from_numpy(~np.isin(sampled, [1, 2, 3]))] > masked).all()
    assert (got.logits[1, 1:3] == masked).all()  # padding of the one-positive example
    loss = torch.nn.functional.cross_entropy(got.logits, got.targets)  # a standard loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(got.targets.sum(1), torch.ones(2))
    assert got.targets[0, :3].tolist() == pytest.approx([1 / 3] * 3)


def test_string_keys_and_in_batch_negatives_train_a_model():
    torch.manual_seed(0)
    out = de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.2), seed=1, key_log=True)
    inp = de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.2), seed=2)
    pairs = [(f"q{i}", f"item{i % 10}") for i in range(40)]
    losses = []
    for step in range(60):
        batch = pairs[(step * 8) % 40:(step * 8) % 40 + 8]
        x = inp([q for q, _ in batch])
        loss = de.sampled_softmax_loss(out, x, [t for _, t in batch], num_sampled=0,
                                       sampler=InBatch(), generator=step)
        loss.backward()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    best = out.table.top_k(inp.table.find(["q3"]).values[0], 1)
    assert best.keys == ["item3"]  # the query's own item is its nearest output row


@pytest.mark.parametrize("labels,match", [([1, 2], "labels has 2 examples"),
                                          ([[1], [], [2]], "example 1 has no positive")])
def test_bad_labels_are_named(labels, match):
    out = output_table()
    with pytest.raises(ValueError, match=match):
        de.sampled_softmax_loss(out, torch.zeros(3, D), labels, num_sampled=2)


def test_bad_arguments_are_named():
    out = output_table()
    with pytest.raises(ValueError, match="num_sampled"):
        de.sampled_softmax_loss(out, torch.zeros(1, D), [1], num_sampled=-1)
    with pytest.raises(ValueError, match=r"inputs must have shape \(batch, 6\)"):
        de.sampled_softmax_loss(out, torch.zeros(1, 5), [1], num_sampled=2)
    with pytest.raises(ValueError, match="reduction"):
        de.sampled_softmax_loss(out, torch.zeros(1, D), [1], num_sampled=2, reduction="avg")
    with pytest.raises(TypeError, match="DynamicEmbedding"):
        de.sampled_softmax_loss(out.table, torch.zeros(1, D), [1], num_sampled=2)
    with pytest.raises(TypeError, match="sampler must be"):
        de.sampled_softmax_loss(out, torch.zeros(1, D), [1], num_sampled=2, sampler="unigram")
    with pytest.raises(TypeError, match="generator must be"):
        de.sampled_softmax_loss(out, torch.zeros(1, D), [1], num_sampled=2, generator="seed")
    with pytest.raises(TypeError, match="inputs must be"):
        de.sampled_softmax_loss(out, np.zeros((1, D)), [1], num_sampled=2)
    with pytest.raises(ValueError, match="temperature"):
        de.sampled_softmax_loss(out, torch.zeros(1, D), [1], num_sampled=2,
                                temperature=float("inf"))


@pytest.mark.parametrize("sampler", [Uniform(), Unigram(), LogUniform()])
def test_training_is_deterministic_with_seeds(sampler):
    def run():
        out = output_table(optimizer=de.optim.Adagrad(lr=0.1))
        x = torch.randn(8, D, generator=torch.Generator().manual_seed(4))
        rng = np.random.default_rng(11)
        losses = []
        for step in range(5):
            loss = de.sampled_softmax_loss(out, x, list(range(step, step + 8)), num_sampled=6,
                                           sampler=sampler, generator=rng)
            loss.backward()
            losses.append(loss.item())
        return losses, out.table.export()

    (la, ea), (lb, eb) = run(), run()
    assert la == lb
    assert torch.equal(ea.ids, eb.ids) and torch.equal(ea.weights, eb.weights)


def test_a_positive_repeated_in_an_example_counts_once():
    out = output_table()
    out.eval()
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "sampled_softmax_loss with num_sampled=0")  # hence 0
        once = de.sampled_softmax_loss(out, x, [[1]], num_sampled=0)
        twice = de.sampled_softmax_loss(out, x, [[1, 1]], num_sampled=0)
    assert once.item() == pytest.approx(0.0) and twice.item() == pytest.approx(0.0)


def test_a_loss_without_negatives_is_warned_about():
    """num_sampled=0 with a sampler that draws: every single-positive example's loss was 0,
    silently, and nothing trained."""
    out = output_table()
    x = torch.randn(2, D)
    with pytest.warns(RuntimeWarning, match="num_sampled=0 and no InBatch sampler"):
        loss = de.sampled_softmax_loss(out, x, [1, 2], num_sampled=0, sampler=Unigram())
    assert loss.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # InBatch draws its negatives from the batch
        de.sampled_softmax_loss(out, x, [1, 2], num_sampled=0, sampler=InBatch())
        de.sampled_softmax_loss(out, x, [1, 2], num_sampled=2)


def test_a_lazily_restored_output_table_is_warned_about_once(tmp_path):
    """After a lazy restore the negatives came only from the rows looked up since (800 of
    4,000 after 50 steps of 16 labels), silently."""
    out = output_table()
    with torch.no_grad():
        out(torch.arange(100))
    de.checkpoint.save(tmp_path / "c", out)
    restored = output_table()
    de.checkpoint.load(tmp_path / "c", restored, lazy=True)
    x = torch.randn(2, D)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        de.sampled_logits(restored, x, [1, 2], num_sampled=4)
        de.sampled_logits(restored, x, [3, 4], num_sampled=4)  # once per table
    warned = [w for w in seen if "restored lazily and has 2 rows in memory" in str(w.message)]
    assert len(warned) == 1 and warned[0].category is RuntimeWarning
    assert warned[0].filename == __file__  # points at the caller
    de.checkpoint.load_step(restored.table)  # the way out the message names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        de.sampled_logits(restored, x, [1, 2], num_sampled=4)


def test_negatives_are_drawn_after_the_positives_lookup_under_a_budget():
    out = de.DynamicEmbedding(dim=D, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=10,
                              eviction=de.policy.LRU(), initializer=de.init.Normal(std=1.0))
    out.table.lookup_slots(np.arange(10), np.ones(10, np.int64), insert=True)  # full
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(7))
    got = de.sampled_logits(out, x, [100, 101], num_sampled=20, generator=0)
    assert out.table.contains(got.sampled_ids).all()  # every negative is a live row
    rows = out.table.find(got.sampled_ids).values
    expected = x @ rows.T - float(np.log(20 / len(out.table)))
    hits = torch.from_numpy(np.isin(got.sampled_ids, [100, 101]))
    torch.testing.assert_close(got.logits[:, 1:][:, ~hits], expected[:, ~hits])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_inputs_of_other_float_dtypes_are_scored_in_float32(dtype):
    """float64 and bfloat16 inputs failed inside torch with an unnamed dtype mismatch."""
    out = output_table(de.optim.SGD(lr=0.1))
    x = torch.randn(4, D).to(dtype).requires_grad_(True)
    kwargs = {"num_sampled": 5, "generator": 0}
    loss = de.sampled_softmax_loss(out, x, [1, 2, 3, 4], **kwargs)
    want = de.sampled_softmax_loss(output_table(de.optim.SGD(lr=0.1)), x.detach().float(),
                                   [1, 2, 3, 4], **kwargs)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    with pytest.raises(TypeError, match="inputs must be a float tensor, got torch.int64"):
        de.sampled_softmax_loss(out, torch.zeros(1, D, dtype=torch.int64), [1], num_sampled=2)


@pytest.mark.parametrize("sampler,num", [(InBatch(), 5), (Uniform(), 0)])
def test_an_empty_batch_without_negatives(sampler, num):
    """It raised an IndexError; the mean of no examples is NaN, as torch's cross_entropy."""
    out = output_table()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "sampled_softmax_loss with num_sampled=0")
        none = de.sampled_softmax_loss(out, torch.zeros(0, D),
                                       torch.empty(0, dtype=torch.int64), num_sampled=num,
                                       sampler=sampler, reduction="none")
        assert none.shape == (0,)
        mean = de.sampled_softmax_loss(out, torch.zeros(0, D), [], num_sampled=num,
                                       sampler=sampler)
    assert torch.isnan(mean)


def test_labels_given_as_a_tuple():
    """Every 2-tuple was read as (keys, offsets): ([10, 11], [0, 1]) trained one positive
    per example where [[10, 11], [0, 1]] gives two, and (3, 7) was an unsupported
    container."""
    out, x = output_table(), torch.randn(2, D)

    def positives(labels):
        return de.sampled_logits(out, x, labels, num_sampled=0, generator=0) \
            .targets.gt(0).sum(1).tolist()

    with pytest.raises(de.errors.KeyInputError, match="labels: a tuple of two flat int lists"):
        positives(([10, 11], [0, 1]))
    assert positives((3, 7)) == positives([3, 7]) == [1, 1]
    assert positives(("a", "b")) == [1, 1]
    assert positives((torch.tensor([4, 5, 6]), torch.tensor([0, 1]))) == [1, 2]
    assert positives(([4, 5, 6], np.array([0, 2]))) == [2, 1]


@pytest.mark.parametrize("flag", ["remove_accidental_hits", "logq_correction", "normalize"])
@pytest.mark.parametrize("value", ["no", None, 1])
def test_flags_must_be_bools(flag, value):
    """normalize="no" switched cosine scoring on and logq_correction=None turned the
    correction off, silently."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got {value!r}"):
        de.sampled_softmax_loss(output_table(), torch.randn(2, D), [1, 2], num_sampled=3,
                                **{flag: value})


def test_in_batch_negatives_in_eval_include_positives_whose_rows_are_in_the_store():
    """Eval reads positives from the store, but the in-batch negatives were the positives
    found in memory only, so evicting rows changed the eval logits (fewer negatives)."""
    out = de.DynamicEmbedding(dim=D, seed=3, optimizer=de.optim.SGD(lr=0.1),
                              initializer=de.init.Normal(std=1.0), max_rows=100,
                              eviction=de.policy.LRU(), store=de.storage.MemoryStore())
    out(torch.arange(8)).sum().backward()
    out.eval()
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 5, 7])
    # uncorrected: the correction's total covers memory's rows, which shifts every logit
    # alike (the loss stays; see the next test)
    before = de.sampled_logits(out, x, labels, num_sampled=0, sampler=InBatch(),
                               logq_correction=False)
    assert out.table.evict(rows=6) == 6  # most of the batch's rows now live in the store
    assert len(out.table) == 2
    after = de.sampled_logits(out, x, labels, num_sampled=0, sampler=InBatch(),
                              logq_correction=False)
    assert sorted(after.sampled_ids.tolist()) == [0, 3, 5, 7]
    np.testing.assert_array_equal(after.sampled_ids, before.sampled_ids)
    torch.testing.assert_close(after.logits, before.logits)
    # a label with a row nowhere is no negative (as a training lookup that did not admit it)
    unseen = de.sampled_logits(out, x, torch.tensor([0, 3, 5, 99]), num_sampled=0,
                               sampler=InBatch())
    assert sorted(unseen.sampled_ids.tolist()) == [0, 3, 5]


@pytest.mark.parametrize("sampler", [Uniform(), InBatch()])
def test_eval_counts_the_labels_as_an_eval_lookup_of_them_does(sampler):
    """Labels whose rows were in the store were counted as hits in memory, not as misses
    read from the store (``loaded``), unlike an eval lookup of the same labels."""
    def trained():
        out = de.DynamicEmbedding(dim=D, seed=3, optimizer=de.optim.SGD(lr=0.1),
                                  max_rows=100, eviction=de.policy.LRU(),
                                  store=de.storage.MemoryStore())
        out(torch.arange(8)).sum().backward()
        assert out.table.evict(rows=5) == 5
        out.eval()
        return out

    labels = torch.tensor([0, 3, 3, 5, 7, 99])  # a repeat, and a label with no row anywhere
    looked_up = trained()
    looked_up(labels)
    scored = trained()
    de.sampled_logits(scored, torch.randn(6, D), labels, num_sampled=4, sampler=sampler,
                      generator=0)
    want = looked_up.stats()
    assert want.last_call.loaded > 0 and want.last_call.defaults_served == 1
    assert scored.stats().last_call == want.last_call
    assert scored.stats().totals == want.totals


def test_in_batch_logq_correction_in_eval_counts_rows_in_the_store():
    """The correction read training counts from memory only, so in eval a positive whose
    row was evicted counted as 1 and evicting rows changed the eval loss."""
    out = de.DynamicEmbedding(dim=D, seed=3, optimizer=de.optim.SGD(lr=0.1),
                              initializer=de.init.Normal(std=1.0), max_rows=100,
                              eviction=de.policy.LRU(), store=de.storage.MemoryStore())
    ids = np.arange(8)
    out.table.lookup_slots(ids, (ids + 1) ** 2, insert=True)  # skewed counts
    out.eval()
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 5, 7])

    def loss(**kwargs):
        return de.sampled_softmax_loss(out, x, labels, num_sampled=0, sampler=InBatch(),
                                       reduction="none", **kwargs)

    before = loss()
    assert out.table.evict(rows=6) == 6
    assert len(out.table) == 2  # at least two positives live in the store only
    np.testing.assert_array_equal(out.table.training_counts(np.array([7, 3, 7, 99])),
                                  [64, 16, 64, 0])
    torch.testing.assert_close(loss(), before)
    assert not torch.allclose(loss(logq_correction=False), before)  # the counts matter


def test_an_int_generator_draws_new_negatives_each_training_step_reproducibly():
    """An int seed re-seeded every call, so every training step drew the same negatives."""
    def run():
        out = output_table(de.optim.SGD(lr=0.1))
        x = torch.randn(2, D, generator=torch.Generator().manual_seed(8))
        drawn = []
        for _ in range(3):
            got = de.sampled_logits(out, x, [1, 2], num_sampled=10, generator=7)
            got.logits.sum().backward()
            drawn.append(got.sampled_ids.tolist())
        out.eval()
        evals = [de.sampled_logits(out, x, [1, 2], num_sampled=10, generator=7)
                 .sampled_ids.tolist() for _ in range(2)]
        return drawn, evals

    drawn, evals = run()
    assert drawn[0] != drawn[1] != drawn[2]
    assert evals[0] == evals[1]  # eval leaves the step, so its draws repeat
    assert run() == (drawn, evals)  # the same seed and steps draw the same again
    with pytest.raises(ValueError, match="generator: an int seed must be >= 0, got -1"):
        de.sampled_logits(output_table(), torch.zeros(1, D), [1], num_sampled=2,
                          generator=-1)


def test_padding_labels_are_dropped_and_never_get_rows():
    """A padded label bag trained the pad as a positive (it got a row, and then could be
    drawn as a negative): the padding key is no key anywhere."""
    def make():
        items = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), padding_key=0,
                                    seed=1)
        items.table.find_or_insert(torch.arange(1, 9))
        return items

    inputs = torch.randn(2, 4)
    items = make()
    padded = de.sampled_softmax_loss(items, inputs, [[5, 0, 0], [6, 7, 0]], num_sampled=4,
                                     generator=3)
    plain = de.sampled_softmax_loss(make(), inputs, [[5], [6, 7]], num_sampled=4, generator=3)
    torch.testing.assert_close(padded, plain)
    padded.backward()
    assert not items.table.contains(torch.tensor([0])).any()
    with pytest.raises(ValueError, match=r"example 1 has no positive key \(the padding key is "
                                         r"not one"):
        de.sampled_softmax_loss(items, inputs, [[5], [0, 0]], num_sampled=4)


def test_in_batch_negatives_warn_when_a_batch_has_none():
    """A batch of one (or of one shared positive) masked every in-batch candidate as an
    accidental hit: loss 0, nothing trained, no word."""
    items = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
    for labels in ([5], [5, 5, 5]):
        with pytest.warns(RuntimeWarning, match="InBatch found no negatives") as caught:
            loss = de.sampled_softmax_loss(items, torch.randn(len(labels), 4), labels,
                                           num_sampled=0, sampler=InBatch())
        assert float(loss) == 0.0 and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        de.sampled_softmax_loss(items, torch.randn(3, 4), [5, 6, 7], num_sampled=0,
                                sampler=InBatch())
