"""The tracker's HTTP/1.1 server: an asyncio protocol over httptools' parser.

Each complete request is answered by greenarrow.lib.tracker.answer (pure);
the replies of one event-loop turn are a batch: their event lines go to the
spool in one write(2), then the replies are sent, in order. A reply is
never sent before its event is written; when the spool cannot be written
the reply becomes a 503 (nothing is answered unrecorded).

Limits (docs/tracker.md "Limits"): a request line and headers of at most
MAX_HEAD bytes, a body of at most MAX_BODY, and each request must arrive
whole within `tracker.timeout` seconds of the connection opening or of the
previous answer (which is also the keep-alive idle limit). Methods other
than GET, HEAD and POST get 405.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from http import HTTPStatus

import httptools

from greenarrow.lib.core.rotating_log import RotatingLog
from greenarrow.lib.tracker import answer as answering
from greenarrow.lib.tracker import spool as spooling
from greenarrow.lib.tracker.settings import TrackerSettings

log = logging.getLogger("tracker")

MAX_HEAD = 8 * 1024
MAX_BODY = 8 * 1024
SWEEP_SECONDS = 0.5

_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _error_bytes(status: int, text: bytes) -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n").encode("ascii") + text


_BAD_REQUEST = _error_bytes(400, b"Bad Request\n")
_TOO_LARGE_HEAD = _error_bytes(431, b"Request Header Fields Too Large\n")
_TOO_LARGE_BODY = _error_bytes(413, b"Content Too Large\n")
_TIMEOUT = _error_bytes(408, b"Request Timeout\n")
_INTERNAL_ERROR = _error_bytes(500, b"Internal Server Error\n")


def client_address(peername: object) -> str:
    """The client's IP as events record it (IPv4-mapped IPv6 shown as IPv4)."""
    if not isinstance(peername, tuple) or not peername:
        return ""
    host = str(peername[0])
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            return str(mapped)
    return host


class TrackerServer:
    """The listeners, the open connections and the batch of replies waiting for the spool."""

    def __init__(self, settings: TrackerSettings, open_spool: Callable[[], RotatingLog]) -> None:
        self.settings = settings
        self._open_spool = open_spool
        self.spool: RotatingLog | None = open_spool()
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[HttpConnection] = set()
        self._lines: list[bytes] = []
        self._replies: list[tuple[HttpConnection, bytes, bool, bool]] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serial = 0
        self._prefix = f"{os.getpid()}.{time.time_ns()}."
        self._sweeper: asyncio.Task | None = None
        self.date = email.utils.formatdate(usegmt=True)
        self.answered = 0

    async def listen(self, host: str | None = None, port: int | None = None, ssl=None,
                     sock: socket.socket | None = None,
                     reuse_port: bool = False) -> asyncio.AbstractServer:
        """Serve on host:port (with SO_REUSEPORT if `reuse_port`: other tracker
        processes bind the same address), or on `sock`, a listening socket bound
        by the supervisor."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        where = {"sock": sock} if sock is not None else {
            "host": host, "port": port, "reuse_address": True, "backlog": 1024,
            "reuse_port": reuse_port}
        server = await loop.create_server(
            lambda: HttpConnection(self), ssl=ssl,
            ssl_handshake_timeout=self.settings.timeout if ssl else None, **where)
        self.servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        return server

    def next_serial(self) -> str:
        self._serial += 1
        return self._prefix + str(self._serial)

    def submit(self, conn: HttpConnection, reply: bytes, line: bytes | None,
               close: bool) -> None:
        """Queue a reply (and its event line) for this turn's batch."""
        if line is not None:
            self._lines.append(line)
        self._replies.append((conn, reply, line is not None, close))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the batch's events in one write(2), then send the batch's replies."""
        self._flush_scheduled = False
        replies, self._replies = self._replies, []
        lines, self._lines = self._lines, []
        written = True
        if lines:
            try:
                if self.spool is None:
                    # Reopened after a failed write: RotatingLog ends a torn last line.
                    self.spool = self._open_spool()
                self.spool.write_bytes(b"".join(lines))
            except OSError as e:
                written = False
                log.error("cannot write the event spool: %s; answering 503 until it can", e)
                if self.spool is not None:
                    self.spool.close()
                    self.spool = None
        for conn, reply, has_event, close in replies:
            if has_event and not written:
                reply, close = conn.unavailable, True
            conn.send(reply, close)
        self.answered += len(replies)

    async def _sweep(self) -> None:
        """Cut off connections past their deadline; keep the Date header current."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.date = email.utils.formatdate(usegmt=True)
            now = time.monotonic()
            for conn in [c for c in self.connections if c.deadline < now]:
                conn.expire()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        if self._replies:  # answer (and record) what was already asked, then hang up
            self.flush()
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except TimeoutError:
                pass


