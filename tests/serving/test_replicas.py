"""A server with several processes: replicas answer on the same port and follow every
change made through the first process, and a SIGTERM loses no request (real processes,
real sockets)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import dynembed as de
from dynembed.serving import ServerConfig
from tests.serving.helpers import (
    Trained,
    columns,
    eventually,
    examples,
    expected,
    predict_request,
    read_answer,
    start_cli_server,
    start_server,
    write_package,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="several processes need Linux's SO_REUSEPORT")


def _answers(url: str, batch: list[dict], connections: int = 40) -> list:
    """(status, body) of one request on each of ``connections`` new connections (the
    kernel spreads new connections over the processes)."""
    out = []
    for _ in range(connections):
        response = httpx.post(url, json=batch, timeout=30)
        out.append((response.status_code, response.json()))
    return out


def _requests_by_process(server) -> dict[str, float]:
    text = httpx.get(server.metrics + "/metrics", timeout=30).text
    counts: dict[str, float] = {}
    series = r'^dynembed_serving_requests_total\{(.*)\} (\S+)$'
    for match in re.finditer(series, text, re.MULTILINE):
        process = re.search(r'process="(\d+)"', match.group(1)).group(1)
        counts[process] = counts.get(process, 0) + float(match.group(2))
    return counts


def _two_processes(tmp_path):
    """A server of 2 processes serving ctr 1.0 (ctr 2.0 in the store, not registered),
    following a checkpoint directory that holds the package's tables.

    Returns:
        (running server, checkpoint manager, (coll, dense) of 1.0, (coll, dense) of 2.0)
    """
    store = tmp_path / "store"
    store.mkdir()
    v1, v2 = write_package(store, version="1.0", seed=0), write_package(store, version="2.0",
                                                                       seed=1)
    manager = de.checkpoint.CheckpointManager(tmp_path / "ckpt")
    manager.save(1, Trained(*v1))
    server = start_server(store, models={"ctr": "ctr-1.0"}, processes=2, batch_size=4,
                          max_batch_delay_ms=1, follow={"ctr": str(tmp_path / "ckpt")},
                          follow_interval_s=0.1)
    return server, manager, v1, v2


def test_replicas_share_the_port_and_follow_management_and_checkpoints(tmp_path):
    server, manager, (coll, dense), (coll2, dense2) = _two_processes(tmp_path)
    batch = examples(5, seed=7)
    url = server.inference + "/predictions/ctr"
    try:
        answers = _answers(url, batch)
        assert {status for status, _ in answers} == {200}
        for _, body in answers:
            assert body == pytest.approx(expected(coll, dense, batch), rel=1e-6)
        by_process = _requests_by_process(server)
        assert set(by_process) == {"0", "1"} and sum(by_process.values()) == 40
        # describe lists the workers of both processes
        [described] = httpx.get(server.management + "/models/ctr", headers=server.token(),
                                timeout=30).json()
        workers = described["workers"]
        pids = [w["pid"] for w in workers]
        replica = server.server.replicas.processes[0].pid
        assert sorted(set(pids)) == sorted({os.getpid(), replica})
        assert pids.count(os.getpid()) == pids.count(replica) >= 1
        assert len({w["id"] for w in workers}) == len(workers)
        assert all(w["memoryUsage"] > 0 for w in workers)

        # training goes on: every process serves the new checkpoint's tables
        coll.train()
        for step in range(3):
            dense(coll(columns(batch), concat=True)).sub(1).pow(2).mean().backward()
        manager.save(2, Trained(coll, dense))
        want = expected(coll, dense, batch)
        assert want != pytest.approx(answers[0][1], rel=1e-6)  # the tables moved
        eventually(lambda: all(body == pytest.approx(want, rel=1e-6)
                               for _, body in _answers(url, batch)), timeout=60)

        manage = lambda method, path, **params: httpx.request(
            method, server.management + path, params=params, headers=server.token(),
            timeout=60)
        assert manage("POST", "/models", url="ctr-2.0").status_code == 200
        assert manage("PUT", "/models/ctr/2.0/set-default").status_code == 200
        for status, body in _answers(url, batch):
            assert status == 200
        # the new version's dense part, over the followed checkpoint's tables
        want2 = expected(coll, dense2, batch)
        assert want2 != pytest.approx(expected(coll2, dense2, batch), rel=1e-6)
        eventually(lambda: all(body == pytest.approx(want2, rel=1e-6)
                               for _, body in _answers(url, batch)), timeout=60)
        assert manage("DELETE", "/models/ctr/1.0").status_code == 200
        assert {status for status, _ in _answers(url + "/1.0", batch)} == {404}
    finally:
        server.stop()
    assert not any(p.is_alive() for p in server.server.replicas.processes)  # stopped too


def test_a_replica_that_dies_is_started_again_with_the_current_models(tmp_path):
    server, manager, (coll, dense), (_, dense2) = _two_processes(tmp_path)
    batch = examples(3, seed=2)
    url = server.inference + "/predictions/ctr"
    try:
        replicas = server.server.replicas
        old = replicas.processes[0]
        assert os.getpgid(old.pid) == old.pid  # its own group: Ctrl-C reaches the first
        coll.train()  # a newer checkpoint, applied everywhere
        dense(coll(columns(batch), concat=True)).sub(1).pow(2).mean().backward()
        manager.save(2, Trained(coll, dense))
        want = expected(coll, dense, batch)
        eventually(lambda: all(body == pytest.approx(want, rel=1e-6)
                               for _, body in _answers(url, batch)), timeout=60)

        os.kill(old.pid, signal.SIGKILL)
        # a change while the replica is down neither waits for it nor fails
        response = httpx.post(server.management + "/models", params={"url": "ctr-2.0"},
                              headers=server.token(), timeout=60)
        assert response.status_code == 200
        eventually(lambda: replicas.processes[0] is not old
                   and replicas.processes[0].is_alive(), timeout=60)
        # the new replica (once serving) answers requests with the newest checkpoint's
        # tables, for 1.0 and for 2.0, registered while it was down (its own dense part)
        want2 = expected(coll, dense2, batch)

        def settled() -> bool:
            round1 = _answers(url + "/1.0", batch, 10)
            round2 = _answers(url + "/2.0", batch, 10)
            return all(status == 200 and body == pytest.approx(want, rel=1e-6)
                       for status, body in round1) and \
                all(status == 200 and body == pytest.approx(want2, rel=1e-6)
                    for status, body in round2) and \
                _requests_by_process(server).get("1", 0) > 20

        eventually(settled, timeout=60)
        described = httpx.get(server.management + "/models/ctr/all", headers=server.token(),
                              timeout=30).json()
        assert {w["pid"] for d in described for w in d["workers"]} == {
            os.getpid(), replicas.processes[0].pid}  # the new replica, not the killed one
    finally:
        server.stop()


def test_processes_must_be_a_positive_int(tmp_path):
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="processes"):
            ServerConfig(model_store=str(tmp_path), processes=bad)


def test_follow_interval_and_graceful_timeout_must_be_positive(tmp_path):
    """follow_interval_s=0 once rescanned the checkpoint directory in a tight loop."""
    for name in ("follow_interval_s", "graceful_timeout_s"):
        for bad in (0, -1.0, float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match=name):
                ServerConfig(model_store=str(tmp_path), **{name: bad})


def test_a_model_registered_while_a_replica_starts_again_reaches_it(tmp_path):
    """The replay read the models, then (seconds later, once the replica had booted) the
    defaults: a model registered in between had a default the replica was never given, its
    start failed, and the live but idle replica was never started again."""
    server, _, _, _ = _two_processes(tmp_path)
    other = write_package(tmp_path / "store", name="other", version="1.0", seed=3)
    batch = examples(3, seed=2)
    try:
        replicas = server.server.replicas
        old = replicas.processes[0]
        os.kill(old.pid, signal.SIGKILL)
        eventually(lambda: replicas.processes[0] is not old
                   and replicas.processes[0].is_alive(), timeout=60)  # booting: replaying
        response = httpx.post(server.management + "/models", params={"url": "other-1.0"},
                              headers=server.token(), timeout=120)
        assert response.status_code == 200
        want = expected(*other, batch)
        url = server.inference + "/predictions/other"

        def both_serve_it() -> bool:
            return all(status == 200 and body == pytest.approx(want, rel=1e-6)
                       for status, body in _answers(url, batch, 10)) \
                and _requests_by_process(server).get("1", 0) > 0

        eventually(both_serve_it, timeout=60)
        assert replicas.serving_pids() == [replicas.processes[0].pid]
    finally:
        server.stop()


def test_a_second_server_of_several_processes_cannot_share_a_busy_port(tmp_path):
    """SO_REUSEPORT let it bind beside another server's socket: the kernel then split
    requests between two servers with different models."""
    from dynembed.serving import ModelServer
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a server's own
    taken.bind(("127.0.0.1", 0))
    taken.listen(8)
    port = taken.getsockname()[1]
    try:
        server = ModelServer(ServerConfig(model_store=str(tmp_path), processes=2,
                                          inference_address=f"127.0.0.1:{port}",
                                          management_address="127.0.0.1:0",
                                          metrics_address="127.0.0.1:0", key_file=None))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.bind()
    finally:
        taken.close()


def test_scales_reach_the_replicas_in_the_order_they_were_made(tmp_path):
    """A scale-down waits for busy workers; a scale-up made meanwhile returned first and was
    mirrored first, so the replicas ended at the older count (1 against 4)."""
    from dynembed.serving.registry import Registry

    store = tmp_path / "store"
    write_package(store)
    mirrored = []

    async def scenario():
        registry = Registry(store)
        entry = await registry.register("ctr-1.0", initial_workers=3)
        scale = entry.batcher.scale

        async def slow_down(workers):  # as if a stopped worker finished a long batch
            if workers < entry.batcher.workers:
                await asyncio.sleep(0.3)
            await scale(workers)

        async def mirror(*args, change):
            mirrored.append((change, args[3]))

        entry.batcher.scale, registry.mirror = slow_down, mirror
        down = asyncio.create_task(registry.scale("ctr", None, min_worker=1, max_worker=None))
        await asyncio.sleep(0.05)
        await registry.scale("ctr", None, min_worker=4, max_worker=None)
        await down
        final = entry.min_workers
        await entry.batcher.stop()
        return final

    final = asyncio.run(scenario())
    assert final == 4 and mirrored[-1][1] == final
    assert [change for change, _ in mirrored] == sorted(change for change, _ in mirrored)


def test_a_slow_scale_down_holds_back_no_other_model(tmp_path):
    """One lock for every model made a scale of model b wait for model a's scale-down."""
    from dynembed.serving.registry import Registry

    store = tmp_path / "store"
    write_package(store, name="a")
    write_package(store, name="b")

    async def scenario():
        registry = Registry(store)
        a = await registry.register("a-1.0", initial_workers=3)
        b = await registry.register("b-1.0", initial_workers=1)
        scale = a.batcher.scale

        async def slow_down(workers):
            await asyncio.sleep(2.0)  # as if a stopped worker finished a long batch
            await scale(workers)

        a.batcher.scale = slow_down
        down = asyncio.create_task(registry.scale("a", None, min_worker=1, max_worker=None))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await registry.scale("b", None, min_worker=2, max_worker=None)
        took = time.monotonic() - started
        await down
        for entry in (a, b):
            await entry.batcher.stop()
        return took

    assert asyncio.run(scenario()) < 1.0


