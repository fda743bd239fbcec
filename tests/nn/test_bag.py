"""DynamicEmbeddingBag against torch.nn.EmbeddingBag with the same vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.errors import KeyInputError, KeyValueError

KEYS = torch.tensor([10, -3, 7, 2**40, 99])


def _pair(mode):
    bag = de.DynamicEmbeddingBag(dim=4, mode=mode, optimizer=de.optim.SGD(lr=0.5), seed=2)
    ref = torch.nn.EmbeddingBag(len(KEYS), 4, mode=mode)
    with torch.no_grad():
        ref.weight.copy_(bag.table.find_or_insert(KEYS).values)
    return bag, ref


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_forward_and_update_match_torch(mode):
    bag, ref = _pair(mode)
    idx = torch.tensor([0, 1, 1, 2, 4, 0, 3])
    offsets = torch.tensor([0, 3, 3, 5])  # includes an empty bag
    out = bag(KEYS[idx], offsets)
    expected = ref(idx, offsets)
    torch.testing.assert_close(out, expected)
    target = torch.randn_like(out)
    ((out - target) ** 2).sum().backward()
    ((expected - target) ** 2).sum().backward()
    with torch.no_grad():
        ref.weight -= 0.5 * ref.weight.grad
    torch.testing.assert_close(bag.table.find(KEYS).values, ref.weight)


def test_per_sample_weights_match_torch():
    bag, ref = _pair("sum")
    idx = torch.tensor([0, 1, 2, 2])
    offsets = torch.tensor([0, 2])
    w = torch.tensor([0.5, 2.0, -1.0, 3.0], requires_grad=True)
    out = bag(KEYS[idx], offsets, per_sample_weights=w)
    torch.testing.assert_close(out, ref(idx, offsets, per_sample_weights=w))
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_per_sample_weights_in_every_shape_the_values_come_in():
    """Flat weights, a list of lists shaped like the bags (Python numbers of any type) and a
    (B, L) tensor for fixed-size bags weigh the same values the same way."""
    bag, ref = _pair("sum")
    idx = torch.tensor([0, 1, 2, 2])
    flat_w = torch.tensor([0.5, 2.0, -1.0, 3.0])
    expected = ref(idx, torch.tensor([0, 2]), per_sample_weights=flat_w)
    bags = [[KEYS[0].item(), KEYS[1].item()], [KEYS[2].item(), KEYS[2].item()]]
    torch.testing.assert_close(bag(bags, per_sample_weights=[[0.5, 2], [-1, 3.0]]), expected)
    torch.testing.assert_close(bag(torch.tensor(bags), per_sample_weights=flat_w.reshape(2, 2)),
                               expected)
    with_empty = bag(bags + [[]], per_sample_weights=[[0.5, 2], [-1, 3.0], []])
    torch.testing.assert_close(with_empty[:2], expected)
    assert torch.equal(with_empty[2], torch.zeros(4))


@pytest.mark.parametrize("weights, error, match", [
    ([[0.5], [1.0, 2.0]], ValueError, r"per_sample_weights\[0\] has 1 weights but bag 0 has 2"),
    ([[0.5, 1.0]], ValueError, r"one list per bag \(2 bags\), got 1 lists"),
    ([[0.5, 1.0], 2.0], ValueError, r"per_sample_weights\[1\] must be the bag's weights"),
    ([torch.ones(2, 1), torch.ones(2)], ValueError, r"\[0\] must be .* 1-D .* shape \(2, 1\)"),
    ([torch.tensor([1, 2]), torch.tensor([3, 4])], TypeError, "floating point, got a torch.int64"),
    ([["a", 1.0], [2.0, 3.0]], TypeError, "per_sample_weights must be floating point weights"),
    ("0.5", TypeError, "per_sample_weights must be floating point weights"),
    (torch.tensor([1, 2, 3, 4]), TypeError, "per_sample_weights must be floating point"),
    (torch.ones(4, 1), ValueError, r"must have shape \(4,\).*got \(4, 1\)"),
    (torch.ones(4, device="meta"), TypeError, "dense tensor with values"),  # garbage once
    # NaN weights gave NaN outputs, then a gradient error that blamed the loss
    ([[0.5, float("nan")], [1.0, 2.0]], ValueError,
     r"per_sample_weights holds 1 NaN or inf weights \(the first at value 1: nan\)"),
    (torch.tensor([1.0, 2.0, float("inf"), float("-inf")]), ValueError, "2 NaN or inf .*'skip'"),
])
def test_bad_per_sample_weights_name_the_argument(weights, error, match):
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum")
    with pytest.raises(error, match=match):
        bag([[1, 2], [3, 4]], per_sample_weights=weights)
    assert bag.table.size() == 0  # nothing was inserted for a call that failed


def test_per_sample_weights_as_one_tensor_or_array_per_bag():
    """Bags of keys may come as one tensor each; their weights so given raised a TypeError
    saying they were not floating point ("shape '[]' is invalid for input of size 2")."""
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum", seed=0, optimizer=None)
    bags = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([], dtype=torch.int64)]
    w = torch.tensor([0.5, 2.0, 3.0], requires_grad=True)
    expected = bag(bags, per_sample_weights=w)
    expected.pow(2).sum().backward()
    grad, w.grad = w.grad.clone(), None
    out = bag(bags, per_sample_weights=[w[:2], w[2:], w[3:]])
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    torch.testing.assert_close(w.grad, grad)  # the graph reaches the weights
    as_arrays = [np.array([0.5, 2.0]), np.array([3.0], dtype=np.float32), np.array([])]
    torch.testing.assert_close(bag(bags, per_sample_weights=as_arrays), expected)
    mixed = [w[:2].detach(), [3.0], []]
    torch.testing.assert_close(bag(bags, per_sample_weights=mixed), expected)


def test_input_forms_agree():
    bag = de.DynamicEmbeddingBag(dim=3, mode="mean", seed=0)
    lists = bag([["a", "b"], ["c"], []])
    flat = bag(["a", "b", "c"], torch.tensor([0, 2, 3]))
    last = bag(["a", "b", "c"], torch.tensor([0, 2, 3, 3]), include_last_offset=True)
    torch.testing.assert_close(lists, flat)
    torch.testing.assert_close(lists, last)
    assert torch.equal(lists[2], torch.zeros(3))
    fixed = bag(torch.tensor([[1, 2], [3, 4]]))
    torch.testing.assert_close(fixed[0], bag([[1, 2]])[0])


def test_only_empty_bags():
    bag = de.DynamicEmbeddingBag(dim=3, mode="sum", optimizer=de.optim.SGD(lr=0.1))
    out = bag([[], []])
    assert out.shape == (2, 3) and torch.equal(out, torch.zeros(2, 3))
    assert out.requires_grad  # still in the graph, as nn.EmbeddingBag's output
    (out * 2).sum().backward()
    assert bag.table.size() == 0 and bag.stats().totals.updated_rows == 0


@pytest.mark.parametrize("values, offsets, error, match", [
    ([1, 2, 3], [1, 2], KeyValueError, "first offset"),
    ([1, 2, 3], [], KeyValueError, "offsets is empty but there are 3 values"),
    ([1, 2], np.array([0, 2**64 - 1], dtype=np.uint64), KeyValueError, str(2**64 - 1)),
    ([1, 2, 3], [0, 2, 1], KeyValueError, "non-decreasing"),
    ([1, 2, 3], [0, 5], KeyValueError, "offsets"),
    ([1, 2, 3], [[0, 1]], KeyValueError, "1-D"),
    ([1, 2, 3], torch.tensor([0.0, 1.0]), KeyInputError, "integers"),
    ([[[1]], [[2]]], None, KeyInputError, "nest"),
    ([1, 2, 3], None, KeyInputError, "offsets"),
    # a 2-D bag once spilled its keys into the next bags
    ([torch.tensor([[1, 2], [3, 4]]), torch.tensor([5])], None, KeyValueError, "bag 0 is a 2-D"),
    ([np.array([1]), np.array([[2, 3]])], None, KeyValueError, "bag 1 is a 2-D"),
    ([torch.tensor(1), torch.tensor([2])], None, KeyValueError, "bag 0 is a 0-D"),
    ([torch.tensor([5]), torch.tensor([True])], None, KeyInputError, "bag 1 holds bools"),
])
def test_bad_bags_raise_clear_errors(values, offsets, error, match):
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum")
    with pytest.raises(error, match=match):
        bag(values, offsets)


def test_include_last_offset_needs_offsets_and_a_bool():
    """It was ignored for a list of lists, and any truthy value counted as True."""
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum")
    with pytest.raises(KeyInputError, match="include_last_offset=True describes offsets"):
        bag([[1], [2]], include_last_offset=True)
    with pytest.raises(TypeError, match="include_last_offset must be True or False"):
        bag(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), include_last_offset="yes")
    assert bag(torch.tensor([1, 2]), torch.tensor([0, 1, 2]),
               include_last_offset=True).shape == (2, 2)


def test_bad_per_sample_weights_and_mode():
    bag = de.DynamicEmbeddingBag(dim=2, mode="mean")
    with pytest.raises(ValueError, match="per_sample_weights"):
        bag([[1, 2]], per_sample_weights=torch.ones(2))
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum")
    with pytest.raises(ValueError, match="per_sample_weights"):
        bag([[1, 2]], per_sample_weights=torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        de.DynamicEmbeddingBag(dim=2, mode="median")


def test_a_tuple_the_collection_reads_as_values_and_offsets_is_refused():
    """(values, offsets-like tensor): EmbeddingCollection pools it as values and offsets,
    the bag module pooled it as two bags, so one input gave two answers."""
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum")
    # offsets as a list: the bag trained them as the keys of a second bag
    for second in (torch.tensor([0, 2]), np.array([0, 2]), [0, 2]):
        with pytest.raises(KeyInputError, match=r"values: .*bag\(values, offsets\)"):
            bag((torch.tensor([5, 6, 7]), second))
    with pytest.raises(KeyInputError, match=r"values: .*bag\(values, offsets\)"):
        bag((["a", "b", "c"], [0, 2]))
    assert bag.table.size() == 0
    assert bag(([5, 6, 7], [0, 2])).shape == (2, 2)  # the collection refuses it as ambiguous
    coll = de.EmbeddingCollection(tables={"t": bag.table},
                                  features={"f": de.FeatureConfig(table="t", pooling="sum")})
    read = coll({"f": (torch.tensor([5, 6, 7]), torch.tensor([0, 2]))})["f"]
    assert torch.equal(read, bag(torch.tensor([5, 6, 7]), torch.tensor([0, 2])))
    assert bag([torch.tensor([5, 6, 7]), torch.tensor([0, 2])]).shape == (2, 2)  # a list


def test_weights_given_one_tensor_each_get_their_gradient():
    """A list (of lists) of 0-d tensors went through torch.as_tensor, which copied the
    values and cut them from the graph: the weights' gradient stayed None."""
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum", optimizer=None)  # rows stay as they are
    w = torch.tensor([0.5, 2.0, 3.0], requires_grad=True)
    bag([[1, 2], [3]], per_sample_weights=w).sum().backward()
    expected, w.grad = w.grad.clone(), None
    for given in ([[w[0], w[1]], [w[2]]], [w[0], w[1], w[2]]):
        bag([[1, 2], [3]], per_sample_weights=given).sum().backward()
        assert torch.allclose(w.grad, expected)
        w.grad = None
    with pytest.raises(TypeError, match="per_sample_weights must be floating point"):
        bag([[1], [2]], per_sample_weights=[[torch.tensor(1)], [2.0]])


