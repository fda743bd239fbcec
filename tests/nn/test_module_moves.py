"""What nn.Module's own verbs do to dynembed modules: requires_grad_ freezes a module's
lookups, and .to()/.half()/.double() place its outputs (rows stay float32 in host memory)."""

import numpy as np
import pytest
import torch
from torch import nn

import dynembed as de


def _emb(**kw):
    return de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.5), seed=3,
                               initializer=de.init.Normal(std=1.0), **kw)


def _weights(emb, keys):
    return emb.table.read(emb.table.ids_of(keys).ids).clone()


def test_requires_grad_false_freezes_the_rows_and_true_unfreezes():
    emb = _emb()
    emb(torch.tensor([1, 2]))  # rows exist
    before = _weights(emb, torch.tensor([1, 2]))
    assert emb.requires_grad_(False) is emb
    out = emb(torch.tensor([1, 2, 3]))  # a new key still gets a row
    assert not out.requires_grad
    assert emb.table.size() == 3
    assert torch.equal(_weights(emb, torch.tensor([1, 2])), before)

    emb.requires_grad_()
    out = emb(torch.tensor([1, 2]))
    assert out.requires_grad
    out.sum().backward()
    assert not torch.equal(_weights(emb, torch.tensor([1, 2])), before)


def test_a_frozen_embedding_in_a_model_leaves_rows_and_trains_the_head():
    emb = _emb()
    head = nn.Linear(4, 1)
    emb(torch.tensor([5, 6]))
    before = _weights(emb, torch.tensor([5, 6]))
    head_before = head.weight.detach().clone()
    emb.requires_grad_(False)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head(emb(torch.tensor([5, 6]))).sum().backward()
    opt.step()
    assert torch.equal(_weights(emb, torch.tensor([5, 6])), before)
    assert not torch.equal(head.weight, head_before)


def test_frozen_bag_and_collection_and_deferred_mode_queue_nothing():
    bag = de.DynamicEmbeddingBag(dim=4, mode="sum", optimizer=de.optim.SGD(lr=0.5),
                                 update_mode="deferred")
    bag([[1, 2], [3]])
    bag.sparse_zero_grad()
    before = _weights(bag, torch.tensor([1, 2, 3]))
    bag.requires_grad_(False)
    assert not bag([[1, 2], [3]]).requires_grad
    bag.sparse_step()
    assert torch.equal(_weights(bag, torch.tensor([1, 2, 3])), before)
    assert bag.stats().totals.skipped_gradients == 0

    coll = de.EmbeddingCollection(
        tables={"t": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.5))},
        features={"a": "t"})
    coll.requires_grad_(False)
    assert not coll({"a": torch.tensor([1, 2])})["a"].requires_grad


def test_requires_grad_needs_a_bool():
    with pytest.raises(TypeError, match="requires_grad must be True or False"):
        _emb().requires_grad_("no")


def test_frozen_output_table_of_sampled_softmax_keeps_its_rows():
    out = _emb()
    out(torch.arange(10))
    before = _weights(out, torch.arange(10))
    out.requires_grad_(False)
    inputs = torch.randn(3, 4, requires_grad=True)
    loss = de.sampled_softmax_loss(out, inputs, torch.tensor([1, 2, 3]), num_sampled=4,
                                   generator=0)
    loss.backward()
    assert inputs.grad is not None
    assert torch.equal(_weights(out, torch.arange(10)), before)


@pytest.mark.parametrize("move, dtype", [
    (lambda m: m.half(), torch.float16),
    (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.double(), torch.float64),
    (lambda m: m.to(torch.float16), torch.float16),
    (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
])
def test_a_model_moved_to_another_float_dtype_gets_outputs_in_it(move, dtype):
    emb = _emb()
    head = nn.Linear(4, 1)
    model = nn.Sequential(emb, head)
    move(model)
    assert head.weight.dtype == dtype
    out = model(torch.tensor([1, 2, 1]))  # fails with a dtype mismatch if emb gave float32
    assert out.dtype == dtype
    before = _weights(emb, torch.tensor([1, 2]))
    out.sum().backward()  # the gradient comes back to the float32 rows through the cast
    after = _weights(emb, torch.tensor([1, 2]))
    assert after.dtype == torch.float32
    assert not torch.equal(after, before)
    model.float()
    assert model[0](torch.tensor([1])).dtype == torch.float32


def test_moved_bag_collection_and_eval_reads_deliver_the_dtype():
    bag = de.DynamicEmbeddingBag(dim=4, mode="sum", optimizer=de.optim.SGD(lr=0.5)).double()
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    assert bag([[1, 2], [3]], per_sample_weights=[[0.5, 2.0], [1.0]]).dtype == torch.float64
    assert bag(torch.tensor([1, 2, 3]), torch.tensor([0, 2]),
               per_sample_weights=weights).dtype == torch.float64
    coll = de.EmbeddingCollection(
        tables={"t": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.5))},
        features={"a": "t", "b": de.FeatureConfig(table="t", pooling="mean")}).half()
    got = coll({"a": torch.tensor([1, 2]), "b": [[1], [2, 3]]})
    assert {v.dtype for v in got.values()} == {torch.float16}
    assert coll({"a": torch.tensor([1, 2]), "b": [[1], [2]]},
                concat=True).dtype == torch.float16
    emb = _emb().half().eval()
    assert emb(torch.tensor([7, 8])).dtype == torch.float16  # eval read, unseen keys


