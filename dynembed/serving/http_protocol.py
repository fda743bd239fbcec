"""uvicorn's httptools protocol, sending each response in one write and closing no
connection whose request has arrived.

uvicorn writes a response's status line and headers, then its body, as two
``transport.write`` calls. On an idle socket each write is a ``send`` system call and, with
``TCP_NODELAY``, a TCP segment of its own that wakes the client; under load these two sends
were the largest single cost of the event loop (py-spy). :class:`CoalescingHttpProtocol`
gives uvicorn a transport that holds what is written during one step of the event loop and
sends it together at the end of that step, so a response whose body follows its headers
at once (every JSON answer) leaves in one send. Order, flow control and closing are the
transport's own.

When the server shuts down, uvicorn closes at once every connection that is not answering
a request, also one whose next request has arrived but is not read yet (its bytes wait in
the socket); closing a socket with unread input makes the kernel reset the connection, so
the client, who sent its request before the shutdown, got "connection reset" instead of
an answer. :class:`CoalescingHttpProtocol` closes an idle connection, at shutdown and when
its keep-alive time runs out, only when nothing waits to be read on it; at shutdown a
connection just accepted (its first request on the way) gets uvicorn's keep-alive timeout
to send it. The requests read after the shutdown began are answered with
``Connection: close``.
"""

from __future__ import annotations

import asyncio
import struct

try:  # the size of a socket's unread input (Unix)
    import fcntl
    import termios
except ImportError:  # pragma: no cover - Windows: uvicorn's shutdown as it is
    fcntl = termios = None

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


def _has_input(transport: asyncio.Transport) -> bool:
    """Whether bytes have arrived on ``transport``'s socket that it has not read yet."""
    sock = transport.get_extra_info("socket")
    if fcntl is None or sock is None:
        return False
    try:
        size = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    except (OSError, ValueError):  # closed meanwhile
        return False
    return struct.unpack("i", size)[0] > 0


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` over a :class:`_CoalescingTransport`, which closes
    no connection whose request has arrived (see the module's docstring).

    Pass the class as ``uvicorn.Config(http=...)``.
    """

    _stopping = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))

    def shutdown(self) -> None:
        """Called by uvicorn when the server shuts down: the connection closes once it has
        answered the requests that have arrived on it (uvicorn's own closes an idle one at
        once, even with a request unread)."""
        self._stopping = True
        if self.cycle is not None and not self.cycle.response_complete:
            super().shutdown()  # answering: closes after this answer
        elif _has_input(self.transport):
            pass  # a request has arrived: it is read next, answered, and the connection closed
        elif self.cycle is None:  # just accepted: its request is on the way
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)
        else:
            self.transport.close()  # idle after an answer: a close its client expects

    def timeout_keep_alive_handler(self) -> None:
        if _has_input(self.transport):  # a request came in just now: read and answer it
            return
        super().timeout_keep_alive_handler()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._stopping and self.cycle is not None:  # the last request it answers
            self.cycle.keep_alive = False
