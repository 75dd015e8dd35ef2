"""The SMTP server side of injection, as an asyncio Protocol that works on whole buffers.

Why not aiosmtpd, which the project started with: aiosmtpd reads the DATA
of a message line by line, an await per line, and that made SMTP injection
the most expensive step of the whole pipeline (2.6 ms of CPU per 5 KB
message, more than queue-send and the remote workers together; see
bench/RESULTS.md). This protocol parses commands and finds the end of DATA
on the bytes as they arrive (`bytes.find`, no per-line Python), answers all
the commands of one read in one write (PIPELINING), and leaves policy to a
`SessionPolicy` (relay check, queue commit), so it knows nothing of queues.

Spoken: HELO, EHLO (PIPELINING, SIZE, 8BITMIME, STARTTLS when the policy has
a TLS context), MAIL (SIZE=, BODY=; SMTPUTF8 is refused with 555), RCPT, DATA,
RSET, NOOP, VRFY (252), HELP, QUIT, STARTTLS. Limits: command lines of 512
octets, the message size (552 after the data), 1000 recipients per message
(452), and time (below). Data lines may be longer than RFC 5321's 1000
octets, up to the message size: applications send minified HTML on one line
(Postfix takes it), and the remote worker re-encodes such a part before it
goes out (greenarrow.lib.core.wire_encoding).

Time: each command line must arrive whole within `timeout` seconds of the
previous reply (or the greeting); bytes trickling in do not extend it, so a
client cannot hold a session by sending a byte now and then. A DATA may take
longer, but once `timeout` has passed since the 354 it must have averaged
`policy.data_rate` bytes a second. Either way the session gets 421 and is
closed. Only one timer per session, moved when it fires, and one clock read
per read that completes a command: nothing per byte.

Size: once a DATA is over `policy.databytes`, its bytes are no longer kept
(only the last few, where the final dot may start); it is read to its end
and refused with 552, so a large message costs no memory.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

MAX_COMMAND = 512
MAX_RECIPIENTS = 1000
# The HELO argument goes into the Received header: a CR (a bare LF already ends the
# command line) or a NUL there would let a client smuggle header lines, or a whole
# message at a receiver that takes a bare CR for a line end.
HELO_CONTROL = "501 5.5.4 the HELO/EHLO host name may not contain control characters"


class Transaction:
    """What one MAIL ... DATA transaction has collected."""

    __slots__ = ("sender", "recipients", "mail_options")

    def __init__(self, sender: str, mail_options: list[str]) -> None:
        self.sender = sender
        self.recipients: list[str] = []
        self.mail_options = mail_options


class SessionPolicy:
    """What a session asks of the engine; SmtpInjection (smtp_injection.py) implements it."""

    hostname = "localhost"
    databytes = 0  # 0: no limit
    data_rate = 0  # bytes a second a DATA must average after the timeout; 0: no floor
    tls_context: ssl.SSLContext | None = None

    def connected(self, session: SmtpSession) -> str | None:
        """A reply that refuses the connection (e.g. 421), or None to greet."""
        return None

    def check_sender(self, session: SmtpSession, address: str) -> str | None:
        """A reply refusing MAIL FROM, or None to accept."""
        return None

    def check_recipient(self, session: SmtpSession, address: str) -> str | None:
        return None

    def message(self, session: SmtpSession, transaction: Transaction, data: bytes) -> str:
        """Accept (or refuse) a complete message; the reply to the end of DATA."""
        return "250 ok"

    def refused(self, session: SmtpSession, command: str, reply: str) -> None:
        """A command got a 4xx or 5xx reply (`command` as the client sent it)."""

    auth_fail_delay = 2.0  # seconds a failed AUTH waits for its reply (reading paused)

    def auth_offered(self, session: SmtpSession) -> bool | None:
        """True: AUTH PLAIN LOGIN is offered; False: users exist but not here (no TLS);
        None: no AUTH at all."""
        return None

    def authenticate(self, session: SmtpSession, user: str, password: str) -> bool:
        return False


def parse_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """`FROM:<a@b> SIZE=10` -> ("a@b", ["SIZE=10"]); None if it does not parse.

    The one reader of MAIL and RCPT arguments (smtpd and the counting sink).
    """
    if arg[:len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword):].strip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None
        address, params = rest[1:end], rest[end + 1:].split()
    else:  # tolerate a bare address, as many servers do
        parts = rest.split()
        if not parts:
            return None
        address, params = parts[0], parts[1:]
    if address.startswith("@") and ":" in address:  # source route: ignore it (RFC 5321 C)
        address = address.split(":", 1)[1]
    return address, params


class SmtpSession(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, policy: SessionPolicy, idle_timeout: float = 300.0,
                 on_close: Callable[[SmtpSession], None] | None = None) -> None:
        self.policy = policy
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.transaction: Transaction | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.data_start = 0  # where the data of the current message starts in buffer
        self.data_scan = 0  # how far the end-of-data search has looked
        self.closing = False
        self.closed = False  # the connection is gone
        self.tls_pending = False  # STARTTLS answered, TLS not yet up
        self.tls_started = False  # start_tls has the transport: what arrives is decrypted
        self.state: dict = {}  # for the policy (its per-connection notes)
        # What the session log line reports (smtp_injection.InjectionPolicy.closed).
        self.accepted = 0  # messages answered 250 at the end of DATA
        self.refusals = 0  # commands (and DATA ends) answered 4xx or 5xx
        self.first_refusal: tuple[str, str] | None = None  # (command, reply) of the first
        self.quit = False
        self.auth_user: str | None = None
        self.auth_step: tuple[str, str] | None = None  # AUTH waiting for a response line
        self.auth_failures = 0
        self._timer: asyncio.TimerHandle | None = None
        self._active = 0.0  # time.monotonic() of the last reply: the current command's start
        self._received = 0  # bytes read in this session
        self._data_from = 0  # _received when the current DATA began

    # -- connection ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        if self.peer_ip.startswith("::ffff:"):
            self.peer_ip = self.peer_ip[7:]
        refusal = self.policy.connected(self)
        if refusal is not None:
            self._write(refusal)
            self._close()
            return
        self._write(f"220 {self.policy.hostname} ESMTP")
        self._touch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.closing = self.closed = True
        if self.on_close is not None:
            self.on_close(self)

    def _touch(self) -> None:
        """A command is complete (or the session starts): the next one's time begins."""
        # One timer per connection, moved only when it fires: re-arming a timer
        # for every command cost a twentieth of smtpd's time.
        self._active = time.monotonic()
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.idle_timeout, self._idle)

    def _deadline(self) -> float:
        """When the session is cut unless it completes a command (or its DATA) first."""
        deadline = self._active + self.idle_timeout
        if self.in_data:
            rate = self.policy.data_rate
            if not rate:
                return float("inf")
            deadline += (self._received - self._data_from) / rate
        return deadline

    def _idle(self) -> None:
        left = self._deadline() - time.monotonic()
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._idle)
            return
        self._timer = None
        self.state["timed_out"] = True
        self._write(f"421 4.4.2 {self.policy.hostname} timeout, closing")
        self._close()

    def _write(self, line: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- input --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.tls_pending:
            if self.tls_started:
                # The first application data, decrypted as the handshake ends (GnuTLS
                # sends EHLO in the handshake's last segment): kept for when TLS is up.
                self.buffer += data
                self._received += len(data)
            # else: plaintext pipelined behind STARTTLS, which RFC 3207 says to forget
            return
        self.buffer += data
        self._received += len(data)
        self._answer()

    def _answer(self) -> None:
        """Process what is buffered; send the replies in one write."""
        replies: list[str] = []
        self._process(replies)
        if replies:
            self._touch()
        if self.state.pop("auth_failed", False) and self.transport is not None:
            # A failed login's reply waits, and nothing is read meanwhile: guessing is slow.
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(
                self.policy.auth_fail_delay * self.auth_failures, self._send_late, replies)
            return
        self._send(replies)

    def _send(self, replies: list[str]) -> None:
        if replies and self.transport is not None and not self.transport.is_closing():
            self.transport.write(("\r\n".join(replies) + "\r\n").encode("utf-8", "surrogateescape"))
        if self.closing and self.transport is not None:
            self.transport.close()

    def _send_late(self, replies: list[str]) -> None:
        if self.closed or self.transport is None:
            return
        self._send(replies)
        if not self.closing:
            self.transport.resume_reading()
            if self.buffer:  # commands pipelined behind the failed AUTH
                self._answer()

    def _process(self, replies: list[str]) -> None:
        buf = self.buffer
        pos = 0
        while not self.closing and not self.tls_pending and "auth_failed" not in self.state:
            if self.in_data:
                end = self._find_data_end()
                if end is None:
                    break
                reply = self._end_of_data(bytes(buf[self.data_start:end[0]]))
                replies.append(reply)
                if reply[0] in "45":
                    self._refusal(b"DATA (end of data)", reply)
                else:
                    self.accepted += 1
                pos = end[1]
                self.in_data = False
                continue
            eol = buf.find(b"\n", pos)
            if eol < 0:
                if len(buf) - pos > MAX_COMMAND * 4:
                    replies.append("500 5.5.2 line too long")
                    self._refusal(bytes(buf[pos:pos + 40]) + b"...", replies[-1])
                    self.closing = True
                break
            line = bytes(buf[pos:eol]).rstrip(b"\r")
            pos = eol + 1
            if len(line) > MAX_COMMAND:
                replies.append("500 5.5.2 line too long")
                self._refusal(line[:40] + b"...", replies[-1])
                continue
            if self.auth_step is None:
                reply = self._command(line)
            else:
                reply, line = self._auth_response(line), b"AUTH (response)"
            if reply:
                replies.append(reply)
                if reply[0] in "45":
                    self._refusal(line, reply)
            if self.in_data:
                self.data_start = pos
                self.data_scan = pos
        del buf[:pos]
        if self.in_data:
            self.data_start -= pos
            self.data_scan = max(self.data_start, self.data_scan - pos)
            if self.policy.databytes and (
                    len(buf) - self.data_start > self.policy.databytes + 4096
                    or "too_big" in self.state):
                # Over the size limit: from now on keep only the tail, where the end of
                # the data may begin (4 bytes: the longest partial CRLF.CRLF); the
                # sentinel byte stops it passing for an empty message.
                self.buffer = bytearray(b"\x00" + buf[-4:])
                self.data_start = 0
                self.data_scan = 0
                self.state["too_big"] = True

    def _refusal(self, line: bytes, reply: str) -> None:
        self.refusals += 1
        command = line.decode("utf-8", "surrogateescape")
        if self.first_refusal is None:
            self.first_refusal = (command, reply)
        self.policy.refused(self, command, reply)

    def _find_data_end(self) -> tuple[int, int] | None:
        """(end of message, start of what follows) for the `.` line; None if not here yet."""
        buf = self.buffer
        start = max(self.data_start, self.data_scan - 4)
        if start == self.data_start and buf.startswith(b".\r\n", self.data_start):
            return self.data_start, self.data_start + 3
        found = buf.find(b"\r\n.\r\n", start)
        if found < 0:
            self.data_scan = len(buf)
            return None
        return found + 2, found + 5

    # -- commands -------------------------------------------------------------

    def _command(self, line: bytes) -> str:
        # Undecodable bytes survive as surrogates, so an 8-bit address reaches the
        # address check and gets its 553, not a bare syntax error.
        text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        handler = getattr(self, f"smtp_{verb}", None)
        if handler is None:
            return "502 5.5.1 command not implemented" if verb else "500 5.5.2 empty command"
        return handler(arg)

    def smtp_HELO(self, arg: str) -> str:
        if not arg:
            return "501 5.5.4 HELO needs a host name"
        if not arg.isprintable() and _has_control(arg):
            return HELO_CONTROL
        self.helo, self.esmtp, self.transaction = arg, False, None
        return f"250 {self.policy.hostname}"

    def smtp_EHLO(self, arg: str) -> str:
        if not arg:
            return "501 5.5.4 EHLO needs a host name"
        if not arg.isprintable() and _has_control(arg):
            return HELO_CONTROL
        self.helo, self.esmtp, self.transaction = arg, True, None
        lines = [self.policy.hostname, "PIPELINING", "8BITMIME"]
        lines.append(f"SIZE {self.policy.databytes}" if self.policy.databytes else "SIZE")
        if self.policy.tls_context is not None and not self.tls:
            lines.append("STARTTLS")
        if self.policy.auth_offered(self) and self.auth_user is None:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        return "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"

    def smtp_MAIL(self, arg: str) -> str:
        if self.helo is None:
            return "503 5.5.1 send HELO or EHLO first"
        if self.transaction is not None:
            return "503 5.5.1 nested MAIL command"
        parsed = parse_path(arg, "FROM:")
        if parsed is None:
            return "501 5.5.4 syntax: MAIL FROM:<address>"
        address, params = parsed
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SMTPUTF8":
                return "555 5.6.7 SMTPUTF8 is not supported"
            if key == "SIZE":
                if not value.isdigit():
                    return "501 5.5.4 bad SIZE"
                if self.policy.databytes and int(value) > self.policy.databytes:
                    return "552 5.3.4 message size exceeds fixed maximum message size"
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 BODY can only be 7BIT or 8BITMIME"
            elif key != "AUTH":  # RET, ENVID: DSN is not offered (RFC 3461), so not ignored
                return f"555 5.5.4 MAIL parameter {key} not supported"
        refusal = self.policy.check_sender(self, address)
        if refusal is not None:
            return refusal
        self.transaction = Transaction(address, params)
        return "250 2.1.0 ok"

    def smtp_RCPT(self, arg: str) -> str:
        if self.transaction is None:
            return "503 5.5.1 need MAIL before RCPT"
        parsed = parse_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            return "501 5.5.4 syntax: RCPT TO:<address>"
        if parsed[1]:  # NOTIFY=, ORCPT= (DSN) or anything else: nothing is offered for RCPT
            key = parsed[1][0].partition("=")[0].upper()
            return f"555 5.5.4 RCPT parameter {key} not supported"
        if len(self.transaction.recipients) >= MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients"
        refusal = self.policy.check_recipient(self, parsed[0])
        if refusal is not None:
            return refusal
        self.transaction.recipients.append(parsed[0])
        return "250 2.1.5 ok"

    def smtp_DATA(self, arg: str) -> str:
        if self.transaction is None:
            return "503 5.5.1 need MAIL command"
        if not self.transaction.recipients:
            return "503 5.5.1 need RCPT command"
        if arg:
            return "501 5.5.4 syntax: DATA"
        self.in_data = True
        self._data_from = self._received
        self.state.pop("too_big", None)
        return "354 end data with <CR><LF>.<CR><LF>"

    def _end_of_data(self, data: bytes) -> str:
        transaction, self.transaction = self.transaction, None
        if self.state.pop("too_big", False) or (
                self.policy.databytes and len(data) > self.policy.databytes):
            return "552 5.3.4 message size exceeds fixed maximum message size"
        if b"\n." in data or data.startswith(b"."):
            data = _unstuff(data)
        assert transaction is not None
        return self.policy.message(self, transaction, data)

    def smtp_AUTH(self, arg: str) -> str:
        """RFC 4954, PLAIN (RFC 4616) and LOGIN; only where the policy offers it."""
        offered = self.policy.auth_offered(self)
        if offered is None:
            return "502 5.5.1 AUTH not available"
        if not offered:
            return "538 5.7.11 encryption required: STARTTLS first"
        if self.helo is None or not self.esmtp:
            return "503 5.5.1 send EHLO first"
        if self.auth_user is not None:
            return "503 5.5.1 already authenticated"
        if self.transaction is not None:
            return "503 5.5.1 AUTH not allowed during a mail transaction"
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            self.auth_step = ("plain", "")
            return "334 "
        if mechanism == "LOGIN":
            if initial:
                return self._auth_response(initial.encode(), ("login-user", ""))
            self.auth_step = ("login-user", "")
            return "334 VXNlcm5hbWU6"  # "Username:"
        return "504 5.5.4 AUTH mechanism not supported (PLAIN, LOGIN)"

    def _auth_response(self, line: bytes, step: tuple[str, str] | None = None) -> str:
        step, self.auth_step = step or self.auth_step, None
        assert step is not None
        text = line.strip().decode("ascii", "replace")
        if text == "*":
            return "501 5.7.0 authentication cancelled"
        if step[0] == "plain":
            return self._auth_plain(text)
        value = _b64(text)
        if value is None:
            return "501 5.5.2 cannot decode the response (base64)"
        if step[0] == "login-user":
            self.auth_step = ("login-password", value)
            return "334 UGFzc3dvcmQ6"  # "Password:"
        return self._auth_check(step[1], value)

    def _auth_plain(self, text: str) -> str:
        value = _b64(text)
        if value is None or value.count("\x00") != 2:
            return "501 5.5.2 cannot decode the PLAIN response"
        _authzid, user, password = value.split("\x00")
        return self._auth_check(user, password)

    def _auth_check(self, user: str, password: str) -> str:
        if user and self.policy.authenticate(self, user, password):
            self.auth_user = user
            return "235 2.7.0 authentication successful"
        self.auth_failures += 1
        self.state["auth_failed"] = True
        if self.auth_failures >= 3:
            self.closing = True
            return "421 4.7.0 too many failed logins, closing"
        return "535 5.7.8 authentication credentials invalid"

    def smtp_RSET(self, arg: str) -> str:
        self.transaction = None
        return "250 2.0.0 ok"

    def smtp_NOOP(self, arg: str) -> str:
        return "250 2.0.0 ok"

    def smtp_VRFY(self, arg: str) -> str:
        return "252 2.1.5 send some mail, I'll try my best"

    def smtp_HELP(self, arg: str) -> str:
        return "214 2.0.0 see RFC 5321"

    def smtp_QUIT(self, arg: str) -> str:
        self.closing = self.quit = True
        return f"221 2.0.0 {self.policy.hostname} closing connection"

    def smtp_STARTTLS(self, arg: str) -> str:
        context = self.policy.tls_context
        if context is None or self.tls:
            return "502 5.5.1 STARTTLS not available" if context is None else "503 5.5.1 already in TLS"
        if arg:
            return "501 5.5.4 syntax: STARTTLS"
        self.tls_pending = True
        asyncio.get_running_loop().create_task(self._start_tls(context))
        return "220 2.0.0 ready to start TLS"

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        # RFC 3207: forget everything from before TLS, including anything the client
        # pipelined after STARTTLS, which it must not do.
        self.buffer.clear()
        self.tls_started = True
        try:
            transport = await loop.start_tls(self.transport, self, context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as e:
            self.state["tls_failed"] = str(e) or type(e).__name__
            self._close()
            return
        if transport is None:
            self.state["tls_failed"] = "no transport"
            self._close()
            return
        self.transport = transport
        self.tls, self.tls_pending = True, False
        self.helo, self.esmtp, self.transaction = None, False, None
        self.auth_user, self.auth_step = None, None
        if self.buffer and not self.closing:
            self._answer()


def _b64(text: str) -> str | None:
    """A base64 SASL response as text (UTF-8, undecodable bytes kept), or None."""
    import binascii

    try:
        return binascii.a2b_base64(text.encode("ascii", "replace")).decode("utf-8", "surrogateescape") \
            if text not in ("", "=") else ""
    except (binascii.Error, ValueError):
        return None


def _has_control(text: str) -> bool:
    """Whether `text` holds an ASCII control character (C0 or DEL)."""
    return any(c < " " or c == "\x7f" for c in text)


def _unstuff(data: bytes) -> bytes:
    """Undo the dot-stuffing of RFC 5321 4.5.2.

    After a bare LF too: a client that takes LF for a line end (as the
    message it was given did) stuffs the dot after it, and the line becomes
    CRLF at injection; Postfix unstuffs there as well. Only the end of the
    data stays CRLF.CRLF alone (SMTP smuggling).
    """
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\n.", b"\n")
