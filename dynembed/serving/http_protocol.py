"""uvicorn's httptools protocol, sending each response in one write.

uvicorn writes a response's status line and headers, then its body, as two
``transport.write`` calls. On an idle socket each write is a ``send`` system call and, with
``TCP_NODELAY``, a TCP segment of its own that wakes the client; under load these two sends
were the largest single cost of the event loop (py-spy). :class:`CoalescingHttpProtocol`
gives uvicorn a transport that holds what is written during one step of the event loop and
sends it together at the end of that step, so a response whose body follows its headers
at once (every JSON answer) leaves in one send. Order, flow control and closing are the
transport's own.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """Proxy of an ``asyncio.Transport`` whose writes within one loop step are joined."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        """Sends what is held (called at the end of the loop step that wrote it)."""
        if self._held:
            data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
            self._held = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` over a :class:`_CoalescingTransport`.

    Pass the class as ``uvicorn.Config(http=...)``.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))
