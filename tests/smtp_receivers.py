"""Scripted SMTP receivers on loopback for tests of the outbound side.

Two servers, each running its own event loop in a daemon thread, listening on
127.0.0.1 or any other 127.0.0.x address (Linux routes all of 127/8 to the
loopback), on a free port unless one is given:

* `Receiver` is aiosmtpd: a real SMTP server that records every message
  (`ReceivedMessage`) and can be told to answer a given reply at MAIL, RCPT or
  after the data, to sleep before answering, to drop the connection, to offer
  STARTTLS (`tls_context`) or PIPELINING.
* `ScriptedServer` is a few lines of raw asyncio for what aiosmtpd will not do:
  any greeting or reply (554 greeting, EHLO rejected, multi-line replies),
  detecting whether the client really pipelined, a STARTTLS that fails.

Both take `host` and `port`; put several on one port with distinct addresses
(start the first with port 0, pass its `.port` to the others), since the
client's `port` applies to all MX hosts. Behaviour attributes may be changed
while a server runs. `self_signed_context()` makes a server TLS context.

    with Receiver("127.0.0.3") as rx:
        result = run(deliver(attempt, [MxHost("mx", 0, [rx.host])], port=rx.port))
        assert rx.messages[0].content == attempt.message
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import ssl
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

__all__ = ["ReceivedMessage", "Receiver", "ScriptedServer", "self_signed_context"]


class _LoopThread:
    """An event loop in a daemon thread; `call` runs a coroutine there and waits (bounded)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5) if tasks else None

        try:
            self.call(cancel_all())
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class ReceivedMessage:
    """One message as `Receiver` got it; `content` is dot-unstuffed and CRLF-ended, as sent."""

    sender: str
    recipients: list[str]
    content: bytes
    peer: tuple[str, int]
    helo: str | None
    tls: bool
    mail_options: list[str] = field(default_factory=list)