def test_a_torch_compiled_bag_pools_and_trains_as_an_eager_one():
    """torch.compile traced into the lookup's numba kernels and failed."""
    def run(compiled: bool):
        bag = de.DynamicEmbeddingBag(dim=4, mode="sum", optimizer=de.optim.SGD(lr=0.1), seed=2)
        step = lambda values, offsets, w: bag(values, offsets, w).pow(2).sum()
        if compiled:
            step = torch.compile(step, backend="eager")
        weights = torch.tensor([1.0, 2.0, 3.0])
        step(torch.tensor([1, 2, 1]), torch.tensor([0, 1]), weights).backward()
        return bag.table.find([1, 2]).values

    torch.testing.assert_close(run(True), run(False))


def test_nonfinite_weights_pass_where_the_table_skips_nonfinite_gradients():
    """nonfinite_grads='skip' lets NaN weights through, as it lets their gradients through
    to be skipped and counted."""
    bag = de.DynamicEmbeddingBag(dim=2, mode="sum", nonfinite_grads="skip",
                                 optimizer=de.optim.SGD(lr=0.1))
    out = bag([[1, 2], [3, 4]], per_sample_weights=[[0.5, float("nan")], [1.0, 2.0]])
    assert out[0].isnan().all() and out[1].isfinite().all()
    before = bag.table.find([1, 2]).values.clone()
    out.sum().backward()  # the NaN-weighted key's row gets a NaN gradient: skipped, counted
    assert bag.stats().totals.nonfinite_gradients == 1
    after = bag.table.find([1, 2]).values
    torch.testing.assert_close(after[0], before[0] - 0.05)
    assert torch.equal(after[1], before[1])
