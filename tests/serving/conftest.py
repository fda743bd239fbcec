"""Fixtures: a model store with a trained package, and a running server over it."""

from __future__ import annotations

import pytest

from tests.serving.helpers import start_server, write_package


@pytest.fixture
def store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    model = write_package(store)
    return store, model


@pytest.fixture
def running(store):
    folder, _ = store
    server = start_server(folder, models={"ctr": "ctr-1.0"}, batch_size=16,
                          max_batch_delay_ms=5)
    yield server
    server.stop()
