"""SMTP injection: the `smtpd` service's policy, on greenarrow.lib.smtp_protocol.

ESMTP with PIPELINING, SIZE (`control/databytes`) and 8BITMIME. Relaying is
allowed only for clients whose `control/smtp.tcp` rule sets RELAYCLIENT;
everyone else is refused at RCPT and nothing is queued. The message goes
through the same processing as command-line injection
(greenarrow.lib.injection), and the queue commit happens before the 250
reply to DATA.

STARTTLS is offered when `control/smtp.tls.cert` names a certificate file
(and `control/smtp.tls.key` its key; empty = in the certificate file).
The TLS context is built once, at start and at each reload, so a session
pays only for its handshake; a bad file stops the start with an error
naming it, and a bad file at reload keeps the context in use.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

from greenarrow.lib import control, injection, queue_entry, tcprules
from greenarrow.lib import message as msglib
from greenarrow.lib.core import listen_sockets
from greenarrow.lib.paths import Root
from greenarrow.lib.smtp_protocol import SessionPolicy, SmtpSession, Transaction

log = logging.getLogger("smtpd")

IDLE_TIMEOUT = 300.0  # seconds a session may wait for its next command (RFC 5321 4.5.3.2.7)
RELAY_DENIED = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"


class Settings:
    """What the handler reads from control; re-read on reload (SIGHUP)."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.me = str(control.read(root.control, "me"))
        self.databytes = int(control.read(root.control, "databytes"))
        self.limit = int(control.read(root.control, "queue.ram.limit.messages"))
        self.count_file = queue_entry.count_path(str(root.path), "ram")
        path = root.control / "smtp.tcp"
        text = path.read_text() if path.exists() else ""
        self.rules = tcprules.parse(text, str(path))
        self.queue_dir = str(root.queue("ram"))
        self.fifo = str(root.trigger("ram"))
        self.tls_context = tls_context(root.control)


def tls_context(control_dir: Path) -> ssl.SSLContext | None:
    """The STARTTLS server context of `smtp.tls.cert`/`smtp.tls.key`, or None (not offered).

    Relative paths are relative to control/. ControlError naming the file
    that is missing, unreadable or not what it should be.
    """
    cert = str(control.read(control_dir, "smtp.tls.cert"))
    key = str(control.read(control_dir, "smtp.tls.key"))
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


class InjectionPolicy(SessionPolicy):
    """The engine's side of an SMTP session: relay check at RCPT, queue commit at DATA."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hostname = settings.me
        self.databytes = settings.databytes
        self.tls_context = settings.tls_context
        self.trigger = queue_entry.Trigger(settings.fifo)

    def _rule(self, session: SmtpSession) -> tcprules.TcpRule | None:
        if "rule" not in session.state:  # once per connection
            session.state["rule"] = self.settings.rules.match(session.peer_ip or "127.0.0.1")
        return session.state["rule"]

    def check_sender(self, session: SmtpSession, address: str) -> str | None:
        try:
            injection.check_sender(address)
        except injection.InjectionError as e:
            return f"553 5.1.7 {e.text}"
        return None

    def check_recipient(self, session: SmtpSession, address: str) -> str | None:
        rule = self._rule(session)
        if rule is None or not rule.allow or "RELAYCLIENT" not in rule.env:
            return RELAY_DENIED
        try:
            injection.check_address(address, "recipient")
        except injection.InjectionError as e:
            return f"553 5.1.3 {e.text}"
        return None

    def message(self, session: SmtpSession, transaction: Transaction, data: bytes) -> str:
        settings = self.settings
        rule = self._rule(session)
        env = {k: v for k, v in (rule.env if rule else {}).items() if k.startswith("GREENARROW_")}
        trace = b""
        if "GREENARROW_SMTP_RECEIVED_HIDE" not in env:
            trace = (
                f"Received: from {session.helo or 'unknown'} ([{session.peer_ip}])\r\n"
                f"\tby {settings.me} with {'ESMTPS' if session.tls else 'ESMTP'};"
                f" {msglib.rfc5322_date()}\r\n"
            ).encode("ascii", "replace")
        try:
            msguid = injection.accept(
                settings.queue_dir,
                self.trigger,
                msglib.to_crlf(data),
                transaction.sender,
                list(transaction.recipients),
                env,
                settings.me,
                source_ip=session.peer_ip,
                trace=trace,
                databytes=settings.databytes,
                limit=settings.limit,
                count_file=settings.count_file,
            )
        except injection.InjectionError as e:
            code = "554 5.6.0" if e.permanent else "451 4.3.0"
            return f"{code} {e.text}"
        except OSError as e:
            log.error("queue write failed: %s", e)
            return "451 4.3.0 temporary failure writing to the queue"
        return f"250 ok {msguid}"


class SmtpServer:
    """The listeners of `control/smtp.listen`, sharing one handler."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.policy = InjectionPolicy(Settings(root))
        self.servers: list[asyncio.AbstractServer] = []

    def _factory(self) -> SmtpSession:
        return SmtpSession(self.policy, idle_timeout=IDLE_TIMEOUT)

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
        """Re-read smtp.tcp, databytes, me and the TLS files; an error keeps the old settings."""
        try:
            old, self.policy = self.policy, InjectionPolicy(Settings(self.root))
            old.trigger.close()
        except (control.ControlError, tcprules.TcpRulesError, OSError) as e:
            log.error("reload failed, keeping the previous settings: %s", e)
        else:
            log.info("reloaded control files")

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
