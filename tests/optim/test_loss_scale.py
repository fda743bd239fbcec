"""Mixed precision with torch.amp.GradScaler: within de.loss_scale the tables get the true
gradient (the scaled one made SGD steps `scale` times too large), and an overflowed step is
skipped and counted, as the scaler skips its own, instead of raising."""

import math

import pytest
import torch
from torch import nn

import dynembed as de

KEYS = [torch.tensor([1, 2, 2, 3]), torch.tensor([3, 4, 1, 1]), torch.tensor([5, 2, 6, 3])]


class Model(nn.Module):
    def __init__(self, mode: str = "fused"):
        super().__init__()
        torch.manual_seed(0)
        self.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.5), seed=1,
                                       initializer=de.init.Normal(std=1.0), update_mode=mode)
        self.head = nn.Linear(4, 1)

    def forward(self, keys):
        return self.head(self.emb(keys)).pow(2).mean()


def _rows(model):
    return model.emb.table.find(torch.arange(1, 7)).values.clone()


def _train(model, scaler=None, scale=None):
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    for keys in KEYS:
        loss = model(keys)
        if scaler is not None:
            with de.loss_scale(scaler):
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        elif scale is not None:
            with de.loss_scale(scale):
                (loss * scale).backward()
            for p in model.head.parameters():
                p.grad /= scale
            opt.step()
        else:
            loss.backward()
            opt.step()
        if model.emb.table.config.update_mode == "deferred":
            de.sparse_step(model)
        opt.zero_grad()
    return model


@pytest.mark.parametrize("mode", ["fused", "deferred"])
def test_a_grad_scaler_trains_the_tables_as_unscaled_training(mode):
    expected = _rows(_train(Model(mode)))
    scaled = _train(Model(mode), scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    torch.testing.assert_close(_rows(scaled), expected, rtol=0, atol=0)
    without = Model(mode)  # what happened: the scaled gradient reached the rows
    opt = torch.optim.SGD(without.head.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(without(KEYS[0])).backward()
    scaler.step(opt)
    if mode == "deferred":
        de.sparse_step(without)
    assert not torch.allclose(_rows(without), _rows(_train(Model(mode), scale=None)))


def test_a_fixed_scale_is_divided_out():
    expected = _rows(_train(Model()))
    torch.testing.assert_close(_rows(_train(Model(), scale=64.0)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["fused", "deferred"])
def test_an_overflowed_step_is_skipped_and_counted_and_training_goes_on(mode):
    model = Model(mode)
    model(KEYS[0])  # rows exist
    before = _rows(model)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with de.loss_scale(scaler):
        scaler.scale(model(KEYS[0]) * 16).backward()  # overflows; no NonFiniteGradientError
        scaler.step(opt)
        scaler.update()
        if mode == "deferred":
            de.sparse_step(model)
        assert torch.equal(_rows(model), before)
        totals = model.emb.stats().totals
        assert totals.skipped_gradients == 3 and totals.nonfinite_gradients > 0
        assert scaler.get_scale() < 2.0**127  # the scaler saw the overflow too
        opt.zero_grad()
        scaler.scale(model(KEYS[0])).backward()  # the scale read again: now finite
        scaler.step(opt)
        if mode == "deferred":
            de.sparse_step(model)
    assert not torch.equal(_rows(model), before)


@pytest.mark.parametrize("mode", ["fused", "deferred"])
def test_an_overflow_in_a_table_alone_lowers_the_scalers_scale(mode):
    """The scaler learned of overflows only from its optimizers: with finite dense
    gradients it kept a scale at which the table overflowed (and skipped) every step."""
    model = Model(mode)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120, growth_interval=1)
    with de.loss_scale(scaler):
        for step in range(2):
            # the head's gradient is finite, the table's is 1e20 * 2**120 (or 2**119) = inf
            loss = model.head(torch.ones(1, 4)).sum() + (model.emb(KEYS[0]) * 1e20).sum()
            scaler.scale(loss).backward()
            assert all(torch.isfinite(p.grad).all() for p in model.head.parameters())
            scaler.step(opt)
            scaler.update()
            if mode == "deferred":
                de.sparse_step(model)
            opt.zero_grad()
            assert scaler.get_scale() == 2.0 ** (119 - step)
    assert model.emb.stats().totals.skipped_gradients == 6
    scaler.scale(model.head(torch.ones(1, 4)).sum()).backward()  # nothing to report now
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**119  # grown again (growth_interval=1), not backed off


@pytest.mark.parametrize("mode", ["fused", "deferred"])
def test_a_model_of_tables_alone_updates_its_scaler_every_step(mode):
    """update() found inf checks only after an overflow: on every other step a model with
    no dense parameters got "No inf checks were recorded prior to update"."""
    emb = Model(mode).emb
    reference = Model(mode).emb
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120, growth_interval=2)
    with de.loss_scale(scaler):
        for step, keys in enumerate(KEYS):
            scale = 1e20 if step == 1 else 1.0  # the second step overflows in the table
            scaler.scale((emb(keys) * scale).sum()).backward()
            scaler.update()
            if mode == "deferred":
                emb.table.step_optimizer()
    for step, keys in enumerate(KEYS):  # unscaled, without the overflowed step's update
        looked_up = reference(keys)
        if step != 1:
            looked_up.sum().backward()
            if mode == "deferred":
                reference.table.step_optimizer()
    assert scaler.get_scale() == 2.0**119  # backed off once, not yet grown again
    assert emb.stats().totals.skipped_gradients == 3  # the distinct keys of step 1
    assert torch.equal(emb.table.find(torch.arange(1, 7)).values,
                       reference.table.find(torch.arange(1, 7)).values)


def test_a_scaler_that_takes_no_inf_checks_is_warned_about():
    class FixedScaler:  # a scaler of the user's own: get_scale() and is_enabled() only
        def get_scale(self):
            return 2.0**127

        def is_enabled(self):
            return True

    model = Model()
    with de.loss_scale(FixedScaler()), pytest.warns(RuntimeWarning, match="scale stays"):
        (model.emb(KEYS[0]) * 1e20 * 2.0**127).sum().backward()
    assert model.emb.stats().totals.skipped_gradients == 3


def test_outside_the_block_and_with_a_disabled_scaler_gradients_are_as_given():
    model = Model()
    model(KEYS[0])
    with de.loss_scale(torch.amp.GradScaler("cpu", enabled=False)), \
            pytest.raises(de.NonFiniteGradientError):
        (model(KEYS[0]) * math.inf).backward()
    with pytest.raises(de.NonFiniteGradientError):
        (model(KEYS[0]) * math.inf).backward()


@pytest.mark.parametrize("bad, error", [("8", TypeError), (None, TypeError), (0, ValueError),
                                        (-2.0, ValueError), (math.inf, ValueError),
                                        (math.nan, ValueError)])
def test_a_bad_scale_is_refused_by_name(bad, error):
    with pytest.raises(error, match="scale must be"), de.loss_scale(bad):
        pass
