"""Live tables follow a training job's checkpoints under load; shutdown loses nothing."""

from __future__ import annotations

import copy
import gc
import logging
import threading
import time

import httpx
import pytest
import torch

import dynembed as de
from dynembed.serving import export_package
from tests.serving.helpers import (
    Trained,
    columns,
    eventually,
    examples,
    expected,
    make_model,
    start_server,
    torchserve_error,
    write_package,
)


def _load(url: str, batch: list[dict], stop: threading.Event, results: list) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            response = client.post(url, json=batch)
            results.append((response.status_code, response.json()))


def test_a_new_checkpoint_reaches_live_tables_without_a_failed_request(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = write_package(store)
    ckpt = tmp_path / "ckpt"
    manager = de.checkpoint.CheckpointManager(ckpt)
    model = Trained(coll, dense)
    manager.save(1, model)
    batch = examples(16, seed=4) + [{"user": "fresh-user", "item": "i1", "tags": []}]
    server = start_server(store, models={"ctr": "ctr-1.0"}, batch_size=8,
                          max_batch_delay_ms=2, follow={"ctr": str(ckpt)},
                          follow_interval_s=0.1)
    url = server.inference + "/predictions/ctr"
    try:
        before = httpx.post(url, json=batch).json()
        assert before == pytest.approx(expected(coll, dense, batch), rel=1e-6)
        stop, results = threading.Event(), []
        load = [threading.Thread(target=_load, args=(url, batch, stop, results))
                for _ in range(4)]
        for thread in load:
            thread.start()
        # training goes on: the new user gets a row, old rows move; a delta checkpoint
        coll.train()
        for step in range(3):
            out = dense(coll(columns(batch), concat=True))
            (out - 1).pow(2).mean().backward()
        manager.save(2, model)
        deadline = time.monotonic() + 30
        while server.server.registry.get("ctr").handler.refreshes < 2 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # more requests on the new tables
        stop.set()
        for thread in load:
            thread.join(30)
        after = httpx.post(url, json=batch).json()
    finally:
        server.stop()
    assert len(results) > 20
    assert {status for status, _ in results} == {200}  # zero failed requests
    # the served tables are the new checkpoint's (the dense part is the package's)
    want = expected(coll, dense, batch)
    assert after == pytest.approx(want, rel=1e-5)
    assert after != pytest.approx(before, rel=1e-5)


def test_a_followed_model_registered_again_serves_the_followed_checkpoint(tmp_path):
    """The follower once refreshed only when a newer checkpoint came: a version registered
    again served its package's old tables until training saved another one."""
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = write_package(store)
    batch = examples(8, seed=4)
    coll.train()
    for _ in range(3):
        (dense(coll(columns(batch), concat=True)) - 1).pow(2).mean().backward()
    de.checkpoint.CheckpointManager(tmp_path / "ckpt").save(1, Trained(coll, dense))
    want = expected(coll, dense, batch)
    server = start_server(store, models={"ctr": "ctr-1.0"}, follow={"ctr": str(tmp_path / "ckpt")},
                          follow_interval_s=0.1)
    url, headers = server.inference + "/predictions/ctr", server.token()
    try:
        eventually(lambda: httpx.post(url, json=batch).json() == pytest.approx(want, rel=1e-5))
        assert httpx.delete(server.management + "/models/ctr", headers=headers).status_code == 200
        assert httpx.post(server.management + "/models", params={"url": "ctr-1.0"},
                          headers=headers).status_code == 200
        eventually(lambda: httpx.post(url, json=batch).json() == pytest.approx(want, rel=1e-5))
    finally:
        server.stop()


def test_graceful_shutdown_answers_every_accepted_request(store):
    folder, (coll, dense) = store
    server = start_server(folder, models={"ctr": "ctr-1.0"}, batch_size=64,
                          max_batch_delay_ms=300)
    batch = examples(3, seed=1)
    entry = server.server.registry.get("ctr")
    # Hold the first batch in the handler so that the other requests are queued (accepted,
    # not answered) when the shutdown starts.
    gate, predict, held = threading.Event(), entry.batcher.predict, []

    def held_predict(examples):
        held.append(len(examples) // len(batch))  # requests in this batch
        gate.wait(30)
        return predict(examples)

    entry.batcher.predict = held_predict
    replies: list = []

    def ask():
        try:
            replies.append(httpx.post(server.inference + "/predictions/ctr", json=batch,
                                      timeout=30))
        except httpx.HTTPError as e:
            replies.append(e)

    askers = [threading.Thread(target=ask) for _ in range(24)]
    for thread in askers:
        thread.start()
    deadline = time.monotonic() + 20
    while sum(held) + entry.batcher.pending < 24 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert held and entry.batcher.pending == 24 - held[0]  # the rest are queued
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.2)  # the shutdown has begun: no new connections
    with pytest.raises(httpx.ConnectError):
        httpx.post(server.inference + "/predictions/ctr", json=batch, timeout=5)
    gate.set()
    stopper.join(30)
    for thread in askers:
        thread.join(30)
    assert len(replies) == 24
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in replies), \
        [r if not isinstance(r, httpx.Response) else r.status_code for r in replies]
    assert replies[0].json() == pytest.approx(expected(coll, dense, batch), rel=1e-6)


