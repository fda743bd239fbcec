"""The test helper that runs real redis-server processes: bounded waits, no strays."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import redis

from dynembed.testing import RedisCluster, RedisServer
from dynembed.testing.redis_server import _bindable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill(pid: int) -> None:
    """Cleanup of a stray the helper failed to stop (the pid is one this test saw started)."""
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def served_by(url: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


free_port_is = _bindable  # whether nothing listens on a loopback port


def bounded(call, seconds: float = 120.0):
    """Runs ``call`` on a thread; fails the test (instead of hanging it) if it never ends."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s: an unbounded wait"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_port_held_by_another_redis_server_is_not_taken_for_ours():
    """Two test runs on one machine: the second server could not bind, but the readiness
    check reached the first one, so start() returned and the tests used another run's
    server (and its data)."""
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        with pytest.raises(RuntimeError, match="exited"):
            second.start()
        assert second.proc is None
        assert served_by(first.url) == first.proc.pid
    second.close()


def test_a_port_taken_after_it_was_chosen_is_replaced_by_a_free_one():
    """Another process took the chosen port before the server started: the readiness
    check sent PING to it and waited for an answer forever (no read timeout)."""
    server = RedisServer()
    squatter = socket.socket()  # listens (the kernel accepts connections) but never answers
    squatter.bind(("127.0.0.1", server.port))
    squatter.listen()
    try:
        bounded(server.start)
        assert server.port != squatter.getsockname()[1]
        assert served_by(server.url) == server.proc.pid
    finally:
        squatter.close()
        server.close()


def test_starting_a_running_server_again_is_refused():
    """A second start() replaced the running process's handle: that process was never
    stopped and outlived the tests."""
    server = RedisServer().start()
    pid = server.proc.pid
    try:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        assert served_by(server.url) == pid
        server.close()
        assert not alive(pid)
    finally:
        server.close()
        kill(pid)


def test_a_cluster_that_fails_to_form_stops_its_servers():
    """start() raised with the node processes still running, and no one left to stop them."""
    cluster = RedisCluster()
    try:
        # redis-cli waits a second for the nodes to join: 0.05 s never suffices
        with pytest.raises(TimeoutError, match="cluster"):
            cluster.start(timeout=0.05)
        for server in cluster.servers:
            assert server.proc is None
            assert free_port_is(server.port), f"a node still listens on {server.port}"
    finally:
        cluster.close()  # stops what the failed start left running


def test_a_cluster_needs_three_nodes():
    with pytest.raises(ValueError, match="nodes must be an int >= 3"):
        RedisCluster(nodes=1)


def test_servers_left_open_stop_when_the_process_exits():
    """A script (or a test run stopped early) that never closed its server left a
    redis-server running after it exited."""
    code = textwrap.dedent("""
        from dynembed.testing import RedisServer
        server = RedisServer().start()
        print(server.proc.pid, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    try:
        assert not alive(pid), "the redis-server outlived the process that started it"
    finally:
        kill(pid)
