"""One outbound SMTP delivery attempt: the heart of the `remote` worker.

Hand-written over asyncio streams rather than smtplib/aiosmtplib because the
worker needs a result per protocol phase in qmail-remote's wording, PIPELINING,
and thousands of concurrent attempts in one event loop: one StreamReader and
StreamWriter per session, one timer per reply, no thread.

`deliver(attempt, hosts)` tries the addresses of each `MxHost` in order, each
through a `Session`: `Session.open` connects, reads the greeting, says EHLO and
does STARTTLS; `Session.send` runs one MAIL/RCPT/DATA transaction;
`Session.quit` ends it. Keeping sessions open and sending further messages
after RSET (connection reuse) only needs a pool of open sessions: `send` leaves
the session in sync after every reply it reads, and `reusable` tells whether
it still is.

Decisions that callers see:

* Moving on to the next address/host: on a failed connection (refused,
  unreachable, timed out), and on any 4xx reply, lost connection or timeout
  *before MAIL FROM is accepted* (greeting, EHLO, STARTTLS, MAIL). So a `421`
  greeting sends the attempt on to the next MX. A 5xx before that point is a
  failure at once: the remote host refused the message for good.
* When no host accepted MAIL: if some host answered, the result is the
  deferral of the first (most preferred) host that answered; if none could
  be connected to, "Sorry, I wasn't able to establish an SMTP connection.
  (#4.4.1)". `mx_hostname`/`mx_ip` then name the last address tried.
* After MAIL FROM is accepted, every outcome is final for this attempt:
  5xx -> failure, 4xx (or any other unexpected code) -> deferral, lost
  connection or timeout -> deferral "Connected to {ip} but connection died.
  (#4.4.2)".
* Remote replies appear as "/Remote host said: " followed by the reply's lines
  joined with "/" (qmail-send writes qmail-remote's newlines as "/"), with
  control characters replaced by spaces, at most `MAX_TEXT` characters.
* STARTTLS ("opportunistic" or "required") accepts any certificate: it
  encrypts, it does not authenticate (like Postfix's "encrypt" level). An
  opportunistic handshake failure retries the same address once in plain text.
  "required" with no STARTTLS, a refused STARTTLS or a failed handshake is a
  deferral for that host (#4.7.4), and the attempt moves on to the next one.
* Timeouts: RFC 5321 section 4.5.3.2 per phase; EHLO, HELO, STARTTLS and the
  TLS handshake use the `mail` value; QUIT waits at most `quit` seconds.
* An address with CR or LF is a failure without any connection: it would
  inject commands.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from greenarrow.lib.core.remote_link import DEFERRAL, FAILURE, SUCCESS
from greenarrow.lib.core.wire_encoding import seven_bit
from greenarrow.lib.smtp.mx import MxHost

__all__ = [
    "DEFERRAL",
    "FAILURE",
    "SUCCESS",
    "Attempt",
    "ConnectError",
    "Result",
    "Session",
    "SessionError",
    "Timeouts",
    "deliver",
    "dot_stuff",
]


NO_CONNECTION_TEXT = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"
MAX_TEXT = 2000
"""Remote reply text kept in a result, in characters: logs stay bounded."""
MAX_REPLY_LINES = 200
"""A longer multi-line reply is a broken (or hostile) server."""
BODY_CHUNK = 256 * 1024
"""The body is written in blocks of this size, each with the `data_block` timeout."""

STARTTLS_MODES = ("never", "opportunistic", "required")


@dataclass(slots=True)
class Attempt:
    """One message to one recipient.

    `message` has CRLF line endings and is NOT dot-stuffed (`Session.send` does
    that). `helo` is the EHLO name, `source_ip` the local address to bind the
    outbound socket to (None: the system's choice), `starttls` one of "never",
    "opportunistic", "required".
    """

    sender: str
    recipient: str
    message: bytes
    helo: str
    source_ip: str | None = None
    starttls: str = "opportunistic"


@dataclass(slots=True)
class Result:
    """The outcome of an attempt: `status` is "success", "failure" or "deferral".

    `text` is in qmail-remote's wording; `smtp_code` is the code of the reply
    that decided, None when no reply did (no connection, connection died).
    """

    status: str
    text: str
    mx_hostname: str
    mx_ip: str
    smtp_code: int | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait in each phase (RFC 5321 section 4.5.3.2 defaults).

    `cap`, when set, lowers every phase to at most that many seconds: it is
    how the control file `timeoutremote` and the tests shorten everything.
    """

    connect: float = 60.0
    greeting: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_term: float = 600.0
    quit: float = 5.0
    cap: float | None = None

    def capped(self) -> Timeouts:
        """A copy whose every phase is at most `cap` (itself when there is no cap)."""
        cap = self.cap
        if cap is None:
            return self
        changes = {f.name: min(getattr(self, f.name), cap) for f in fields(self) if f.name != "cap"}
        return replace(self, cap=None, **changes)


class ConnectError(Exception):
    """No TCP connection to the address: the caller tries the next one."""


class SessionError(Exception):
    """`Session.open` ended without a usable session.

    `result` says what to report; `tls_failed` is true when the TLS handshake
    failed (an opportunistic caller then retries the address without TLS).
    """

    def __init__(self, result: Result, tls_failed: bool = False) -> None:
        super().__init__(result.text)
        self.result = result
        self.tls_failed = tls_failed


class _Dead(Exception):
    """The connection died, timed out, or sent something that is not SMTP."""


def dot_stuff(message: bytes) -> bytes:
    """`message` as DATA content: dots doubled at line starts, CRLF-ended, then ".\\r\\n".

    bytes.replace runs in C and returns the message itself when there is no
    dot to stuff, so the common case costs one copy (the terminator).
    """
    data = message.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if data and not data.endswith(b"\r\n"):
        return data + b"\r\n.\r\n"
    return data + b".\r\n"


_CONTROL = {i: " " for i in (*range(32), 127)}


def _said(lines: list[bytes]) -> str:
    """The remote reply as it appears in a result: lines joined with "/", no control characters."""
    text = "/".join(line.decode("utf-8", "replace") for line in lines).translate(_CONTROL)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "..."
    return "Remote host said: " + text


def _status(code: int) -> str:
    """5xx is a permanent failure; anything else that is not what we wanted is a deferral."""
    return FAILURE if 500 <= code < 600 else DEFERRAL


def _address_problem(attempt: Attempt) -> str | None:
    for address in (attempt.sender, attempt.recipient):
        if "\r" in address or "\n" in address:
            return "Sorry, I can't send to an address containing a line break. (#5.1.3)"
    return None


_tls_context: ssl.SSLContext | None = None


def client_tls_context() -> ssl.SSLContext:
    """The shared client context for STARTTLS: encryption without certificate checks.

    Made once: building an SSLContext loads OpenSSL state, too slow per attempt.
    """
    global _tls_context
    if _tls_context is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _tls_context = ctx
    return _tls_context


class Session:
    """One SMTP connection to one address, ready for transactions once `open` returns.

    `extensions` maps EHLO keywords (upper case) to their parameters; `tls`
    tells whether STARTTLS succeeded; `mail_accepted` whether the last `send`
    got MAIL FROM accepted (before that, a deferral may try another host).
    """

    __slots__ = (
        "host_name",
        "ip",
        "extensions",
        "tls",
        "mail_accepted",
        "broken",
        "_reader",
        "_writer",
        "_t",
        "_closed",
        "_deadline",
        "_waiter",
        "_watchdog",
        "_timed_out",
    )

    def __init__(
        self,
        host_name: str,
        ip: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeouts: Timeouts,
    ) -> None:
        self.host_name = host_name
        self.ip = ip
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.mail_accepted = False
        self.broken = False
        self._reader = reader
        self._writer = writer
        self._t = timeouts
        self._closed = False
        self._deadline = 0.0  # of the read or drain under way (loop time)
        self._waiter: asyncio.Task | None = None  # the task in that read or drain
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False

    @classmethod
    async def open(
        cls,
        host_name: str,
        ip: str,
        *,
        helo: str,
        port: int = 25,
        source_ip: str | None = None,
        starttls: str = "opportunistic",
        timeouts: Timeouts = Timeouts(),
        tls_context: ssl.SSLContext | None = None,
    ) -> Session:
        """Connect, read the greeting, EHLO, STARTTLS as asked.

        Raises `ConnectError` when there is no connection, `SessionError` when
        the remote host refused or failed before a transaction could start.
        """
        if starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {STARTTLS_MODES}, not {starttls!r}")
        t = timeouts.capped()
        if source_ip and ((":" in source_ip) != (":" in ip)):
            raise ConnectError(f"cannot reach {ip} from {source_ip}")
        try:
            async with asyncio.timeout(t.connect):
                reader, writer = await asyncio.open_connection(
                    ip, port, local_addr=(source_ip, 0) if source_ip else None
                )
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            raise ConnectError(f"{ip}: {exc or type(exc).__name__}") from None
        session = cls(host_name, ip, reader, writer, t)
        try:
            await session._start(helo, starttls, tls_context)
        except _Dead:
            session.broken = True
            session.close()
            raise SessionError(session._died()) from None
        except BaseException:
            session.broken = True
            session.close()
            raise
        return session

    @property
    def reusable(self) -> bool:
        """Whether another transaction may follow (after RSET) on this connection."""
        return not (self.broken or self._closed)

    async def send(self, attempt: Attempt, reset: bool = False) -> Result | None:
        """One transaction: MAIL, RCPT, DATA, the body; the result of this attempt.

        `reset` starts with RSET (a kept session's next message). With
        PIPELINING the RSET goes in the same write as MAIL, RCPT and DATA
        (RFC 2920 allows it), saving a round trip per message. None when the
        RSET was refused or the session had died: nothing was delivered, and
        the session is closed; the caller tries another.
        """
        problem = _address_problem(attempt)
        if problem is not None:
            return self._result(FAILURE, problem)
        if self.broken or self._closed:
            raise RuntimeError("send on a broken or closed session")
        if reset and "PIPELINING" not in self.extensions and not await self.reset():
            return None
        self.mail_accepted = False
        t = self._t
        ext = self.extensions
        message = attempt.message
        if "8BITMIME" not in ext and not message.isascii():
            # RFC 6152 3: 8-bit data only to a receiver that offers 8BITMIME; a signed
            # message was made 7-bit before signing (remote_worker), so this keeps DKIM.
            message = seven_bit(message)
        params = ""
        if "SIZE" in ext:
            params += f" SIZE={len(message)}"
        if "8BITMIME" in ext and not message.isascii():
            params += " BODY=8BITMIME"
        if "SMTPUTF8" in ext and not (attempt.sender.isascii() and attempt.recipient.isascii()):
            params += " SMTPUTF8"
        mail = f"MAIL FROM:<{attempt.sender}>{params}\r\n".encode()
        rcpt = f"RCPT TO:<{attempt.recipient}>\r\n".encode()
        ip = self.ip
        try:
            if "PIPELINING" in ext:
                if reset:
                    self._writer.write(b"RSET\r\n" + mail + rcpt + b"DATA\r\n")
                    if not await self._pipelined_reset():
                        return None
                else:
                    self._writer.write(mail + rcpt + b"DATA\r\n")
                    await self._drain(t.mail)
                code, lines = await self._read(t.mail)
                mail_ok = 200 <= code < 300
                self.mail_accepted = mail_ok
                failed: Result | None = None
                if not mail_ok:
                    failed = self._result(
                        _status(code), f"Connected to {ip} but sender was rejected.", code, lines
                    )
                try:
                    code, lines = await self._read(t.rcpt)
                    if failed is None and not 200 <= code < 300:
                        failed = self._result(
                            _status(code), f"{ip} does not like recipient.", code, lines
                        )
                    code, lines = await self._read(t.data_init)
                except _Dead:
                    if failed is None:
                        raise
                    self.broken = True
                    return failed
                if failed is not None:
                    if code == 354:
                        # A server that accepted DATA without a valid envelope:
                        # end the empty message, it has to be rejected.
                        self._writer.write(b".\r\n")
                        try:
                            await self._read(t.data_term)
                        except _Dead:
                            self.broken = True
                    return failed
            else:
                code, lines = await self._command(mail, t.mail)
                if not 200 <= code < 300:
                    return self._result(
                        _status(code), f"Connected to {ip} but sender was rejected.", code, lines
                    )
                self.mail_accepted = True
                code, lines = await self._command(rcpt, t.rcpt)
                if not 200 <= code < 300:
                    return self._result(
                        _status(code), f"{ip} does not like recipient.", code, lines
                    )
                code, lines = await self._command(b"DATA\r\n", t.data_init)
            if code != 354:
                return self._result(_status(code), f"{ip} failed on DATA command.", code, lines)
            await self._send_body(message)
            code, lines = await self._read(t.data_term)
        except _Dead:
            self.broken = True
            return self._died()
        if 200 <= code < 300:
            return self._result(SUCCESS, f"{ip} accepted message.", code, lines)
        return self._result(_status(code), f"{ip} failed after I sent the message.", code, lines)

    async def _pipelined_reset(self) -> bool:
        """The answer to a pipelined RSET; on refusal or a dead peer the session is cut
        before DATA is ended, so the transaction sent behind it cannot deliver."""
        try:
            await self._drain(self._t.mail)
            code, _ = await self._read(self._t.mail)
        except _Dead:
            code = 0
        if code != 250:
            self.broken = True
            self.close()
            return False
        return True

    async def reset(self) -> bool:
        """RSET before another transaction on a kept session; False when the session is unusable."""
        if not self.reusable:
            return False
        try:
            code, _ = await self._command(b"RSET\r\n", self._t.mail)
        except _Dead:
            self.broken = True
            self.close()
            return False
        if code != 250:
            await self.quit()
            return False
        self.mail_accepted = False
        return True

    async def login(self, user: str, password: str) -> None:
        """AUTH PLAIN (RFC 4954) after EHLO; SessionError with qmail-style text if refused."""
        import base64

        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        try:
            code, lines = await self._command(f"AUTH PLAIN {token}\r\n".encode(), self._t.mail)
        except _Dead:
            self.broken = True
            self.close()
            raise SessionError(self._died()) from None
        if code != 235:
            # A deferral even for a 5xx: refused credentials are the sender's own
            # configuration mistake, and must not bounce every message relayed.
            result = self._result(DEFERRAL, f"Connected to {self.ip} but authentication was rejected.",
                                  code, lines)
            await self.quit()
            raise SessionError(result)

    async def quit(self) -> None:
        """Say QUIT, wait briefly for the answer, close. Never raises on network trouble.

        Waits (at most `quit` seconds) for the close to finish: a TLS close
        exchanges close_notify first, and a socket must not outlive its session.
        """
        if self._closed:
            return
        if not self.broken:
            self._writer.write(b"QUIT\r\n")
            try:
                await self._read(self._t.quit)
            except _Dead:
                self.broken = True
        self.close()
        if not self.broken:
            try:
                async with asyncio.timeout(self._t.quit):
                    await self._writer.wait_closed()
            except Exception:  # timeout, or the peer reset: cut it
                self._writer.transport.abort()

    def close(self) -> None:
        """Close at once without QUIT; a broken connection is aborted, not flushed."""
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.broken:
            self._writer.transport.abort()
        else:
            self._writer.close()

    # -- protocol steps -------------------------------------------------------

    async def _start(self, helo: str, starttls: str, tls_context: ssl.SSLContext | None) -> None:
        t = self._t
        ip = self.ip
        code, lines = await self._read(t.greeting)
        if not 200 <= code < 300:
            await self.quit()
            raise SessionError(
                self._result(_status(code), f"Connected to {ip} but greeting failed.", code, lines)
            )
        helo_b = helo.replace("\r", "").replace("\n", "").encode()
        await self._ehlo(helo_b)
        if starttls == "never":
            return
        if "STARTTLS" not in self.extensions:
            if starttls == "required":
                await self.quit()
                raise SessionError(
                    self._result(
                        DEFERRAL,
                        f"Connected to {ip} but TLS is required and not available. (#4.7.4)",
                    )
                )
            return
        code, lines = await self._command(b"STARTTLS\r\n", t.mail)
        if code != 220:
            if starttls == "required":
                await self.quit()
                raise SessionError(
                    self._result(
                        DEFERRAL,
                        f"Connected to {ip} but TLS is required and STARTTLS was refused.",
                        code,
                        lines,
                    )
                )
            return  # opportunistic: the session goes on in plain text
        server_hostname = (
            None if (":" in self.host_name or _is_ipv4(self.host_name)) else self.host_name
        )
        try:
            await self._writer.start_tls(
                tls_context or client_tls_context(),
                server_hostname=server_hostname,
                ssl_handshake_timeout=t.mail,
            )
        except (OSError, ValueError, EOFError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            self.broken = True
            self.close()
            reason = str(exc) or type(exc).__name__
            raise SessionError(
                self._result(
                    DEFERRAL,
                    f"Connected to {ip} but the TLS handshake failed ({reason.translate(_CONTROL)}). (#4.7.4)",
                ),
                tls_failed=True,
            ) from None
        self.tls = True
        await self._ehlo(helo_b)

    async def _ehlo(self, helo: bytes) -> None:
        """EHLO, or HELO when EHLO gets a 5xx; fills `extensions`."""
        code, lines = await self._command(b"EHLO " + helo + b"\r\n", self._t.mail)
        if 200 <= code < 300:
            ext: dict[str, str] = {}
            for line in lines[1:]:
                keyword, _, value = line[4:].decode("ascii", "replace").partition(" ")
                ext[keyword.upper()] = value
            self.extensions = ext
            return
        if 500 <= code < 600:
            code, lines = await self._command(b"HELO " + helo + b"\r\n", self._t.mail)
            if 200 <= code < 300:
                self.extensions = {}
                return
        await self.quit()
        raise SessionError(
            self._result(
                _status(code), f"Connected to {self.ip} but my name was rejected.", code, lines
            )
        )

    async def _send_body(self, message: bytes) -> None:
        data = dot_stuff(message)
        writer = self._writer
        block = self._t.data_block
        if len(data) <= BODY_CHUNK:
            writer.write(data)
            await self._drain(block)
            return
        view = memoryview(data)
        for start in range(0, len(data), BODY_CHUNK):
            writer.write(view[start : start + BODY_CHUNK])
            await self._drain(block)

    # -- I/O ------------------------------------------------------------------

    async def _command(self, command: bytes, timeout: float) -> tuple[int, list[bytes]]:
        self._writer.write(command)
        return await self._read(timeout)

    # Timeouts of reads and drains: one timer per session, moved only when it
    # fires early (as smtpd's idle timer). An `asyncio.timeout` per read cost
    # a tenth of a worker's time: a timer scheduled and cancelled five times
    # per message for timeouts that almost never expire.

    def _arm(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        self._waiter = asyncio.current_task()
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > self._deadline:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = loop.call_at(self._deadline, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        if self._waiter is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._watchdog = loop.call_at(self._deadline, self._watch)
            return
        self._timed_out = True
        self._waiter.cancel()

    def _timed_out_now(self) -> bool:
        """After a CancelledError: whether the watchdog caused it (then undo its cancel)."""
        if not self._timed_out:
            return False
        self._timed_out = False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True

    async def _drain(self, timeout: float) -> None:
        self._arm(timeout)
        try:
            await self._writer.drain()
        except asyncio.CancelledError:
            if self._timed_out_now():
                raise _Dead from None
            raise
        except (OSError, EOFError) as exc:
            raise _Dead from exc
        finally:
            self._waiter = None

    async def _read(self, timeout: float) -> tuple[int, list[bytes]]:
        """One reply, multi-line included: (code, lines without CRLF)."""
        reader = self._reader
        lines: list[bytes] = []
        self._arm(timeout)
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    raise _Dead  # EOF, maybe in the middle of a line
                line = line.rstrip(b"\r\n")
                lines.append(line)
                if len(line) < 4 or line[3] != 0x2D:  # not "xyz-": the last line
                    break
                if len(lines) >= MAX_REPLY_LINES:
                    raise _Dead
        except asyncio.CancelledError:
            if self._timed_out_now():
                raise _Dead from None
            raise
        except (OSError, EOFError, ValueError) as exc:  # ValueError: line over the limit
            raise _Dead from exc
        finally:
            self._waiter = None
        code = lines[-1][:3]
        if len(code) != 3 or not code.isdigit():
            raise _Dead
        return int(code), lines

    # -- results --------------------------------------------------------------

    def _result(
        self, status: str, head: str, code: int | None = None, lines: list[bytes] | None = None
    ) -> Result:
        text = head if lines is None else f"{head}/{_said(lines)}"
        return Result(status, text, self.host_name, self.ip, code)

    def _died(self) -> Result:
        return Result(
            DEFERRAL,
            f"Connected to {self.ip} but connection died. (#4.4.2)",
            self.host_name,
            self.ip,
        )


def _is_ipv4(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


async def deliver(
    attempt: Attempt,
    hosts: list[MxHost],
    port: int = 25,
    timeouts: Timeouts = Timeouts(),
    keep: Callable[[Session, Result], bool] | None = None,
    auth: tuple[str, str] | None = None,
) -> Result:
    """Deliver `attempt` to the first of `hosts` that takes it; never raises on network trouble.

    `port` applies to every host. See the module docstring for when the next
    address is tried and which result is returned. `keep`, when given, is
    asked after the transaction whether to keep the session open (connection
    reuse: the caller then owns it); otherwise the session is closed with
    QUIT. `auth` (user, password) logs in with AUTH PLAIN after EHLO (relay
    servers).
    """
    problem = _address_problem(attempt)
    if problem is not None:
        return Result(FAILURE, problem, "", "")
    t = timeouts.capped()
    first_deferral: Result | None = None
    last_host = last_ip = ""
    tried: set[str] = set()
    for host in hosts:
        for ip in host.addresses:
            if ip in tried:
                continue
            tried.add(ip)
            last_host, last_ip = host.name, ip
            mode = attempt.starttls
            while True:
                try:
                    session = await Session.open(
                        host.name,
                        ip,
                        helo=attempt.helo,
                        port=port,
                        source_ip=attempt.source_ip,
                        starttls=mode,
                        timeouts=t,
                    )
                    if auth is not None:
                        await session.login(*auth)
                except ConnectError:
                    break
                except SessionError as exc:
                    if exc.tls_failed and mode == "opportunistic":
                        mode = "never"  # the same address once more, in plain text
                        continue
                    if exc.result.status == FAILURE:
                        return exc.result
                    if first_deferral is None:
                        first_deferral = exc.result
                    break
                try:
                    result = await session.send(attempt)
                except BaseException:
                    session.broken = True
                    session.close()
                    raise
                if keep is None or not keep(session, result):
                    await session.quit()
                if result.status == DEFERRAL and not session.mail_accepted:
                    if first_deferral is None:
                        first_deferral = result
                    break
                return result
    if first_deferral is not None:
        return first_deferral
    return Result(DEFERRAL, NO_CONNECTION_TEXT, last_host, last_ip)
