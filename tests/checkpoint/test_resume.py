"""Training resumed from a checkpoint reaches the same weights as training straight through."""

from __future__ import annotations

import pytest
import torch

import dynembed as de
from dynembed.checkpoint import manifest as mf


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = de.EmbeddingCollection(
            tables={"user": de.TableConfig(dim=8, optimizer=de.optim.Adam(lr=0.01), seed=1),
                    "item": de.TableConfig(dim=8, optimizer=de.optim.Adagrad(lr=0.05),
                                           seed=2, admission=de.policy.FrequencyAdmission(
                                               threshold=2))},
            features={"user": "user", "item": "item"})
        self.head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                        torch.nn.Linear(8, 1))

    def forward(self, users, items):
        out = self.features({"user": users, "item": items})
        return self.head(torch.cat([out["user"], out["item"]], 1)).squeeze(1)


def data(step: int):
    g = torch.Generator().manual_seed(step)
    users = torch.randint(0, 500, (64,), generator=g)
    items = torch.randint(0, 2000, (64,), generator=g)
    return users, items, ((users + items) % 2).float()


def run(model, optimizer, steps):
    for step in steps:
        users, items, labels = data(step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(users, items),
                                                                    labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fresh():
    torch.manual_seed(0)
    model = Model()
    return model, torch.optim.Adam(model.head.parameters(), lr=0.01)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("delta", [False, True])
def test_resumed_training_equals_uninterrupted_training(tmp_path, lazy, delta):
    straight, straight_opt = fresh()
    run(straight, straight_opt, range(40))

    first, first_opt = fresh()
    manager = de.checkpoint.CheckpointManager(tmp_path, every_steps=10,
                                              max_chain=10 if delta else 1)
    for step in range(30):
        run(first, first_opt, [step])
        manager.maybe_save(step + 1, first, first_opt, extra={"step": step + 1})
    kinds = [mf.read(p)["kind"] for p in manager.checkpoints()]
    assert kinds == (["full", "delta", "delta"] if delta else ["full"] * 3)
    del first, first_opt  # the process "dies" after step 30

    resumed, resumed_opt = fresh()
    extra = de.checkpoint.CheckpointManager(tmp_path).restore(resumed, resumed_opt, lazy=lazy)
    assert extra == {"step": 30}
    run(resumed, resumed_opt, range(extra["step"], 40))

    for name, p in straight.head.state_dict().items():
        assert torch.equal(p, resumed.head.state_dict()[name]), name
    for name in ("user", "item"):
        a, b = straight.features.tables[name], resumed.features.tables[name]
        ea, eb = a.export(), b.export()
        oa, ob = ea.ids.argsort(), eb.ids.argsort()
        assert torch.equal(ea.ids[oa], eb.ids[ob])
        assert torch.equal(ea.weights[oa], eb.weights[ob])
        assert torch.equal(ea.optimizer_state[oa], eb.optimizer_state[ob])
        assert (a.step, a.update_step) == (b.step, b.update_step)
