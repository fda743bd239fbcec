"""The served model answers what the in-process model computes."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.helpers import examples, expected


def test_predictions_equal_the_in_process_model(store, running):
    _, (coll, dense) = store
    batch = examples(20, seed=9) + examples(5, seed=3, unseen=True)
    got = httpx.post(running.inference + "/predictions/ctr", json=batch).json()
    assert got == pytest.approx(expected(coll, dense, batch), rel=1e-6, abs=1e-7)
    one = httpx.post(running.inference + "/predictions/ctr", json=batch[0]).json()
    assert one == pytest.approx(got[0], rel=1e-6)
