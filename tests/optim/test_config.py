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
