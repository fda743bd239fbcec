"""Optimizer configs: every bad hyperparameter is refused with an error naming it, and equal
configs compare (and hash) equal however they were given."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import dynembed as de


def test_adam_betas_given_as_a_list_equal_the_tuple_and_hash():
    """A list (what a JSON manifest gives back) made an unequal, unhashable config."""
    listed = de.optim.Adam(lr=0.1, betas=[0.9, 0.99])
    given = de.optim.Adam(lr=0.1, betas=(0.9, 0.99))
    assert listed == given and hash(listed) == hash(given)
    assert repr(listed) == repr(given)
    fields = json.loads(json.dumps(dataclasses.asdict(given)))
    assert de.optim.Adam(**fields) == given  # the round trip of a package manifest


@pytest.mark.parametrize("make", [
    lambda eps: de.optim.Adagrad(lr=0.1, eps=eps),
    lambda eps: de.optim.RowWiseAdagrad(lr=0.1, eps=eps),
    lambda eps: de.optim.Adam(lr=0.1, eps=eps),
])
def test_an_eps_that_float32_rounds_to_zero_is_refused(make):
    """eps=1e-50 passed (> 0) but is 0 in float32: a zero gradient element then made the
    weight 0 / 0 = NaN, silently."""
    with pytest.raises(ValueError, match=r"eps must be at least .*float32.*got 1e-50"):
        make(1e-50)
    emb = de.DynamicEmbedding(dim=3, optimizer=make(1.2e-38), seed=1)
    out = emb(torch.tensor([7]))
    out.backward(torch.zeros_like(out))  # the smallest eps allowed keeps 0 / eps finite
    assert torch.isfinite(emb.table.find([7]).values).all()


@pytest.mark.parametrize("cls, field, value", [
    (de.optim.Adam, "betas", (0.9, float("nan"))),
    (de.optim.Adam, "betas", (0.9,)),
    (de.optim.Adam, "betas", "0.9, 0.99"),
    (de.optim.Adam, "eps", float("inf")),
    (de.optim.Adagrad, "lr_decay", -0.1),
    (de.optim.Adagrad, "initial_accumulator_value", -1.0),
    (de.optim.RowWiseAdagrad, "initial_accumulator_value", float("nan")),
    (de.optim.SGD, "dampening", -0.5),
    (de.optim.SGD, "momentum", -0.1),
    (de.optim.SGD, "weight_decay", None),
    (de.optim.FTRL, "beta", -1.0),
    (de.optim.FTRL, "l2", float("inf")),
    (de.optim.FTRL, "initial_accumulator_value", -0.1),
    (de.optim.FTRL, "max_grad_norm", -1.0),
])
def test_every_bad_hyperparameter_is_refused_naming_it(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{"lr": 0.1, field: value})


def test_set_sparse_lr_changes_every_table_and_keeps_the_state(tmp_path):
    """A schedule (warm-up, decay) had no way in: the optimizers are frozen configs that
    torch's schedulers cannot see."""
    import torch

    import dynembed as de
    coll = de.EmbeddingCollection(
        tables={"a": de.TableConfig(dim=2, optimizer=de.optim.Adagrad(lr=0.1)),
                "b": de.TableConfig(dim=2, optimizer=de.optim.Adam(lr=0.1)),
                "c": de.TableConfig(dim=2)},  # no optimizer: left as it is
        features={"x": "a", "y": "b", "z": "c"})
    inputs = {"x": torch.tensor([1]), "y": torch.tensor([1]), "z": torch.tensor([1])}
    sum(v.sum() for v in coll(inputs).values()).backward()
    state = coll.tables["a"].state_dict()["optimizer_state"].clone()
    de.set_sparse_lr(coll, 0.01)
    assert coll.tables["a"].optimizer.lr == 0.01 and coll.tables["b"].optimizer.lr == 0.01
    assert coll.tables["a"].config.optimizer.lr == 0.01  # what checkpoints report
    assert coll.tables["c"].optimizer is None
    assert torch.equal(coll.tables["a"].state_dict()["optimizer_state"], state)
    w = coll.tables["a"].find(torch.tensor([1])).values.clone()
    sum(v.sum() for v in coll(inputs).values()).backward()
    acc = state[0] + 1.0  # Adagrad: sum of squared gradients (each element's gradient 1)
    expected = w - 0.01 / (acc.sqrt() + 1e-10)
    torch.testing.assert_close(coll.tables["a"].find(torch.tensor([1])).values, expected)
    de.checkpoint.save(tmp_path / "ck", coll)
    assert "lr=0.01" in (tmp_path / "ck" / "MANIFEST.json").read_text()
    with pytest.raises(ValueError, match="lr must be"):
        de.set_sparse_lr(coll, 0.0)
    assert coll.tables["b"].optimizer.lr == 0.01  # nothing changed
    with pytest.raises(TypeError, match="torch.nn.Module or a DynamicTable"):
        de.set_sparse_lr("model", 0.1)
    de.set_sparse_lr(coll.tables["a"], 0.5)
    assert coll.tables["a"].optimizer.lr == 0.5


def test_adamw_is_adam_with_decoupled_weight_decay_and_torchs_defaults():
    adamw = de.optim.AdamW(lr=0.01)
    assert adamw == de.optim.Adam(lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True)
    fields = json.loads(json.dumps(dataclasses.asdict(adamw)))
    assert de.optim.Adam(**fields) == adamw  # what checkpoints and packages record
    with pytest.raises(TypeError, match="decoupled_weight_decay must be True or False"):
        de.optim.Adam(lr=0.1, decoupled_weight_decay="yes")
    with pytest.raises(ValueError, match="weight_decay"):
        de.optim.AdamW(weight_decay=-1.0)