def test_moving_keeps_rows_float32_and_values_exact_up_to_the_cast():
    emb = _emb()
    ref = emb(torch.tensor([1, 2])).detach()
    emb.double()
    assert emb.table.state_dict()["weights"].dtype == torch.float32
    got = emb(torch.tensor([1, 2]))
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.detach().numpy(), ref.double().numpy())


@pytest.mark.parametrize("then", [lambda m: m.to("cpu"), lambda m: m.cpu(),
                                  lambda m: m.share_memory(), lambda m: m.to(device="cpu")])
def test_a_move_without_a_dtype_keeps_the_dtype_given_before(then):
    """A device-only .to() after .half() once applied to a float32 probe, so the outputs
    went back to float32 while the model stayed float16."""
    model = nn.Sequential(_emb(), nn.Linear(4, 1)).to(torch.bfloat16)
    then(model)
    assert model(torch.tensor([1, 2])).dtype == torch.bfloat16


def test_an_int_type_is_refused_as_by_torch_modules():
    """The anchor is a float Parameter, so .type(int) fails as on nn.Embedding, and the
    module is left as it was."""
    emb = _emb().half()
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Embedding(2, 4).type(torch.int64)
    with pytest.raises(RuntimeError, match="floating point"):
        emb.type(torch.int64)
    assert emb(torch.tensor([1])).dtype == torch.float16


def test_sampled_softmax_of_a_half_model_scores_in_float32():
    out = _emb()
    out(torch.arange(10))
    inputs = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = de.sampled_softmax_loss(out, inputs, torch.tensor([1, 2, 3]), num_sampled=4,
                                   generator=0)
    assert loss.dtype == torch.float32 and loss.device == inputs.device
    loss.backward()
    assert inputs.grad.dtype == torch.bfloat16
    logits = de.sampled_logits(out, inputs, torch.tensor([1, 2, 3]), num_sampled=4,
                               generator=0)
    assert logits.logits.device == inputs.device and logits.targets.device == inputs.device


def test_tracing_or_exporting_a_model_is_refused_by_name():
    """torch.jit.trace answered every key with the traced batch's rows (only a warning);
    torch.export failed inside with '.numpy() is not supported for tensor subclasses'."""
    model = nn.Sequential(_emb(), nn.Linear(4, 1))
    keys = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="cannot be traced or exported"):
        torch.jit.trace(model, (keys,))
    with pytest.raises(TypeError, match="cannot be traced or exported"):
        torch.export.export(model, (keys,))
    assert model(keys).shape == (2, 1)  # eager still works


def test_torch_func_transforms_are_refused_by_name():
    """Under vmap / grad the keys arrive as functorch wrappers without storage: the lookup
    failed inside the key conversion with 'Cannot access data pointer of Tensor that
    doesn't have storage'."""
    emb = _emb()
    with pytest.raises(TypeError, match="cannot run under torch.func transforms"):
        torch.func.vmap(emb)(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="cannot run under torch.func transforms"):
        torch.func.grad(lambda w: (emb(torch.tensor([1])) * w).sum())(torch.tensor(1.0))
    assert emb.table.size() == 0  # refused before any key was inserted
    assert torch.func.functional_call(emb, {}, (torch.tensor([1, 2]),)).shape == (2, 4)
    keys = torch.tensor([1, 2])  # made outside: vmap maps only the dense input (a read)
    out = torch.func.vmap(lambda x: emb.eval()(keys).sum(0) * x)(torch.ones(3))
    assert out.shape == (3, 4)