def test_a_model_registered_under_another_name_reaches_the_replicas_by_that_name(tmp_path):
    """The replicas register what the first process did under the name it was given (the
    package ctr 2.0 as "ranker"), and unregister it by that name."""
    server, _, _, (coll2, dense2) = _two_processes(tmp_path)
    batch = examples(3, seed=9)
    headers = server.token()
    try:
        response = httpx.post(server.management + "/models", headers=headers, timeout=60,
                              params={"url": "ctr-2.0", "model_name": "ranker"})
        assert response.status_code == 200, response.text
        answers = _answers(server.inference + "/predictions/ranker", batch)
        assert {status for status, _ in answers} == {200}
        assert all(body == pytest.approx(expected(coll2, dense2, batch), rel=1e-6)
                   for _, body in answers)
        assert set(_requests_by_process(server)) == {"0", "1"}
        assert httpx.delete(server.management + "/models/ranker", headers=headers,
                            timeout=60).status_code == 200
        answers = _answers(server.inference + "/predictions/ranker", batch, connections=10)
        assert {status for status, _ in answers} == {404}
        assert {s for s, _ in _answers(server.inference + "/predictions/ctr", batch,
                                       connections=10)} == {200}
    finally:
        server.stop()


# ------------------------------------------------------------ SIGTERM loses no connection
def _proc_status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _stopped(pid: int) -> bool:
    return _proc_status(pid, "State") in ("T", "t")


