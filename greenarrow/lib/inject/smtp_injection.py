"""SMTP injection: the `smtpd` service's policy, on greenarrow.lib.smtp.server.

ESMTP with PIPELINING, SIZE (`control/databytes`) and 8BITMIME. Relaying is
allowed only for clients whose `control/smtp.tcp` rule sets RELAYCLIENT;
everyone else is refused at RCPT and nothing is queued. Mail for the
engine's own mailboxes (greenarrow.lib.routing.incoming) is taken from
anyone, and other local parts of those domains are refused with 550, for
every client (incoming_recipient). A message whose every recipient is
such a mailbox is queued as received (after its Received field): no
X-GreenArrow-* processing, no SimpleMH, so the bounce and complaint
processors see what the remote host sent. The message goes
through the same processing as command-line injection
(greenarrow.lib.inject.accept), and the queue commit happens before the 250
reply to DATA.

STARTTLS is offered when `control/smtp.tls.cert` names a certificate file
(and `control/smtp.tls.key` its key; empty = in the certificate file).
The TLS context is built once, at start and at each reload, so a session
pays only for its handshake; a bad file stops the start with an error
naming it, and a bad file at reload keeps the context in use.

Bounds: `databytes` (10 MB by default, advertised in SIZE); at most
`smtp.sessions.max` sessions at once, `smtp.sessions.per_ip` from one client
address (more get 421 and are closed; the count outlives a reload);
`smtp.timeout` per command and `smtp.data.minrate` for DATA
(greenarrow.lib.smtp.server). A client without an address (a Unix socket,
a failed getpeername) is "unknown": only the default rule of smtp.tcp
applies to it, never a loopback rule.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.config import control, smtp_users, tcprules
from greenarrow.lib.core import listen_sockets
from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.paths import Root, count_path
from greenarrow.lib.inject import accept as injection
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.routing import incoming
from greenarrow.lib.smtp.server import SessionPolicy, SmtpSession, Transaction

log = logging.getLogger("smtpd")
# The per-session and per-refusal lines: written in batches (core.service.BatchedStderr).
session_log = logging.getLogger("smtpd.session")

RELAY_DENIED = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
NO_MAILBOX = "550 5.1.1 sorry, no mailbox here by that name (#5.1.1)"


class Settings:
    """What the handler reads from control; re-read on reload (SIGHUP)."""

    def __init__(self, root: Root, local: bool = False) -> None:
        """`local`: for `sendmail -bs`, which neither relays by rule nor offers TLS
        (so a local user need not read smtp.tcp or the TLS key)."""
        self.root = root
        self.me = control.read_text(root.control, "me")
        self.databytes = control.read_int(root.control, "databytes")
        self.sessions_max = control.read_int(root.control, "smtp.sessions.max")
        self.sessions_per_ip = control.read_int(root.control, "smtp.sessions.per_ip")
        self.timeout = control.read_float(root.control, "smtp.timeout")
        self.data_rate = control.read_int(root.control, "smtp.data.minrate")
        self.limit = control.read_int(root.control, "queue.ram.limit.messages")
        self.count_file = count_path(str(root.path), "ram")
        self.queue_dir = str(root.queue("ram"))
        self.fifo = str(root.trigger("ram"))
        self.conf = conflib.load_root(root)  # incoming_email_domain: incoming_recipient()
        incoming.mailboxes(str(root.path), self.conf)  # a local part twice: refuse the start
        self.incoming_domains = incoming.incoming_domains(self.conf)
        self.rules = tcprules.parse("", "")
        self.tls_context: ssl.SSLContext | None = None
        self.users: dict[str, smtp_users.SmtpUser] = {}
        if not local:
            self.users = smtp_users.read(root.control)
            self.rules = tcprules.load(root.control / "smtp.tcp")
            self.tls_context = tls_context(root.control)


def tls_context(control_dir: Path) -> ssl.SSLContext | None:
    """The STARTTLS server context of `smtp.tls.cert`/`smtp.tls.key`, or None (not offered).

    Relative paths are relative to control/. ControlError naming the file
    that is missing, unreadable or not what it should be.
    """
    cert = control.read_text(control_dir, "smtp.tls.cert")
    key = control.read_text(control_dir, "smtp.tls.key")
    if not cert:
        if key:
            raise control.ControlError(
                f"{control_dir / 'smtp.tls.key'}: set, but smtp.tls.cert is empty"
            )
        return None
    cert_path = control_dir / cert
    key_path = control_dir / key if key else cert_path
    data = {}
    for path, what, setting in ((cert_path, "certificate", "smtp.tls.cert"),
                                (key_path, "private key", "smtp.tls.key")):
        try:
            data[path] = path.read_bytes()
        except OSError as e:
            raise control.ControlError(
                f"{path}: cannot read the TLS {what} (control/{setting}): {e.strerror}"
            ) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        if b"-----BEGIN CERTIFICATE-----" not in data[cert_path]:
            problem = f"{cert_path}: no PEM certificate in it (control/smtp.tls.cert)"
        elif b"PRIVATE KEY-----" not in data[key_path]:
            problem = f"{key_path}: no PEM private key in it (control/smtp.tls.key)"
        elif e.reason == "KEY_VALUES_MISMATCH":
            problem = f"{key_path}: this private key does not belong to the certificate {cert_path}"
        else:
            problem = f"{cert_path} / {key_path}: not a usable certificate and key: {e}"
        raise control.ControlError(problem) from None
    return context


def incoming_recipient(settings: Settings, address: str) -> tuple[str | None, str | None]:
    """For an address at one of the engine's incoming domains (or the bare `postmaster`,
    RFC 5321 4.5.1): (the recipient to queue, None), or (None, the refusal) when no
    mailbox has that name there. (None, None) for any other address: the relay rule decides.
    """
    box = incoming.find(str(settings.root.path), settings.conf, address)
    if box is not None:
        if "@" not in address:
            return box.address, None
        try:
            return injection.check_address(address, "recipient"), None
        except injection.InjectionError as e:
            return None, f"553 5.1.3 {e.text}"
    if address.rpartition("@")[2].lower().rstrip(".") in settings.incoming_domains:
        return None, NO_MAILBOX
    return None, None


class SessionCount:
    """The open SMTP sessions, in total and per client address.

    Owned by the SmtpServer, so it outlives a reload (which makes a new
    policy); the limits are the policy's of the moment.
    """

    def __init__(self) -> None:
        self.total = 0
        self.by_address: dict[str, int] = {}

    def admit(self, address: str, most: int, per_address: int) -> str | None:
        """Count a new session in, or the 421 reply that refuses it (0: no limit)."""
        if most and self.total >= most:
            return f"421 4.7.0 too many connections ({most}, control/smtp.sessions.max); " \
                   "try again later"
        here = self.by_address.get(address, 0)
        if per_address and here >= per_address:
            return (f"421 4.7.0 too many connections from {address or 'an unknown address'} "
                    f"({per_address}, control/smtp.sessions.per_ip); try again later")
        self.total += 1
        self.by_address[address] = here + 1
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        left = self.by_address[address] - 1
        if left:
            self.by_address[address] = left
        else:
            del self.by_address[address]


MAX_REFUSAL_LINES = 20  # per session: a client looping on a refused command cannot flood the log


def log_value(text: str, most: int = 300) -> str:
    """`text` for a `key=value` log field: bare when it is printable ASCII without spaces,
    quotes or backslashes, else in double quotes with `\\`, `\"` and `\\xNN` escapes."""
    text = text[:most]
    if text and text.isascii() and text.isprintable() and not any(c in text for c in ' "\\'):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append("".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape")))
    return '"' + "".join(out) + '"'


def _loggable(command: str) -> str:
    """The command as logged: an AUTH line loses its credentials."""
    verb = command.split(" ", 2)
    if verb[0].upper() == "AUTH":
        return " ".join(verb[:2]) + " ..."
    return command


def session_line(session: SmtpSession) -> str:
    """The one line logged when a session ends (docs/formats.md section 10)."""
    if session.quit:
        end = "quit"
    elif session.state.get("timed_out"):
        end = "timeout"
    elif "tls_failed" in session.state:
        end = "tls-failed"
    else:
        end = "disconnect-in-data" if session.in_data else "disconnect"
    line = (f"session client={session.peer_ip or 'unknown'}"
            f" helo={log_value(session.helo or '')} tls={'yes' if session.tls else 'no'}"
            f" accepted={session.accepted} refused={session.refusals} end={end}")
    if "tls_failed" in session.state:
        line += f" tls_error={log_value(session.state['tls_failed'])}"
    if session.first_refusal is not None:
        command, reply = session.first_refusal
        line += f" first_refusal={log_value(f'{_loggable(command)} -> {reply}')}"
    return line


def refusal_line(session: SmtpSession, command: str, reply: str) -> str:
    """The line logged for each refused command (at most MAX_REFUSAL_LINES a session)."""
    return (f"refused client={session.peer_ip or 'unknown'} helo={log_value(session.helo or '')}"
            f" command={log_value(_loggable(command))} reply={log_value(reply)}")


def _loopback(address: str) -> bool:
    """The host itself (127.0.0.1, ::1): where AUTH needs no TLS."""
    return address in ("127.0.0.1", "::1")


def _without_header(data: bytes, name: bytes) -> bytes:
    """`data` (a message) without the fields `name` (lower-case) of its header block."""
    crlf = msglib.to_crlf(data)
    headers, _ = msglib.split_headers(crlf)
    drop = {i for i, h in enumerate(headers) if h.name == name}
    return msglib.rebuild(crlf, headers, drop) if drop else data


class InjectionPolicy(SessionPolicy):
    """The engine's side of an SMTP session: relay check at RCPT, queue commit at DATA."""

    def __init__(self, settings: Settings, sessions: SessionCount | None = None) -> None:
        self.settings = settings
        self.sessions = SessionCount() if sessions is None else sessions
        self.hostname = settings.me
        self.databytes = settings.databytes
        self.data_rate = settings.data_rate
        self.tls_context = settings.tls_context
        self.trigger = queue_entry.Trigger(settings.fifo)
        self.verified: set[tuple[str, bytes]] = set()

    def connected(self, session: SmtpSession) -> str | None:
        settings = self.settings
        refusal = self.sessions.admit(session.peer_ip, settings.sessions_max,
                                      settings.sessions_per_ip)
        if refusal is not None:
            log.warning("refused a connection from %s: %s",
                        session.peer_ip or "an unknown address", refusal[10:])
            return refusal
        session.state["counted"] = True
        return None

    def closed(self, session: SmtpSession) -> None:
        """The session is gone: count it out (once, and only if it was counted in), log it."""
        if not session.state.pop("counted", False):
            return  # refused at connect: logged there
        self.sessions.release(session.peer_ip)
        session_log.info("%s", session_line(session))

    def refused(self, session: SmtpSession, command: str, reply: str) -> None:
        if session.refusals <= MAX_REFUSAL_LINES:
            session_log.info("%s", refusal_line(session, command, reply))

    def _rule(self, session: SmtpSession) -> tcprules.TcpRule | None:
        if "rule" not in session.state:  # once per connection
            # No peer address (a Unix socket, getpeername failed): unknown, so only the
            # default rule can apply; never a loopback rule, which may allow relaying.
            session.state["rule"] = self.settings.rules.match(session.peer_ip)
        return session.state["rule"]

    def check_sender(self, session: SmtpSession, address: str) -> str | None:
        try:
            injection.check_sender(address)
        except injection.InjectionError as e:
            return f"553 5.1.7 {e.text}"
        return None

    def auth_offered(self, session: SmtpSession) -> bool | None:
        if not self.settings.users:
            return None
        return session.tls or _loopback(session.peer_ip)

    def authenticate(self, session: SmtpSession, user: str, password: str) -> bool:
        known = self.settings.users.get(user)
        # A known user's good password is checked once per reload: scrypt costs ~50 ms.
        key = (user, hashlib.sha256(password.encode("utf-8", "surrogateescape")).digest())
        ok = key in self.verified or (
            known is not None and smtp_users.check_password(known.hash, password))
        if ok:
            self.verified.add(key)
        else:
            log.warning("failed login client=%s user=%s failures=%d",
                        session.peer_ip or "unknown", log_value(user), session.auth_failures + 1)
        return ok

    def check_recipient(self, session: SmtpSession, address: str) -> str | None:
        local, refusal = incoming_recipient(self.settings, address)
        if local is not None or refusal is not None:
            return refusal
        rule = self._rule(session)
        if session.auth_user is None and (
                rule is None or not rule.allow or "RELAYCLIENT" not in rule.env):
            return RELAY_DENIED
        try:
            injection.check_address(address, "recipient")
        except injection.InjectionError as e:
            return f"553 5.1.3 {e.text}"
        return None

    def message(self, session: SmtpSession, transaction: Transaction, data: bytes) -> str:
        rule = self._rule(session)
        env = {k: v for k, v in (rule.env if rule else {}).items() if k.startswith("GREENARROW_")}
        user = self.settings.users.get(session.auth_user or "")
        if user is not None and user.mail_class:
            env["GREENARROW_MAILCLASS"] = user.mail_class
            if user.force_mail_class:  # engine_user_force_mail_class: the header loses
                data = _without_header(data, b"x-greenarrow-mailclass")

        def trace() -> bytes:
            if "GREENARROW_SMTP_RECEIVED_HIDE" in env:
                return b""
            peer = f"[{session.peer_ip}]" if session.peer_ip else "unknown"
            return msglib.header_field(
                "Received", f"from {session.helo or 'unknown'} ({peer})",
                f"by {self.settings.me} with {'ESMTPS' if session.tls else 'ESMTP'};"
                f" {msglib.rfc5322_date()}")

        return self.commit(session, transaction, data, env, trace)

    def commit(self, session: SmtpSession, transaction: Transaction, data: bytes,
               env: dict[str, str], trace: Callable[[], bytes]) -> str:
        """Queue the message; the reply to the end of DATA."""
        settings = self.settings
        ours = [incoming_recipient(settings, r)[0] for r in transaction.recipients]
        try:
            msguid = injection.accept(
                settings.queue_dir,
                self.trigger,
                msglib.to_crlf(data),
                transaction.sender,
                [mine or r for mine, r in zip(ours, transaction.recipients, strict=True)],
                env,
                settings.me,
                source_ip=session.peer_ip,
                trace=trace(),
                databytes=settings.databytes,
                limit=settings.limit,
                count_file=settings.count_file,
                as_received=all(ours),
            )
        except injection.InjectionError as e:
            code = "554 5.6.0" if e.permanent else "451 4.3.0"
            return f"{code} {e.text}"
        except msglib.HeaderValueError as e:  # the HELO check keeps CR and NUL out; `me` too
            log.error("%s", e)
            return f"554 5.6.0 {e}"
        except OSError as e:
            log.error("queue write failed: %s", e)
            return "451 4.3.0 temporary failure writing to the queue"
        return f"250 ok {msguid}"


