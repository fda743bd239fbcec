"""DynamicEmbedding: the user-facing module."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.errors import KeyInputError, KeyValueError, NonFiniteGradientError


def test_issue_example_strings_then_ints():
    emb = de.DynamicEmbedding(dim=64, optimizer=de.optim.Adagrad(lr=0.05))
    v = emb(["cat", "dog", "cat"])
    assert v.shape == (3, 64)
    assert torch.equal(v[0], v[2]) and not torch.equal(v[0], v[1])
    w = emb(torch.tensor([12, -7, 2**62]))
    assert w.shape == (3, 64)
    assert emb.table.size() == 5
    loss = v.sum() + w.sum()
    loss.backward()
    assert emb.stats().totals.updated_rows == 5


def test_output_is_dense_autograd_tensor_and_keeps_shape():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=0)
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 4) and out.requires_grad and out.layout == torch.strided
    assert torch.equal(out[0, 0], out[1, 2])


def test_backward_updates_only_touched_rows_with_combined_duplicates():
    lr = 0.5
    emb = de.DynamicEmbedding(dim=3, optimizer=de.optim.SGD(lr=lr), seed=0)
    all_ids = torch.arange(10)
    before = emb.table.find_or_insert(all_ids).values.clone()
    batch = torch.tensor([2, 5, 2, 2])
    weights = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    (emb(batch) * weights).sum().backward()
    after = emb.table.find(all_ids).values
    untouched = [i for i in range(10) if i not in (2, 5)]
    assert torch.equal(after[untouched], before[untouched])
    torch.testing.assert_close(after[2], before[2] - lr * (1 + 3 + 4))
    torch.testing.assert_close(after[5], before[5] - lr * 2)


def test_same_seed_same_initial_vector_in_any_order_and_table():
    a = de.DynamicEmbedding(dim=16, seed=42)
    b = de.DynamicEmbedding(dim=16, seed=42)
    c = de.DynamicEmbedding(dim=16, seed=43)
    va = a(["x", "y", "z"])
    vb = b(["z", "q", "y", "x"])
    assert torch.equal(va[0], vb[3]) and torch.equal(va[2], vb[0])
    assert not torch.equal(va[0], c(["x"])[0])


def test_eval_mode_never_inserts_and_counts_defaults():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), default_value=0.5)
    emb(["seen"])
    emb.eval()
    out = emb(["seen", "unseen", "unseen"])
    assert emb.table.size() == 1
    assert torch.equal(out[1], torch.full((4,), 0.5)) and torch.equal(out[1], out[2])
    assert not out.requires_grad
    stats = emb.stats()
    assert stats.last_call.defaults_served == 2 and stats.last_call.hits == 1
    assert stats.totals.defaults_served == 2


def test_eval_read_of_a_large_batch_matches_the_table_rows_and_defaults():
    # Above the kernels' serial cutoff, so the probe-and-copy read runs on every thread.
    emb = de.DynamicEmbedding(dim=8, optimizer=de.optim.SGD(lr=0.1), seed=3,
                              default_value=-2.0)
    rng = np.random.default_rng(5)
    present = rng.choice(1 << 40, size=30_000, replace=False) - (1 << 39)
    with torch.no_grad():
        emb(torch.from_numpy(present))
    absent = present + (1 << 40)  # outside the range drawn from: never inserted
    keys = np.where(rng.random(70_000) < 0.8, rng.choice(present, 70_000), rng.choice(absent, 70_000))
    exported = emb.table.export()  # the reference: every row, read in slot order
    row_of = dict(zip(exported.ids.tolist(), range(exported.ids.shape[0])))
    hit = np.isin(keys, present)
    expected = torch.full((keys.shape[0], 8), -2.0)
    expected[torch.from_numpy(hit)] = exported.weights[[row_of[k] for k in keys[hit].tolist()]]
    emb.eval()
    out = emb(torch.from_numpy(keys))
    assert torch.equal(out, expected)
    assert emb.stats().last_call.defaults_served == int((~hit).sum()) > 0
    assert emb.table.size() == 30_000


def test_read_only_table_serves_and_refuses_writes():
    emb = de.DynamicEmbedding(dim=4, read_only=True, default_value=[1.0, 2.0, 3.0, 4.0])
    out = emb(["a", "b"])  # training mode, still no inserts
    assert emb.table.size() == 0
    assert torch.equal(out[0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(de.ReadOnlyTableError, match="read_only"):
        emb.table.insert_or_assign(["a"], torch.zeros(1, 4))
    with pytest.raises(de.ReadOnlyTableError):
        emb.table.erase(["a"])


def test_frozen_table_without_optimizer_gives_no_grad_output():
    emb = de.DynamicEmbedding(dim=4)
    out = emb([1, 2])
    assert emb.table.size() == 2 and not out.requires_grad


def test_deferred_mode_accumulates_until_sparse_step():
    def make(mode):
        return de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=7,
                                   update_mode=mode)
    fused, deferred = make("fused"), make("deferred")
    micro = [torch.tensor([1, 2, 2]), torch.tensor([2, 3])]
    target = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    # Fused on the whole batch == deferred over two micro-batches then one step.
    (fused(torch.cat(micro)) * target).sum().backward()
    (deferred(micro[0]) * target[:3]).sum().backward()
    (deferred(micro[1]) * target[3:]).sum().backward()
    before = deferred.table.find(torch.tensor([1, 2, 3])).values.clone()
    assert deferred.table.has_pending_gradients
    assert torch.equal(deferred.table.find(torch.tensor([1, 2, 3])).values, before)
    de.sparse_step(deferred)
    assert not deferred.table.has_pending_gradients
    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(deferred.table.find(ids).values, fused.table.find(ids).values)


def test_deferred_zero_grad_drops_pending():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), update_mode="deferred")
    emb([1]).sum().backward()
    before = emb.table.find([1]).values.clone()
    emb([1, 2]).sum().backward()  # two backward calls queued: 3 gradient rows
    de.sparse_zero_grad(emb)
    de.sparse_step(emb)
    assert torch.equal(emb.table.find([1]).values, before)
    totals = emb.stats().totals
    assert totals.zeroed_gradients == 3 and totals.skipped_gradients == 0
    de.sparse_zero_grad(emb)  # nothing queued: nothing more counted
    assert emb.stats().totals.zeroed_gradients == 3


def test_deferred_gradient_of_erased_key_is_skipped_and_counted():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), update_mode="deferred")
    emb([1, 2]).sum().backward()
    emb.table.erase([1])
    emb.sparse_step()
    assert emb.stats().totals.skipped_gradients == 1
    assert emb.stats().totals.updated_rows == 1


def test_fused_gradient_for_row_erased_and_reused_before_backward_is_skipped():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), seed=0)
    out = emb([1])
    emb.table.erase([1])
    emb.table.find_or_insert([99])  # reuses the freed slot
    before = emb.table.find([99]).values.clone()
    out.sum().backward()
    assert torch.equal(emb.table.find([99]).values, before)
    assert emb.stats().totals.skipped_gradients == 1



def test_erasing_absent_keys_between_lookup_and_backward_skips_no_gradient():
    # more no-op erases than the bounded erase log holds: they must not count as erasures
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), seed=0)
    before = emb.table.find_or_insert([1]).values.clone()
    out = emb([1])
    for _ in range(4100):
        assert emb.table.erase([12345]) == 0
    out.sum().backward()
    torch.testing.assert_close(emb.table.find([1]).values, before - 1.0)
    assert emb.stats().totals.skipped_gradients == 0

def _nan_loss(out):
    return (out * torch.tensor([[1.0, 1.0], [math.nan, 1.0]])).sum()


def test_nonfinite_gradient_raises_and_applies_nothing():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), seed=0)
    before = emb.table.find_or_insert([1, 2]).values.clone()
    with pytest.raises(NonFiniteGradientError, match="nonfinite_grads"):
        _nan_loss(emb([1, 2])).backward()
    assert torch.equal(emb.table.find([1, 2]).values, before)
    assert emb.stats().totals.nonfinite_gradients == 1
    assert emb.stats().totals.skipped_gradients == 2  # both rows went unapplied


def test_deferred_nonfinite_gradient_says_the_queue_was_dropped_and_counts_it():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), seed=0,
                              update_mode="deferred")
    before = emb.table.find_or_insert([1, 2, 3]).values.clone()
    emb([3]).sum().backward()
    _nan_loss(emb([1, 2])).backward()
    with pytest.raises(NonFiniteGradientError, match=r"queued by 2 backward call\(s\).*dropped"):
        emb.table.step_optimizer()
    assert torch.equal(emb.table.find([1, 2, 3]).values, before)
    assert not emb.table.has_pending_gradients
    assert emb.stats().totals.skipped_gradients == 3


def test_nonfinite_gradient_skip_policy_counts_and_updates_the_rest():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), seed=0,
                              nonfinite_grads="skip")
    before = emb.table.find_or_insert([1, 2]).values.clone()
    _nan_loss(emb([1, 2])).backward()
    after = emb.table.find([1, 2]).values
    assert torch.equal(after[1], before[1])
    torch.testing.assert_close(after[0], before[0] - 1.0)
    totals = emb.stats().totals
    assert totals.skipped_gradients == 1 and totals.nonfinite_gradients == 1


def test_stats_count_hits_misses_inserts_per_call_and_total():
    emb = de.DynamicEmbedding(dim=2)
    emb([1, 2, 2])
    first = emb.stats().last_call
    assert (first.keys, first.hits, first.misses, first.inserts) == (3, 0, 3, 2)
    emb([2, 3])
    s = emb.stats()
    assert (s.last_call.hits, s.last_call.misses, s.last_call.inserts) == (1, 1, 1)
    assert (s.totals.keys, s.totals.inserts, s.totals.lookup_calls) == (5, 3, 2)
    assert s.rows == 3 and s.bytes_used > 3 * 8 and s.payload_bytes_per_row == 8


def test_metadata_counts_and_last_step():
    emb = de.DynamicEmbedding(dim=2)
    emb([5, 5, 6])
    emb([5])
    export = emb.table.export()
    by_id = dict(zip(export.ids.tolist(), zip(export.counts.tolist(),
                                               export.last_step.tolist())))
    assert by_id[5] == (3, 2) and by_id[6] == (1, 1)


def test_state_dict_round_trip_through_torch_save_weights_only(tmp_path):
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.01), key_log=True, seed=5)
    for _ in range(3):
        emb(["a", "b", "c"]).pow(2).sum().backward()
    emb.table.erase(["b"])
    path = tmp_path / "emb.pt"
    torch.save(emb.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.01), key_log=True)
    other.load_state_dict(state)
    a, b = emb.table.export(), other.table.export()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert other.table.keys_of(b.ids) == emb.table.keys_of(a.ids)
    # Training continues identically (Adam's step count and moments came along).
    for m in (emb, other):
        m(["a", "c"]).pow(2).sum().backward()
    assert torch.equal(emb.table.find(["a", "c"]).values, other.table.find(["a", "c"]).values)


def test_load_state_dict_with_wrong_dim_names_the_table():
    emb = de.DynamicEmbedding(dim=4)
    emb([1])
    other = de.DynamicEmbedding(dim=8)
    with pytest.raises(de.StateDictError, match="dim 4.*dim 8|dim=4"):
        other.load_state_dict(emb.state_dict())


def test_load_state_dict_with_other_optimizer_state_width():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.1))
    emb([1])
    other = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
    with pytest.raises(de.StateDictError, match="optimizer"):
        other.load_state_dict(emb.state_dict())


def test_empty_batch_and_one_key():
    emb = de.DynamicEmbedding(dim=3, optimizer=de.optim.SGD(lr=0.1))
    assert emb([]).shape == (0, 3)
    assert emb(torch.empty(0, dtype=torch.int64)).shape == (0, 3)
    out = emb(["solo"])
    assert out.shape == (1, 3)
    out.sum().backward()
    emb.eval()
    assert emb([]).shape == (0, 3)


def test_int64_extremes_are_distinct_keys():
    emb = de.DynamicEmbedding(dim=4, seed=1)
    keys = torch.tensor([-2**63, 2**63 - 1, 0, -1, 1])
    out = emb(keys)
    assert emb.table.size() == 5
    assert len({tuple(r.tolist()) for r in out}) == 5
    assert torch.equal(emb.table.find(keys).values, out)


def test_one_million_keys_in_one_batch():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=0)
    rng = np.random.default_rng(0)
    keys = torch.from_numpy(rng.integers(-2**63, 2**63 - 1, size=1_000_000, dtype=np.int64))
    out = emb(keys)
    assert out.shape == (1_000_000, 4)
    assert emb.table.size() == torch.unique(keys).numel()
    out.sum().backward()
    assert emb.stats().totals.updated_rows == emb.table.size()
    again = emb.table.find(keys[:1000]).values
    torch.testing.assert_close(again, out[:1000].detach() - 0.1)


@pytest.mark.parametrize("bad, error, match", [
    ([1.5, 2.5], KeyInputError, "float"),
    (torch.tensor([1.0, 2.0]), KeyInputError, "float"),
    (np.array([0.5]), KeyInputError, "float"),
    (["a", 1], KeyInputError, "mixed"),
    ([1, "a"], KeyInputError, "mixed"),
    ([None, "a"], KeyInputError, "None"),
    (["a", None], KeyInputError, "None"),
    ([[1, 2], [3]], KeyInputError, "nest"),
    ([True, False], KeyInputError, "bool"),
    ("cat", KeyInputError, "list of keys"),
    ([2**63], KeyValueError, "int64"),
    (np.array([2**63], dtype=np.uint64), KeyValueError, "int64"),
    ({"a": 1}, KeyInputError, "container"),
])
def test_bad_keys_raise_clear_errors(bad, error, match):
    emb = de.DynamicEmbedding(dim=2)
    with pytest.raises(error, match=match) as info:
        emb(bad)
    assert "keys" in str(info.value)
    assert emb.table.size() == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0}, "dim"), ({"dim": 2.5}, "dim"), ({"dim": 4, "update_mode": "later"}, "update_mode"),
    ({"dim": 4, "nonfinite_grads": "ignore"}, "nonfinite_grads"),
    ({"dim": 4, "default_value": [1.0, 2.0]}, "default_value"),
    ({"dim": 4, "seed": -1}, "seed"), ({"dim": 4, "hash_seed": 2**64}, "hash_seed"),
    ({"dim": 4, "device": "cuda"}, "device"), ({"dim": 4, "initial_capacity": -5}, "initial_capacity"),
])
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        de.DynamicEmbedding(**kwargs)


@pytest.mark.parametrize("module, kwargs, match", [
    (de.DynamicEmbeddingBag, {"dim": 4, "include_last_offset": True},
     r"\['include_last_offset'\].*an argument of forward"),
    (de.DynamicEmbedding, {"num_embeddings": 10, "embedding_dim": 4},
     r"\['embedding_dim', 'num_embeddings'\].*embedding_dim is dim=.*no vocabulary size"),
    (de.DynamicEmbedding, {"dim": 4, "optimiser": None}, r"\['optimiser'\].*'optimizer'"),
    (de.DynamicEmbedding, {"dim": 4, "max_norm": 1.0, "norm_type": 2.0},
     r"\['max_norm', 'norm_type'\].*not renormalised.*max_grad_norm=[^;]*$"),
    (de.DynamicEmbeddingBag, {"dim": 4, "scale_grad_by_freq": True, "sparse": True},
     r"never scaled by its count.*always sparse"),
    (de.DynamicEmbeddingBag, {"dim": 4, "padding_idx": 0}, r"padding_idx is padding_key="),
    (de.DynamicEmbedding, {"dim": 4, "_weight": None, "_freeze": True},
     r"requires_grad_\(False\).*insert_or_assign\(torch.arange\(V\), W\)"),
])
def test_unknown_options_name_themselves_and_the_fields(module, kwargs, match):
    """TableConfig's own error named only the keyword (include_last_offset, a torch
    constructor argument, is a forward argument here), or a missing dim came first."""
    with pytest.raises(TypeError, match=match):
        module(**kwargs)


def test_torch_optimizer_passed_as_table_optimizer_is_refused():
    with pytest.raises(TypeError, match="sparse optimizer"):
        de.DynamicEmbedding(dim=4, optimizer=torch.optim.SGD)


def test_module_inside_a_model_trains_with_dense_optimizer():
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.2), seed=0)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, keys):
            return self.head(self.emb(keys)).squeeze(-1)

    model = Model()
    dense = torch.optim.SGD(model.parameters(), lr=0.1)
    keys = [f"user{i}" for i in range(20)]
    target = torch.tensor([float(i % 2) for i in range(20)])
    losses = []
    for _ in range(60):
        dense.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(keys), target)
        loss.backward()
        dense.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    # rows are no Parameters: the table's only one is its zero-size anchor
    params = dict(model.named_parameters())
    assert list(params) == ["emb._anchor", "head.weight", "head.bias"]
    assert params["emb._anchor"].numel() == 0
    assert [p.shape for p in de.nn.dense_parameters(model)] == [(1, 8), (1,)]
    assert "emb._anchor" not in model.state_dict()


def test_freezing_a_model_the_torch_way_freezes_its_tables():
    """model.requires_grad_(False), or requires_grad set on each of model.parameters(),
    froze every torch layer but the tables went on training, silently (a teacher model,
    a frozen backbone)."""
    for freeze in (lambda m: m.requires_grad_(False),
                   lambda m: [p.requires_grad_(False) for p in m.parameters()]):
        model = torch.nn.Sequential(de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=1.0)),
                                    torch.nn.Linear(4, 1))
        keys = torch.tensor([1, 2])
        model[0](keys)
        before = model[0].table.find(keys).values.clone()
        freeze(model)
        out = model(keys)
        assert not out.requires_grad
        torch.testing.assert_close(model[0].table.find(keys).values, before)
        model.requires_grad_(True)
        model(keys).sum().backward()  # unfrozen: trains again
        assert not torch.equal(model[0].table.find(keys).values, before)
        assert model[0]._anchor.grad.shape == (0,)


def test_backward_with_create_graph_updates_as_a_plain_backward():
    """create_graph=True (gradient penalties on the dense part) failed: numpy() of a
    gradient that requires grad."""
    def run(create_graph: bool):
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 1)
        emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=2)
        coll = de.EmbeddingCollection(
            tables={"t": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=2)},
            features={"a": "t", "b": "t"})
        out = head(emb(torch.tensor([1, 2, 1]))).pow(2).sum()
        parts = coll({"a": torch.tensor([1, 2]), "b": torch.tensor([2, 3])})
        out = out + head(parts["a"] + parts["b"]).pow(2).sum()
        out.backward(create_graph=create_graph)
        return emb.table.find([1, 2]).values, coll.tables["t"].find([1, 2, 3]).values

    for plain, graph in zip(run(False), run(True)):
        torch.testing.assert_close(graph, plain)


def test_a_torch_compiled_model_looks_up_and_trains_as_an_eager_one():
    """torch.compile traced into the lookup's numba kernels and failed ("exception table
    entry start instruction has no offset", or a KeyError from numba's parfors): the
    lookup must run outside the traced graph."""
    def run(compiled: bool):
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 1)
        emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=2)
        step = lambda keys: head(emb(keys)).pow(2).sum()
        if compiled:
            step = torch.compile(step, backend="eager")
        for keys in (torch.tensor([1, 2, 1]), torch.tensor([[3, 4], [1, 5]]), ["a", "b"]):
            step(keys).backward()
        rows = torch.cat([emb.table.find([1, 2, 3, 4, 5]).values,
                          emb.table.find(["a", "b"]).values])
        return rows, emb.stats().totals

    (eager, eager_totals), (compiled, compiled_totals) = run(False), run(True)
    torch.testing.assert_close(compiled, eager)
    assert compiled_totals == eager_totals


_EAGER_FRAME_UNDER_COMPILE = """
import torch
from torch._dynamo.eval_frame import skip_code
import dynembed as de

emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=2)
skip_code(type(emb).forward.__code__)  # run eagerly, as torch 2.11 ran it
head = torch.nn.Linear(4, 1)
step = torch.compile(lambda keys: head(emb(keys)).sum(), backend="eager")
for keys in (["a", "b"], ["c", "a"], torch.tensor([1, 2])):
    step(keys).backward()
print(emb.table.size(), emb.stats().totals.updated_rows)
"""


def test_a_lookup_torch_compile_runs_eagerly_keeps_its_inner_frames_eager():
    """torch 2.11's torch.compile ran the lookup's wrapper eagerly when the keys were
    strings (no tensor in the frame) but compiled the frames it called, and failed in the
    key hashing's numpy code (an AssertionError on a read-only array). Skipping the
    wrapper's frame makes torch 2.13 do the same; in a process of its own, since a skipped
    code object stays skipped."""
    result = subprocess.run([sys.executable, "-c", _EAGER_FRAME_UNDER_COMPILE],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["5", "6"]  # a, b, c, 1, 2; 2 + 2 + 2 rows updated


def test_torch_embedding_attributes_and_state_say_what_to_use():
    """Migrated code that read emb.weight, or loaded an nn.Embedding's state dict, got a
    bare AttributeError / a missing 'table.weights' with no way forward."""
    emb = de.DynamicEmbedding(dim=4)
    emb.table.insert_or_assign([1], torch.ones(1, 4))
    assert emb.table.find([1]).values.shape == (1, 4)  # what the weight hint names
    for name, match in (("weight", r"no weight matrix.*find\(keys\)\.values.*insert_or_assign"),
                        ("num_embeddings", "no vocabulary size"),
                        ("embedding_dim", r"emb\.dim")):
        with pytest.raises(AttributeError, match=rf"no attribute '{name}': .*{match}"):
            getattr(emb, name)
        assert not hasattr(emb, name)
    model = torch.nn.Sequential(de.DynamicEmbedding(dim=4), torch.nn.Linear(4, 1))
    torch_state = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)).state_dict()
    hint = r"'0.weight' looks like a torch.nn.Embedding's weight.*insert_or_assign"
    with pytest.warns(UserWarning, match=hint), pytest.raises(RuntimeError, match="0.weight"):
        model.load_state_dict(torch_state)
    with pytest.warns(UserWarning, match=hint) as caught:  # non-strict loads of the dense
        result = model.load_state_dict(torch_state, strict=False)  # part work
    assert caught[0].filename == __file__
    assert torch.equal(model[1].weight, torch_state["1.weight"])
    assert result.missing_keys == ["0.table.weights"] and result.unexpected_keys == ["0.weight"]
