"""The coalescing transport: writes of one event-loop step leave in one write, in order;
the protocol's shutdown closes no connection whose request has arrived."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from dynembed.serving.http_protocol import _CoalescingTransport
from tests.serving.helpers import (
    eventually,
    examples,
    expected,
    predict_request,
    read_answer,
)


class _Recorder:
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 5)}.get(name, default)


def test_writes_of_one_step_are_joined_and_later_ones_follow_in_order():
    async def main():
        inner = _Recorder()
        transport = _CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"{}")
        assert inner.writes == [] and transport.get_write_buffer_size() == 21
        await asyncio.sleep(0)  # the end of the step
        transport.write(b"next")
        await asyncio.sleep(0)
        assert transport.get_extra_info("peername") == ("127.0.0.1", 5)  # delegated
        return inner.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"next"]


def test_close_sends_what_is_held_first():
    async def main():
        inner = _Recorder()
        transport = _CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"last answer")
        transport.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
        return inner.writes, inner.closed

    assert asyncio.run(main()) == ([b"last answer"], True)


def test_shutdown_answers_the_requests_that_have_arrived_on_idle_connections(store, running):
    """uvicorn's shutdown closed every connection not answering a request at that moment:
    one kept alive whose next request had arrived but was not read yet (the close then
    resets the connection), and one just accepted whose request was on its way. The
    server's event loop is held while the request arrives, as a busy loop is, and then
    calls what uvicorn's shutdown calls on each connection."""
    batch = examples(2, seed=3)
    request = predict_request(batch)
    host, port = running.inference.removeprefix("http://").rsplit(":", 1)
    kept = socket.create_connection((host, int(port)))
    new = socket.create_connection((host, int(port)))
    try:
        kept.sendall(request)
        assert read_answer(kept)[0] == 200  # now idle, kept alive
        connections = running.server._server.server_state.connections
        eventually(lambda: len(connections) == 2)  # both accepted
        loop = next(iter(connections)).loop
        held, arrived, shut = threading.Event(), threading.Event(), threading.Event()

        def shut_down():  # on the server's loop, as uvicorn's Server.shutdown
            held.set()
            arrived.wait(30)
            for connection in list(connections):
                connection.shutdown()
            shut.set()

        loop.call_soon_threadsafe(shut_down)
        assert held.wait(30)
        kept.sendall(request)  # arrives while the loop is held: not read at the shutdown
        arrived.set()
        assert shut.wait(30)
        new.sendall(request)  # its first request, sent just after the shutdown began
        want = expected(*store[1], batch)
        for sock in (kept, new):
            answer = read_answer(sock)
            assert not isinstance(answer, str), answer
            status, headers, body = answer
            assert status == 200 and body == pytest.approx(want, rel=1e-6)
            assert headers.get("connection") == "close"  # the last one: not held open
            sock.settimeout(30)
            assert sock.recv(1) == b""  # then closed by the server
    finally:
        kept.close()
        new.close()


def test_a_request_that_arrives_as_its_keep_alive_time_runs_out_is_answered(store, running):
    """The keep-alive timer closed an idle connection even when its next request had
    arrived but was not read yet (uvloop runs due timers before it reads sockets, so a
    loop busy past the timeout did), resetting it."""
    batch = examples(2, seed=5)
    request = predict_request(batch)
    host, port = running.inference.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as kept:
        kept.sendall(request)
        assert read_answer(kept)[0] == 200  # now idle, kept alive
        connections = running.server._server.server_state.connections
        eventually(lambda: len(connections) == 1)  # the start's health checks closed
        [connection] = connections
        held, arrived, timed_out = threading.Event(), threading.Event(), threading.Event()

        def time_out():  # on the server's loop, as the keep-alive timer
            held.set()
            arrived.wait(30)
            connection.timeout_keep_alive_handler()
            timed_out.set()

        connection.loop.call_soon_threadsafe(time_out)
        assert held.wait(30)
        kept.sendall(request)  # arrives while the loop is held
        arrived.set()
        assert timed_out.wait(30)
        answer = read_answer(kept)
        assert not isinstance(answer, str), answer
        assert answer[0] == 200 and answer[2] == pytest.approx(expected(*store[1], batch),
                                                              rel=1e-6)