class SmtpServer:
    """The listeners of `control/smtp.listen`, sharing one handler."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.sessions = SessionCount()
        self.policy = InjectionPolicy(Settings(root), self.sessions)
        self.servers: list[asyncio.AbstractServer] = []

    def _factory(self) -> SmtpSession:
        policy = self.policy
        return SmtpSession(policy, idle_timeout=policy.settings.timeout, on_close=policy.closed)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        passed = listen_sockets.inherited()  # bound by a root supervisor: we never bind then
        for sock in passed or []:
            self.servers.append(await loop.create_server(self._factory, sock=sock))
            log.info("listening on %s:%d (socket from the supervisor)", *sock.getsockname()[:2])
        addresses = [] if passed is not None else control.read(self.root.control, "smtp.listen")
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server = await loop.create_server(
                self._factory, host=host, port=port, family=family, reuse_address=True
            )
            self.servers.append(server)
            log.info("listening on %s:%d", host, port)
        if self.policy.tls_context is not None:
            log.info("STARTTLS offered")

    def reload(self) -> None:
        """Re-read smtp.tcp, databytes, me, the TLS files and greenarrow.conf's incoming
        mailboxes; an error keeps the old settings."""
        try:
            old, self.policy = self.policy, InjectionPolicy(Settings(self.root), self.sessions)
            old.trigger.close()
        except (control.ControlError, tcprules.TcpRulesError, smtp_users.SmtpUsersError,
                conflib.ConfError, OSError) as e:
            log.error("reload failed, keeping the previous settings: %s", e)
        else:
            log.info("reloaded control files")

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
