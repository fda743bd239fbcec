"""The coalescing transport: writes of one event-loop step leave in one write, in order."""

from __future__ import annotations

import asyncio

from dynembed.serving.http_protocol import _CoalescingTransport


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