def _term_pending(pid: int) -> bool:
    """Whether a SIGTERM waits to be delivered to (stopped) process ``pid``."""
    return bool(int(_proc_status(pid, "ShdPnd"), 16) & (1 << (signal.SIGTERM - 1)))


def _replica_of(pid: int) -> int:
    """The replica process of server ``pid`` (its child started by multiprocessing's spawn,
    not the resource tracker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):  # gone meanwhile
            continue
        if ppid == pid and b"--multiprocessing-fork" in argv:
            return int(stat.parent.name)
    raise AssertionError(f"server pid {pid} has no replica process")


def test_sigterm_answers_every_request_sent_before_it(tmp_path):
    """``dynembed serve --processes 2`` answers every request sent before its SIGTERM.

    Each process listens on a socket of its own (SO_REUSEPORT), with its own accept queue:
    closing it at shutdown reset the connections still queued there, whose clients had
    sent their requests. To queue them every time, both processes are stopped (SIGSTOP)
    while 48 new connections open and send a request, and 16 kept-alive ones their second
    one; each process is let go once its SIGTERM waits (the replica's comes from the first
    process, when it is done), past its event loop's 0.1 s tick, so that the loop starts
    the shutdown before it polls a socket, as a busy loop does when it sees the SIGTERM
    before the connections that queued meanwhile. Before the fix every new connection was
    reset, and most kept-alive ones, in every run (12 of 12); each process gets some of
    the 48 new connections except with probability 2^-47.
    """
    store = tmp_path / "store"
    store.mkdir()
    coll, dense = write_package(store)
    proc, urls = start_cli_server([
        "--model-store", str(store), "--models", "ctr=ctr-1.0", "--processes", "2",
        "--inference-address", "127.0.0.1:0", "--management-address", "127.0.0.1:0",
        "--metrics-address", "127.0.0.1:0", "--disable-token-auth",
        "--key-file", str(tmp_path / "key_file.json"),
        "--batch-size", "16", "--max-batch-delay", "5"], ready="/v2/models/ctr/ready")
    batch = examples(3, seed=4)
    request = predict_request(batch)
    address = urls["inference"].removeprefix("http://").rsplit(":", 1)
    pids, opened, answers = [proc.pid], [], []
    try:
        eventually(lambda: 'process="1"' in httpx.get(urls["metrics"] + "/metrics").text,
                   timeout=60)  # the replica serves
        pids.append(_replica_of(proc.pid))
        kept = [socket.create_connection((address[0], int(address[1]))) for _ in range(16)]
        opened += kept
        for sock in kept:  # kept alive after a first answer
            sock.sendall(request)
            assert read_answer(sock)[0] == 200
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        eventually(lambda: all(_stopped(pid) for pid in pids))
        fresh = [socket.create_connection((address[0], int(address[1]))) for _ in range(48)]
        opened += fresh
        for sock in opened:
            sock.sendall(request)
        proc.send_signal(signal.SIGTERM)
        for pid in pids:  # the first process sends the replica its SIGTERM once it is done
            eventually(lambda pid=pid: _term_pending(pid), timeout=60)
            time.sleep(0.3)
            os.kill(pid, signal.SIGCONT)
        answers = [read_answer(sock) for sock in opened]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for sock in opened:
            sock.close()
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    want = expected(coll, dense, batch)
    failed = collections.Counter(a if isinstance(a, str) else a[0] for a in answers
                                 if isinstance(a, str) or a[0] != 200)
    assert not failed, f"{sum(failed.values())} of {len(answers)} requests failed: {failed}"
    assert all(body == pytest.approx(want, rel=1e-6) for _, _, body in answers)
    assert code == 0