def test_make_model_is_deterministic():
    a, b = make_model(3), make_model(3)
    batch = examples(4)
    assert expected(*a, batch) == expected(*b, batch)
    assert torch.equal(a[1][0].weight, b[1][0].weight)


def test_a_checkpoint_that_cannot_be_applied_is_logged_once_and_counted(tmp_path, caplog):
    """The follower logged a full traceback every interval for as long as the newest
    checkpoint could not be applied, and no metric showed it."""
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = write_package(store)
    ckpt = tmp_path / "ckpt"
    manager = de.checkpoint.CheckpointManager(ckpt)
    manager.save(1, de.DynamicEmbedding(dim=2))  # another model's tables
    caplog.set_level(logging.ERROR, logger="dynembed.serving.server")
    server = start_server(store, models={"ctr": "ctr-1.0"}, follow={"ctr": str(ckpt)},
                          follow_interval_s=0.02)
    metric = 'dynembed_serving_checkpoint_refresh_failures_total{model="ctr"}'

    def failures() -> float:
        text = httpx.get(server.metrics + "/metrics", timeout=30).text
        return next((float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith(metric)), 0.0)

    try:
        eventually(lambda: failures() >= 5)
        logged = [r for r in caplog.records if "could not apply" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None
        manager.save(2, Trained(coll, dense))  # the job's own tables: applied
        eventually(lambda: server.server.registry.get("ctr").handler.refreshes >= 1)
    finally:
        server.stop()


def test_a_damaged_newest_checkpoint_is_reported_once_not_at_every_poll(tmp_path, caplog,
                                                                        monkeypatch):
    """The follower made a new checkpoint manager at every poll, and each warned again that
    it skipped the damaged newest checkpoint: 17,000 lines a day at the default interval
    for as long as the job wrote nothing newer."""
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = write_package(store)
    ckpt = tmp_path / "ckpt"
    manager = de.checkpoint.CheckpointManager(ckpt, max_chain=1)
    manager.save(1, Trained(coll, dense))
    manager.save(2, Trained(coll, dense))
    rows = next((ckpt / "step-0000000002").glob("tables/*/*.rows"))
    rows.write_bytes(rows.read_bytes()[:-10])  # truncated after the commit
    polls = []
    latest = de.checkpoint.CheckpointManager.latest
    monkeypatch.setattr(de.checkpoint.CheckpointManager, "latest",
                        lambda self: polls.append(1) or latest(self))
    caplog.set_level(logging.WARNING, logger="dynembed.checkpoint.manager")
    server = start_server(store, models={"ctr": "ctr-1.0"}, follow={"ctr": str(ckpt)},
                          follow_interval_s=0.02)
    try:
        eventually(lambda: len(polls) >= 20)
        assert server.server.registry.get("ctr").handler.refreshes == 1  # step 1's
        skipped = [r for r in caplog.records if "skipping checkpoint" in r.getMessage()]
        assert len(skipped) == 1 and "step-0000000002" in skipped[0].getMessage()
    finally:
        server.stop()


def test_a_package_without_its_model_warns_once_that_the_dense_part_stays(tmp_path, caplog):
    """Served answers came from new tables under the package's dense layers, a model no
    training snapshot had, and only an INFO line said the tables changed."""
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = write_package(store)
    ckpt = tmp_path / "ckpt"
    manager = de.checkpoint.CheckpointManager(ckpt)
    caplog.set_level(logging.INFO, logger="dynembed.serving.server")
    server = start_server(store, models={"ctr": "ctr-1.0"}, follow={"ctr": str(ckpt)},
                          follow_interval_s=0.02)
    try:
        for step in (1, 2):
            manager.save(step, Trained(coll, dense))
            eventually(lambda n=step: server.server.registry.get("ctr").handler.refreshes >= n)
        eventually(lambda: sum("now serves" in r.getMessage() for r in caplog.records) >= 2)
        described = httpx.get(server.management + "/models/ctr", timeout=30,
                              headers=server.token()).json()[0]
        assert described["tablesCheckpoint"].endswith("step-0000000002")
    finally:
        server.stop()
    assert {r.levelno for r in caplog.records if "now serves" in r.getMessage()} == \
        {logging.INFO}
    warned = [r for r in caplog.records if "under the package's dense part" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert any(r.getMessage() == "stopped" for r in caplog.records)


def test_a_package_exported_with_its_model_follows_the_dense_layers_too(tmp_path, caplog):
    """A followed checkpoint changed the tables only, so a server answered with step N's
    tables under the export's dense layers: a model no training step had."""
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = make_model(seed=2)
    model = Trained(coll, dense)
    export_package(store / "ctr-1.0", embeddings=coll, dense=dense, name="ctr",
                   output="sigmoid", model=model)
    exported_dense = copy.deepcopy(dense)
    batch = examples(16, seed=4)
    opt = torch.optim.SGD(dense.parameters(), lr=0.5)
    coll.train()
    for _ in range(3):
        (dense(coll(columns(batch), concat=True)) - 1).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    de.checkpoint.CheckpointManager(tmp_path / "ckpt").save(1, model)
    want = expected(coll, dense, batch)
    assert want != pytest.approx(expected(coll, exported_dense, batch), rel=1e-4)
    caplog.set_level(logging.INFO, logger="dynembed.serving.server")
    server = start_server(store, models={"ctr": "ctr-1.0"}, follow={"ctr": str(tmp_path / "ckpt")},
                          follow_interval_s=0.05)
    try:
        eventually(lambda: httpx.post(server.inference + "/predictions/ctr",
                                      json=batch).json() == pytest.approx(want, rel=1e-5))
    finally:
        server.stop()
    assert not any("dense part" in r.getMessage() for r in caplog.records)


def test_a_stuck_handler_holds_shutdown_at_most_the_graceful_timeout(store):
    """A batch stuck in the handler held the shutdown twice the graceful timeout (uvicorn
    waited it out, then the workers' stop waited again) and every accepted request got
    uvicorn's plain-text 500 when it cancelled them; they get TorchServe's JSON 503."""
    folder, _ = store
    grace = 2.0
    server = start_server(folder, models={"ctr": "ctr-1.0"}, batch_size=1,
                          max_batch_delay_ms=1, graceful_timeout_s=grace)
    entry = server.server.registry.get("ctr")
    gate, predict = threading.Event(), entry.batcher.predict
    entry.batcher.predict = lambda examples: (gate.wait(60), predict(examples))[1]
    replies: list = []

    def ask():
        try:
            replies.append(httpx.post(server.inference + "/predictions/ctr",
                                      json=examples(1), timeout=60))
        except httpx.HTTPError as e:
            replies.append(e)

    askers = [threading.Thread(target=ask) for _ in range(3)]
    try:
        for thread in askers:
            thread.start()
        eventually(lambda: entry.batcher.pending == 2)  # one in the handler, two queued
        started = time.monotonic()
        server.server.shutdown()
        server.thread.join(30)
        took = time.monotonic() - started
        for thread in askers:
            thread.join(30)
    finally:
        gate.set()
    assert not server.thread.is_alive()
    assert took < grace + 1.5, f"shutdown took {took:.1f} s with graceful_timeout {grace} s"
    assert len(replies) == 3
    for reply in replies:
        assert isinstance(reply, httpx.Response), reply
        torchserve_error(reply, 503, "ServiceUnavailableException")


def test_a_model_served_under_another_name_follows_checkpoints_by_that_name(tmp_path):
    """--follow NAME=DIR names the model as it is served: the package ctr served as
    "ranker" follows the training job, the same package served as "ctr" keeps its own
    tables (each registration has its own tables)."""
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = write_package(store)
    batch = examples(8, seed=4)
    packaged = expected(coll, dense, batch)
    coll.train()
    for _ in range(3):
        (dense(coll(columns(batch), concat=True)) - 1).pow(2).mean().backward()
    de.checkpoint.CheckpointManager(tmp_path / "ckpt").save(1, Trained(coll, dense))
    trained = expected(coll, dense, batch)
    assert trained != pytest.approx(packaged, rel=1e-5)
    server = start_server(store, models={"ranker": "ctr-1.0", "ctr": "ctr-1.0"},
                          follow={"ranker": str(tmp_path / "ckpt")}, follow_interval_s=0.1)
    try:
        url = server.inference + "/predictions/"
        eventually(lambda: httpx.post(url + "ranker", json=batch).json()
                   == pytest.approx(trained, rel=1e-5))
        assert httpx.post(url + "ctr", json=batch).json() == pytest.approx(packaged, rel=1e-5)
        metrics = httpx.get(server.metrics + "/metrics").text
        assert 'dynembed_serving_checkpoint_refreshes_total{model="ranker",version="1.0"} 1.0' \
            in metrics
    finally:
        server.stop()


def _torch_threads_of_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join(30)
    return seen[0]


def test_a_server_sets_its_threads_while_it_serves_and_gives_them_back(store):
    """ModelServer(config) set torch's and dynembed's kernel threads to torch_threads for
    good: training or evaluation in the same process ran on 1 thread after the server
    stopped. Constructing one changes nothing now; serving sets them, stopping restores."""
    import numba

    folder, _ = store
    saved = torch.get_num_threads(), de.get_num_threads()
    kernels = min(2, numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(2)
    de.set_num_threads(kernels)
    try:
        server = start_server(folder, models={"ctr": "ctr-1.0"}, torch_threads=1)
        try:
            # torch's setting is per thread once a thread ran an op: a new thread (as the
            # handlers' workers are) starts on the one set last
            assert (_torch_threads_of_a_new_thread(), de.get_num_threads()) == (1, 1)
            answer = httpx.post(server.inference + "/predictions/ctr", json=examples(2),
                                timeout=30)
            assert answer.status_code == 200, answer.text
            assert gc.get_freeze_count() > 0  # startup froze what it loaded
        finally:
            server.stop()
        assert gc.get_freeze_count() == 0  # and gave it back to the collector
        assert (torch.get_num_threads(), de.get_num_threads()) == (2, kernels)
        assert _torch_threads_of_a_new_thread() == 2
        constructed = de.serving.ModelServer(de.serving.ServerConfig(
            model_store=str(folder), key_file=None, torch_threads=1))
        assert constructed.registry.models == {}
        assert (torch.get_num_threads(), de.get_num_threads()) == (2, kernels)
    finally:
        torch.set_num_threads(saved[0])
        de.set_num_threads(saved[1])


def test_a_version_the_checkpoint_does_not_fit_holds_back_no_other_version(tmp_path):
    """1.0 was exported before the job's dense layers grew, 2.0 after: the followed
    checkpoint fits 2.0 only. The server refreshed the versions in one go and stopped at
    1.0's failure, so 2.0 never moved (or, registered first, re-applied the checkpoint at
    every interval, its move never recorded)."""
    from torch import nn
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = make_model(seed=0)
    export_package(store / "ctr-1.0", embeddings=coll, dense=dense, name="ctr",
                   version="1.0", output="sigmoid", model=Trained(coll, dense))
    torch.manual_seed(1)
    wider = nn.Sequential(nn.Linear(11, 16), nn.ReLU(), nn.Linear(16, 1), nn.Flatten(0))
    model = Trained(coll, wider)
    export_package(store / "ctr-2.0", embeddings=coll, dense=wider, name="ctr",
                   version="2.0", output="sigmoid", model=model)
    ckpt = tmp_path / "ckpt"
    server = start_server(store, models={"ctr": "ctr-2.0"}, follow={"ctr": str(ckpt)},
                          follow_interval_s=0.05)
    try:
        assert httpx.post(server.management + "/models", params={"url": "ctr-1.0"},
                          headers=server.token()).status_code == 200
        opt = torch.optim.SGD(wider.parameters(), lr=0.5)
        coll.train()
        for step in range(3):
            (wider(coll(columns(examples(16, seed=50 + step)), concat=True)) - 1) \
                .pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        de.checkpoint.CheckpointManager(ckpt).save(1, model)
        batch = examples(8, seed=3)
        want = expected(coll, wider, batch)
        url = server.inference + "/predictions/ctr/2.0"
        eventually(lambda: httpx.post(url, json=batch).json() == pytest.approx(want, rel=1e-5))
        failures = lambda: sum(
            float(line.split()[-1]) for line in httpx.get(server.metrics + "/metrics")
            .text.splitlines() if line.startswith("dynembed_serving_checkpoint_refresh_fail"))
        eventually(lambda: failures() >= 5)  # 1.0 is retried, and fails, interval after
    finally:  # interval; 2.0 does not move again
        server.stop()
    entries = server.server.registry.models["ctr"]
    assert entries["2.0"].handler.refreshes == 1 and entries["1.0"].handler.refreshes == 0
    assert entries["2.0"].checkpoint.endswith("step-0000000001")
    assert entries["1.0"].checkpoint is None
