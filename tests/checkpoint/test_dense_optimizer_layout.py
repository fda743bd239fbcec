"""Dense optimizer states saved before dynembed modules had their anchor Parameter load
into optimizers over model.parameters(), which now hold the anchors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynembed as de


def _model():
    torch.manual_seed(0)
    return nn.Sequential(de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1),
                         nn.Linear(4, 3), nn.Linear(3, 1))


def _step(model, optimizer):
    optimizer.zero_grad()
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()


def test_a_state_saved_without_anchors_loads_into_groups_that_hold_them(tmp_path):
    model = _model()
    # the layout before: model.parameters() were the dense ones, in two groups here
    old = torch.optim.Adam([{"params": model[1].parameters()},
                            {"params": model[2].parameters(), "lr": 0.5}])
    _step(model, old)
    de.checkpoint.CheckpointManager(tmp_path).save(1, model, old)

    fresh = _model()
    new = torch.optim.Adam([{"params": [*fresh[0].parameters(), *fresh[1].parameters()]},
                            {"params": fresh[2].parameters(), "lr": 0.5}])
    de.checkpoint.CheckpointManager(tmp_path).restore(fresh, new)
    for saved, loaded in ((model[1].weight, fresh[1].weight), (model[2].bias, fresh[2].bias)):
        torch.testing.assert_close(new.state[loaded]["exp_avg"], old.state[saved]["exp_avg"])
    assert fresh[0]._anchor not in new.state and new.param_groups[1]["lr"] == 0.5
    _step(fresh, new)  # and it steps on


def test_other_mismatches_are_still_refused(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model[1].parameters())
    _step(model, optimizer)
    de.checkpoint.CheckpointManager(tmp_path).save(1, model, optimizer)
    fresh = _model()
    with pytest.raises(de.CheckpointError, match="doesn.t match the size"):
        de.checkpoint.CheckpointManager(tmp_path).restore(fresh, torch.optim.Adam(
            fresh.parameters()))