class _Handler:
    """aiosmtpd hooks that apply the owning Receiver's behaviour attributes."""

    def __init__(self, receiver: Receiver) -> None:
        self.rx = receiver

    async def _behave(self, phase: str, server: SMTP) -> bool:
        """Sleep and/or drop as told for `phase`; True when the connection was dropped."""
        rx = self.rx
        if rx.delay and rx.delay_at == phase:
            await asyncio.sleep(rx.delay)
        if rx.drop_at == phase:
            if server.transport is not None:
                server.transport.abort()
            return True
        return False

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.rx.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if await self._behave("mail", server):
            return "421 dropped"
        if self.rx.mail_reply:
            return self.rx.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if await self._behave("rcpt", server):
            return "421 dropped"
        if self.rx.rcpt_reply:
            return self.rx.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if await self._behave("data", server):
            return "421 dropped"
        if self.rx.data_reply:
            return self.rx.data_reply
        self.rx.messages.append(
            ReceivedMessage(
                sender=envelope.mail_from,
                recipients=list(envelope.rcpt_tos),
                content=envelope.original_content,
                peer=session.peer,
                helo=session.host_name,
                tls=session.ssl is not None,
                mail_options=list(envelope.mail_options),
            )
        )
        return "250 2.0.0 Ok: queued as TEST"


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting the connections open at once on its Receiver."""

    def __init__(self, receiver: Receiver, *args: Any, **kwargs: Any) -> None:
        self._receiver = receiver
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        rx = self._receiver
        rx.active += 1
        rx.max_active = max(rx.max_active, rx.active)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._receiver.active -= 1
        super().connection_lost(exc)


class Receiver:
    """An aiosmtpd server on `host`:`port` that records messages and misbehaves on demand.

    Behaviour (attributes, changeable at any time):
      mail_reply / rcpt_reply / data_reply: a reply such as "550 5.1.1 no such
        user" given instead of accepting MAIL, RCPT, or the message after DATA;
      delay, delay_at: sleep `delay` seconds before answering at "mail", "rcpt"
        or "data" (after the data);
      drop_at: "mail", "rcpt" or "data": close the connection instead of answering;
      pipelining: offer PIPELINING in the EHLO reply (aiosmtpd does not by itself).
    `tls_context` (fixed at construction) offers STARTTLS.
    Records: `messages` (ReceivedMessage), `connections` (count), `active` and
    `max_active` (connections open now, and the most ever open at once).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        mail_reply: str | None = None,
        rcpt_reply: str | None = None,
        data_reply: str | None = None,
        delay: float = 0.0,
        delay_at: str = "data",
        drop_at: str | None = None,
        pipelining: bool = False,
        tls_context: ssl.SSLContext | None = None,
        hostname: str = "receiver.test",
    ) -> None:
        self.host = host
        self.port = port
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.delay = delay
        self.delay_at = delay_at
        self.drop_at = drop_at
        self.pipelining = pipelining
        self.tls_context = tls_context
        # Always a fixed hostname: aiosmtpd's default asks the resolver (socket.getfqdn).
        self.hostname = hostname
        self.messages: list[ReceivedMessage] = []
        self.connections = 0
        self.active = 0  # connections open now
        self.max_active = 0  # the most that were ever open at once
        self._lt: _LoopThread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._protocols: list[SMTP] = []

    def _factory(self) -> SMTP:
        assert self._lt is not None
        self.connections += 1
        protocol = _CountingSMTP(
            self,
            _Handler(self),
            hostname=self.hostname,
            tls_context=self.tls_context,
            loop=self._lt.loop,
            timeout=30,
        )
        self._protocols.append(protocol)
        return protocol

    def start(self) -> Receiver:
        """Listen; afterwards `port` is the real port."""
        self._lt = _LoopThread()

        async def serve() -> asyncio.AbstractServer:
            return await asyncio.get_running_loop().create_server(
                self._factory, self.host, self.port
            )

        try:
            self._server = self._lt.call(serve())
        except BaseException:
            self._lt.stop()
            self._lt = None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop listening, cut every connection, end the thread; safe to call twice."""
        lt, self._lt = self._lt, None
        if lt is None:
            return

        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.abort()

        try:
            lt.call(shut())
        finally:
            lt.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


DEFAULT_REPLIES: dict[str, str | list[str] | None] = {
    "HELO": "250 scripted.test",
    "MAIL": "250 2.1.0 ok",
    "RCPT": "250 2.1.5 ok",
    "DATA": "354 go ahead",
    "DOT": "250 2.0.0 ok queued",
    "RSET": "250 ok",
    "NOOP": "250 ok",
    "QUIT": "221 bye",
    "STARTTLS": "220 ready",
}


class ScriptedServer:
    """A raw SMTP server whose every reply is given by the test.

    greeting: the first reply (str, or a list of lines for a multi-line reply).
    extensions: EHLO keywords offered (default PIPELINING, 8BITMIME, SIZE).
    replies: overrides of DEFAULT_REPLIES by verb ("EHLO", "MAIL", "RCPT",
      "DATA", "DOT" = after the message, ...); a value None closes the
      connection instead of answering. A "220" reply to STARTTLS is followed
      by bytes that are not TLS and a close, so the client's handshake fails.
    hold_after_mail: seconds to wait, before answering MAIL, for the RCPT and
      DATA of a pipelining client (then answered in order). `pipelined` records,
      per MAIL, whether they came without waiting for the MAIL reply.
    hold_after_rset: the same for RSET and the MAIL, RCPT and DATA behind it
      (`rset_pipelined`).
    Records: `commands` (every command line, all connections), `raw_messages`
    (the data between DATA and the final dot, still dot-stuffed),
    `connections` (count).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        greeting: str | list[str] = "220 scripted.test ESMTP",
        extensions: list[str] | None = None,
        replies: dict[str, str | list[str] | None] | None = None,
        hold_after_mail: float = 0.0,
        hold_after_rset: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.greeting = greeting
        self.extensions = (
            ["PIPELINING", "8BITMIME", "SIZE 52428800"] if extensions is None else extensions
        )
        self.replies: dict[str, str | list[str] | None] = dict(DEFAULT_REPLIES)
        self.replies.update(replies or {})
        self.hold_after_mail = hold_after_mail
        self.commands: list[str] = []
        self.raw_messages: list[bytes] = []
        self.pipelined: list[bool] = []
        self.hold_after_rset = hold_after_rset
        self.rset_pipelined: list[bool] = []
        self.connections = 0
        self._lt: _LoopThread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def _ehlo_reply(self) -> list[str]:
        lines = ["250 scripted.test", *(f"250 {e}" for e in self.extensions)]
        return [line.replace("250 ", "250-", 1) for line in lines[:-1]] + [lines[-1]]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)

        async def say(reply: str | list[str]) -> None:
            lines = [reply] if isinstance(reply, str) else reply
            writer.write(b"".join(line.encode() + b"\r\n" for line in lines))
            await writer.drain()

        try:
            await say(self.greeting)
            pending: list[str] = []
            while True:
                if pending:
                    line = pending.pop(0)
                else:
                    raw = await reader.readline()
                    if not raw:
                        return
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    self.commands.append(line)
                verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == "EHLO":
                    reply = self.replies.get("EHLO", self._ehlo_reply())
                else:
                    reply = self.replies.get(verb, "502 5.5.1 unknown command")
                if verb == "MAIL" and self.hold_after_mail:
                    got = await self._collect(reader, 2, self.hold_after_mail)
                    self.commands.extend(got)
                    pending.extend(got)
                    self.pipelined.append(len(got) == 2)
                if verb == "RSET" and self.hold_after_rset:
                    got = await self._collect(reader, 3, self.hold_after_rset)
                    self.commands.extend(got)
                    pending.extend(got)
                    self.rset_pipelined.append(len(got) == 3)
                if reply is None:
                    return
                await say(reply)
                if verb == "STARTTLS" and str(reply).startswith("220"):
                    writer.write(b"this is not TLS\r\n" * 8)
                    await writer.drain()
                    return
                if verb == "DATA" and str(reply).startswith("354"):
                    body = await self._read_data(reader)
                    if body is None:
                        return
                    self.raw_messages.append(body)
                    dot = self.replies.get("DOT")
                    if dot is None:
                        return
                    await say(dot)
                if verb == "QUIT":
                    return
        except (OSError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    async def _collect(reader: asyncio.StreamReader, n: int, wait: float) -> list[str]:
        """Up to `n` more command lines that arrive within `wait` seconds."""
        got: list[str] = []
        try:
            async with asyncio.timeout(wait):
                while len(got) < n:
                    raw = await reader.readline()
                    if not raw:
                        break
                    got.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        except TimeoutError:
            pass
        return got

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                return None
            if line == b".\r\n":
                return b"".join(chunks)
            chunks.append(line)

    def start(self) -> ScriptedServer:
        """Listen; afterwards `port` is the real port."""
        self._lt = _LoopThread()

        async def serve() -> asyncio.AbstractServer:
            return await asyncio.start_server(self._handle, self.host, self.port)

        try:
            self._server = self._lt.call(serve())
        except BaseException:
            self._lt.stop()
            self._lt = None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop listening, cut every connection, end the thread; safe to call twice."""
        lt, self._lt = self._lt, None
        if lt is None:
            return

        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()

        try:
            lt.call(shut())
        finally:
            lt.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def self_signed_context(
    directory: str | Path | None = None, name: str = "receiver.test"
) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for `name`.

    Uses the `cryptography` package when installed, else the `openssl` command;
    the key and certificate are written to `directory` (a temporary folder if None).
    """
    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="tls-"))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        import subprocess

        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={name}",
                "-keyout",
                str(key_path),
                "-out",
                str(cert_path),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context