class HttpConnection(asyncio.Protocol):
    """One client connection: parse requests, answer them through the server's batch."""

    __slots__ = ("server", "transport", "parser", "client_ip", "deadline", "_url", "_ua",
                 "_ctype", "_body", "_head_bytes", "_error", "_closing", "_busy")

    unavailable = _error_bytes(503, b"Service Unavailable: please try again in a minute\n")

    def __init__(self, server: TrackerServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.deadline = time.monotonic() + server.settings.timeout
        self._reset()
        self._closing = False

    def _reset(self) -> None:
        self._url = b""
        self._ua = b""
        self._ctype = b""
        self._body = b""
        self._head_bytes = 0
        self._error: bytes | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.client_ip = client_address(transport.get_extra_info("peername"))
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._closing = True
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_BAD_REQUEST)
        except httptools.HttpParserError:
            self._fail(self._error or _BAD_REQUEST)

    def pause_writing(self) -> None:  # a client that does not read its answers
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        lower = name.lower()
        if lower == b"user-agent":
            self._ua = value
        elif lower == b"content-type":
            self._ctype = value

    def _grow(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD:
            self._error = _TOO_LARGE_HEAD
            raise httptools.HttpParserError("request head too large")

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > MAX_BODY:
            self._error = _TOO_LARGE_BODY
            raise httptools.HttpParserError("request body too large")
        self._body += body

    def on_message_complete(self) -> None:
        if self._closing:  # pipelined after a request that closes the connection
            return
        parser = self.parser
        method = parser.get_method().decode("ascii", "replace")
        request = answering.Request(
            method, self._url.decode("latin-1"), self.client_ip,
            self._ua.decode("utf-8", "replace"), self._ctype.decode("latin-1"), self._body)
        server = self.server
        try:
            reply = answering.answer(request, server.settings, time.time_ns(),
                                     server.next_serial())
            line = spooling.event_line(reply.event) if reply.event is not None else None
        except Exception:
            log.exception("cannot answer %s %r", method, request.target[:200])
            self._fail(_INTERNAL_ERROR)
            return
        keep_alive = parser.should_keep_alive() and reply.status != 405
        if not keep_alive:
            self._closing = True
        server.submit(self, self._encode(reply, keep_alive), line, not keep_alive)
        self._head_bytes = 0
        self.deadline = time.monotonic() + server.settings.timeout

    # -- sending -------------------------------------------------------------

    def _encode(self, reply: answering.Reply, keep_alive: bool) -> bytes:
        parts = [f"HTTP/1.1 {reply.status} {_REASONS[reply.status]}\r\n"
                 f"Date: {self.server.date}\r\n"]
        for name, value in reply.headers:
            parts.append(f"{name}: {value}\r\n")
        parts.append(f"Content-Length: {len(reply.body)}\r\n")
        if not keep_alive:
            parts.append("Connection: close\r\n")
        parts.append("\r\n")
        head = "".join(parts).encode("latin-1")
        return head if reply.head_only else head + reply.body

    def send(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        if close:
            self._closing = True
            transport.close()

    def _fail(self, reply: bytes) -> None:
        """Answer a broken or oversized request and close (nothing recorded)."""
        self._closing = True
        self.server.submit(self, reply, None, True)

    def expire(self) -> None:
        """Past the deadline: a slow or idle client is cut off."""
        if self.transport is not None and not self._closing:
            self._closing = True
            if self._head_bytes:  # mid-request: say why; an idle keep-alive just ends
                self.transport.write(_TIMEOUT)
            self.transport.close()
        self.server.connections.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
