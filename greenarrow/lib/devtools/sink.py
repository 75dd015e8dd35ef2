"""A counting SMTP sink: accepts mail, throws it away (or files it), counts it.

The demo, the integration tests and the benchmarks need a peer that takes
everything `remote` sends as fast as it can be sent, and says exactly how much
arrived; GreenArrow ships one too (`greenarrow-sink`, spec section 10). It is
an `asyncio.Protocol` that parses SMTP lines itself instead of using aiosmtpd,
because it must take thousands of messages per second on one core and a
benchmark must measure the engine, not its peer.

Only what a sending MTA needs is spoken: EHLO/HELO, MAIL, RCPT, DATA
(dot-terminated, dot-unstuffed), RSET, NOOP, QUIT, plus VRFY (252) and HELP.
PIPELINING is advertised and honoured: every complete command in the input is
answered in order, and the answers to one read go out in one write. No TLS,
no AUTH, no size limit.

After DATA each message draws one number in [0, 1) from a `random.Random(seed)`:
below `defer_rate` it is answered `451`, below `defer_rate + fail_rate` `554`,
otherwise `250` and counted. `delay` seconds pass before that final reply
(commands pipelined behind it wait too, so replies stay in order).

Counting: `Counters` holds accepted messages, their recipients and bytes (the
DATA as received, dot-stuffed, without the final `.` line), deferred and
failed messages, and sessions (connections). A message counts when its 250
is written; a client that closes its side before that (mid-DATA, or during
`delay`) counts nothing.

Output for harnesses: with `count_file`, the line `Counters.line()` is
rewritten there (temporary file + rename, so a reader never sees half a line)
when the sink starts, at most every 50 ms while counters change, and once
more on close. With `maildir`, each accepted message is filed into that
Maildir (tmp/ then rename into new/) as received (CRLF kept, dot-unstuffed),
after one `Return-Path: <sender>` line and one `X-Sink-Rcpt: recipient` line
per recipient in RCPT order.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import threading
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO, TypeVar

from greenarrow.lib.local.maildir import Maildir
from greenarrow.lib.smtp.server import parse_path

__all__ = ["Counters", "Sink", "SinkOptions", "SinkThread", "serve"]

T = TypeVar("T")

COUNT_FILE_INTERVAL = 0.05  # seconds between two rewrites of the count file
MAX_LINE = 64 * 1024  # a command line longer than this closes the session


@dataclass
class Counters:
    """What the sink has seen; `line()` is the harness format."""

    messages: int = 0
    recipients: int = 0
    deferred: int = 0
    failed: int = 0
    sessions: int = 0
    bytes: int = 0

    def line(self) -> str:
        """`messages=N recipients=N deferred=N failed=N sessions=N bytes=N` (no newline)."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    @classmethod
    def parse(cls, line: str) -> Counters:
        """Read back a `line()`, as a harness reading the count file would."""
        values = dict(part.split("=", 1) for part in line.split())
        return cls(**{f.name: int(values[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class SinkOptions:
    """How the sink answers and where it reports. Rates are fractions 0..1."""

    defer_rate: float = 0.0
    fail_rate: float = 0.0
    delay: float = 0.0
    seed: int | None = None
    maildir: Path | None = None
    count_file: Path | None = None
    hostname: str = "sink.invalid"

    def __post_init__(self) -> None:
        for name in ("defer_rate", "fail_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.defer_rate + self.fail_rate > 1.0:
            raise ValueError("defer_rate + fail_rate must not exceed 1")
        if self.delay < 0:
            raise ValueError("delay must not be negative")


# Replies, built once.
_R_250_OK = b"250 ok\r\n"
_R_221 = b"221 bye\r\n"
_R_354 = b"354 go ahead, end with <CRLF>.<CRLF>\r\n"
_R_451 = b"451 4.3.0 deferred by the sink\r\n"
_R_554 = b"554 5.3.0 failed by the sink\r\n"
_R_250_DATA = b"250 ok accepted\r\n"
_R_252 = b"252 send some mail, I'll try my best\r\n"
_R_214 = b"214 EHLO HELO MAIL RCPT DATA RSET NOOP QUIT\r\n"
_R_500_LONG = b"500 5.5.2 line too long\r\n"
_R_501_MAIL = b"501 5.5.4 syntax: MAIL FROM:<address>\r\n"
_R_501_RCPT = b"501 5.5.4 syntax: RCPT TO:<address>\r\n"
_R_502 = b"502 5.5.1 command not implemented\r\n"
_R_503_NESTED = b"503 5.5.1 nested MAIL command\r\n"
_R_503_MAIL = b"503 5.5.1 MAIL first\r\n"
_R_503_RCPT = b"503 5.5.1 RCPT first\r\n"


def _address(arg: bytes, keyword: str) -> bytes | None:
    """The path of `MAIL FROM:<a> PARAMS` / `RCPT TO:<a>`; None when malformed."""
    parsed = parse_path(arg.decode("latin-1").lstrip(), keyword)
    return None if parsed is None else parsed[0].encode("latin-1")


class _Session(asyncio.Protocol):
    """One SMTP connection."""

    __slots__ = (
        "sink",
        "transport",
        "buf",
        "body",
        "scan",
        "in_data",
        "waiting",
        "closed",
        "sender",
        "rcpts",
    )

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # unparsed command input
        # DATA input; starts with a sentinel "\n" standing for the end of the
        # DATA line, so that the terminator is always found as "\n.\r\n".
        self.body = bytearray()
        self.scan = 0  # where the search for the terminator resumes in body
        self.in_data = False
        self.waiting = False  # a delayed DATA reply is pending
        self.closed = False
        self.sender: bytes | None = None
        self.rcpts: list[bytes] = []

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sink = self.sink
        sink._sessions.add(self)
        sink.counters.sessions += 1
        sink._changed()
        transport.write(sink._greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.in_data = False
        self.body = bytearray()
        self.sink._sessions.discard(self)
        self.sink._session_ended()

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self.body += data
        else:
            self.buf += data
        if not self.waiting:
            self._process()

    # -- the state machine -------------------------------------------------

    def _process(self) -> None:
        """Answer every complete command and message buffered so far, in order."""
        out: list[bytes] = []
        while not self.closed and not self.waiting:
            if self.in_data:
                if not self._data_end(out):
                    break
                continue
            buf = self.buf
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    out.append(_R_500_LONG)
                    self._close(out)
                break
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[: nl + 1]
            self._command(line, out)
        if out and not self.closed:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]

    def _command(self, line: bytes, out: list[bytes]) -> None:
        verb = line[:4].upper()
        if verb == b"MAIL":
            if self.sender is not None:
                out.append(_R_503_NESTED)
                return
            sender = _address(line[4:], "FROM:")
            if sender is None:
                out.append(_R_501_MAIL)
                return
            self.sender = sender
            out.append(_R_250_OK)
        elif verb == b"RCPT":
            if self.sender is None:
                out.append(_R_503_MAIL)
                return
            rcpt = _address(line[4:], "TO:")
            if not rcpt:
                out.append(_R_501_RCPT)
                return
            self.rcpts.append(rcpt)
            out.append(_R_250_OK)
        elif verb == b"DATA":
            if not self.rcpts:
                out.append(_R_503_RCPT if self.sender is not None else _R_503_MAIL)
                return
            out.append(_R_354)
            self.in_data = True
            # Whatever followed DATA in the same read is message text.
            self.body = bytearray(b"\n") + self.buf
            self.buf = bytearray()
            self.scan = 0
        elif verb == b"EHLO":
            self._reset()
            out.append(self.sink._ehlo)
        elif verb == b"HELO":
            self._reset()
            out.append(self.sink._helo)
        elif verb == b"RSET":
            self._reset()
            out.append(_R_250_OK)
        elif verb == b"NOOP":
            out.append(_R_250_OK)
        elif verb == b"QUIT":
            out.append(_R_221)
            self._close(out)
        elif verb == b"VRFY":
            out.append(_R_252)
        elif verb == b"HELP":
            out.append(_R_214)
        else:
            out.append(_R_502)

    def _data_end(self, out: list[bytes]) -> bool:
        """Look for the `.` line; on finding it, answer the message. False: need more input."""
        body = self.body
        pos = self.scan
        while True:
            j = body.find(b"\n.", pos)
            if j < 0:
                self.scan = max(len(body) - 1, 0)
                return False
            after = body[j + 2 : j + 4]
            if after == b"\r\n":
                rest = j + 4
                break
            if after[:1] == b"\n":
                rest = j + 3
                break
            if len(after) < 2 and after in (b"", b"\r"):
                self.scan = j  # "\n." or "\n.\r" at the end: wait for more
                return False
            pos = j + 2
        message = bytes(body[1 : j + 1])
        self.buf = bytearray(body[rest:])
        self.body = bytearray()
        self.in_data = False
        sink = self.sink
        reply = sink._outcome()
        if sink.options.delay > 0:
            # Hold the reply and everything pipelined behind it (input keeps
            # being read into buf, so a client that leaves is noticed).
            if out:
                self.transport.write(b"".join(out))  # type: ignore[union-attr]
                out.clear()
            self.waiting = True
            asyncio.get_running_loop().call_later(sink.options.delay, self._delayed, reply, message)
            return True
        out.append(self._finish(reply, message))
        return True

    def _delayed(self, reply: bytes, message: bytes) -> None:
        self.waiting = False
        if self.closed:
            return
        self.transport.write(self._finish(reply, message))  # type: ignore[union-attr]
        self._process()

    def _finish(self, reply: bytes, message: bytes) -> bytes:
        """Count the transaction by its outcome, file it if accepted; return the reply."""
        sink = self.sink
        if reply is _R_250_DATA:
            sink._accept(self.sender or b"", self.rcpts, message)
        elif reply is _R_451:
            sink.counters.deferred += 1
            sink._changed()
        else:
            sink.counters.failed += 1
            sink._changed()
        self._reset()
        return reply

    def _reset(self) -> None:
        self.sender = None
        self.rcpts = []

    def _close(self, out: list[bytes]) -> None:
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]
            out.clear()
        self.closed = True
        self.transport.close()  # type: ignore[union-attr]


class Sink:
    """The sink server: listeners, sessions, counters, count file, maildir.

    Lives on one event loop: `start` and `close` from a coroutine on it, or use
    `SinkThread` from synchronous code.
    """

    def __init__(self, options: SinkOptions | None = None) -> None:
        self.options = options or SinkOptions()
        self.counters = Counters()
        self._rng = random.Random(self.options.seed)
        self._servers: list[asyncio.Server] = []
        self._sessions: set[_Session] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._idle: asyncio.Event | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._seq = 0
        host = self.options.hostname.encode()
        self._greeting = b"220 " + host + b" ESMTP greenarrow sink\r\n"
        self._helo = b"250 " + host + b"\r\n"
        self._ehlo = (
            b"250-" + host + b"\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 0\r\n"
        )
        self._maildir = Maildir(self.options.maildir) if self.options.maildir is not None else None

    @property
    def active_sessions(self) -> int:
        """Connections open right now."""
        return len(self._sessions)

    async def start(self, listen: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Listen on every (host, port); return the bound addresses (port 0 picks one)."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        try:
            for host, port in listen:
                server = await loop.create_server(
                    lambda: _Session(self), host, port, reuse_address=True, backlog=1024
                )
                self._servers.append(server)
                for sock in server.sockets:
                    name = sock.getsockname()
                    bound.append((name[0], name[1]))
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise
        self._flush()
        return bound

    async def close(self, grace: float = 0.0) -> None:
        """Stop listening; give open sessions up to `grace` seconds to QUIT; close the rest.

        Writes the count file one last time.
        """
        for server in self._servers:
            server.close()
        if grace > 0 and self._sessions:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                pass
        for session in list(self._sessions):
            session.closed = True
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush()

    async def wait_for_messages(self, count: int) -> None:
        """Return once `count` messages have been accepted."""
        if self.counters.messages >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        await future

    # -- called by sessions ------------------------------------------------

    def _outcome(self) -> bytes:
        opts = self.options
        if opts.defer_rate <= 0 and opts.fail_rate <= 0:
            return _R_250_DATA
        draw = self._rng.random()
        if draw < opts.defer_rate:
            return _R_451
        if draw < opts.defer_rate + opts.fail_rate:
            return _R_554
        return _R_250_DATA

    def _accept(self, sender: bytes, rcpts: list[bytes], message: bytes) -> None:
        c = self.counters
        c.messages += 1
        c.recipients += len(rcpts)
        c.bytes += len(message)
        if self.options.maildir is not None:
            self._file(sender, rcpts, message)
        if self._waiters:
            ready = [w for w in self._waiters if w[0] <= c.messages]
            if ready:
                self._waiters = [w for w in self._waiters if w[0] > c.messages]
                for _, future in ready:
                    if not future.done():
                        future.set_result(None)
        self._changed()

    def _file(self, sender: bytes, rcpts: list[bytes], message: bytes) -> None:
        """Deliver into the Maildir: write under tmp/, rename into new/."""
        assert self._maildir is not None
        body = message.replace(b"\n..", b"\n.")
        if body.startswith(b".."):
            body = body[1:]
        head = [b"Return-Path: <", sender, b">\r\n"]
        for rcpt in rcpts:
            head += (b"X-Sink-Rcpt: ", rcpt, b"\r\n")
        self._maildir.deliver([*head, body])

    def _session_ended(self) -> None:
        if self._idle is not None and not self._sessions:
            self._idle.set()

    def _changed(self) -> None:
        """Counters moved: schedule a count-file rewrite, at most one per interval."""
        if self.options.count_file is None or self._flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        wait = max(0.0, self._last_flush + COUNT_FILE_INTERVAL - loop.time())
        self._flush_handle = loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        path = self.options.count_file
        if path is None:
            return
        self._last_flush = asyncio.get_running_loop().time()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.counters.line() + "\n")
        os.replace(tmp, path)


async def serve(
    listen: Iterable[tuple[str, int]],
    options: SinkOptions | None = None,
    *,
    exit_after: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> Counters:
    """Run a sink until SIGTERM/SIGINT (or `exit_after` accepted messages); return its counters.

    The program `greenarrow sink` in one call: prints `listening on ADDR` for
    each listener to `err` (the real port when 0 was asked), the counters
    line to `out` on SIGUSR1 and on exit, and keeps the count file. Must run
    in the main thread (signal handlers).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    loop = asyncio.get_running_loop()
    sink = Sink(options)
    bound = await sink.start(listen)
    for host, port in bound:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        print(f"greenarrow sink: listening on {shown}", file=err, flush=True)
    stop = asyncio.Event()

    def report() -> None:
        print(sink.counters.line(), file=out, flush=True)

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    for sig in signals[:2]:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, report)
    waits = [asyncio.ensure_future(stop.wait())]
    if exit_after is not None:
        waits.append(asyncio.ensure_future(sink.wait_for_messages(exit_after)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        # After --exit-after, let clients read their last reply and QUIT.
        await sink.close(grace=0.0 if stop.is_set() else 1.0)
        report()
    return sink.counters


class SinkThread:
    """A sink on its own event loop in a daemon thread, for synchronous tests and benchmarks.

        with SinkThread(SinkOptions(maildir=path)) as sink:
            smtplib.SMTP(*sink.address) ...
            assert sink.wait_for(1)
            sink.counters.messages

    Counters are updated by the sink's thread; read them after a reply was
    received (a message is counted before its 250 is written) or via `wait_for`.
    """

    def __init__(
        self, options: SinkOptions | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.sink = Sink(options)
        self._listen = [(host, port)]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sink", daemon=True)
        self.addresses: list[tuple[str, int]] = []

    @property
    def counters(self) -> Counters:
        return self.sink.counters

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the first listener."""
        return self.addresses[0]

    def start(self, timeout: float = 10.0) -> SinkThread:
        self._thread.start()
        try:
            self.addresses = self._call(self.sink.start(self._listen), timeout)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            raise
        return self

    def wait_for(self, messages: int, timeout: float = 10.0) -> bool:
        """Wait until `messages` messages were accepted; False if `timeout` passed first."""
        try:
            self._call(self.sink.wait_for_messages(messages), timeout)
        except TimeoutError:
            return False
        return True

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no session is open (the sink has seen every disconnect)."""

        async def idle() -> None:
            while self.sink.active_sessions:
                await asyncio.sleep(0.005)

        try:
            self._call(idle(), timeout)
        except TimeoutError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self.sink.close(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def __enter__(self) -> SinkThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
