"""The row arena keeps its rows in torch tensors of any device (a later release places them
on cuda): allocation, growth and row gathers stay on the arena's device.

The cuda cases run where torch sees a GPU: CI has none; they passed on an H200 with torch
2.11.0+cu130 on 2026-11-27.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynembed.table.arena import COUNT, ID, LAST_STEP, RowArena, take_rows

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_arena_grows_on_its_device_and_keeps_its_rows(device):
    arena = RowArena(dim=8, state_width=3, device=device)
    arena.ensure(10)
    first = arena.capacity
    assert first >= 10
    weights = torch.randn(first, 8, device=device)
    arena.weights.copy_(weights)
    arena.state.fill_(2.5)
    arena.meta[:, ID] = torch.arange(first, device=device) - 2**62
    arena.meta[:, COUNT] = 7
    arena.meta[:, LAST_STEP] = -1

    arena.ensure(first + 1)  # amortised growth: 1.5x, contents copied on the device
    assert arena.capacity >= int(first * 1.5)
    for name, t in arena.tensors().items():
        assert t.device.type == device, name
    assert arena.weights.shape == (arena.capacity, 8) and arena.state.shape[1] == 3
    assert torch.equal(arena.weights[:first], weights)
    assert (arena.state[:first] == 2.5).all()
    assert torch.equal(arena.ids[:first], torch.arange(first, device=device) - 2**62)
    assert (arena.counts[:first] == 7).all() and (arena.last_step[:first] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [3, 70_000])  # a small gather and a large (threaded) one
def test_take_rows_gathers_on_the_source_device(device, n):
    source = torch.randn(1_000, 16, device=device)
    index = np.random.default_rng(n).integers(0, 1_000, size=n)
    got = take_rows(source, index)
    assert got.device.type == device and got.shape == (n, 16)
    assert torch.equal(got, source[torch.from_numpy(index).to(device)])
