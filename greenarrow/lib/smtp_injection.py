"""SMTP injection: the `smtpd` service's session handling, on aiosmtpd.

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

from aiosmtpd.smtp import SMTP, Envelope, Session

from greenarrow.lib import control, injection, queue_entry, tcprules
from greenarrow.lib import message as msglib
from greenarrow.lib.paths import Root

log = logging.getLogger("smtpd")

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


class InjectionHandler:
    """aiosmtpd handler hooks: relay check at RCPT, queue commit at DATA."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # SMTPUTF8 is not offered: it is enabled in aiosmtpd only so that an
        # 8-bit address reaches the address check (553) instead of a bare 500.
        responses = [r for r in responses if r != "250-SMTPUTF8"]
        # aiosmtpd reads pipelined commands in order; say so.
        return responses[:-1] + ["250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if "SMTPUTF8" in mail_options:
            return "555 5.6.7 SMTPUTF8 is not supported"
        try:
            # aiosmtpd gives the null sender as "<>"; it stays so in the
            # envelope (an empty mail_from would mean "no MAIL yet" to aiosmtpd).
            injection.check_sender("" if address == "<>" else address)
        except injection.InjectionError as e:
            return f"553 5.1.7 {e.text}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        rule = self._rule(session)
        if rule is None or not rule.allow or "RELAYCLIENT" not in rule.env:
            return RELAY_DENIED
        try:
            injection.check_address(address, "recipient")
        except injection.InjectionError as e:
            return f"553 5.1.3 {e.text}"
        envelope.rcpt_tos.append(address)
        return "250 ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        settings = self.settings
        rule = self._rule(session)
        env = {k: v for k, v in (rule.env if rule else {}).items() if k.startswith("GREENARROW_")}
        ip = session.peer[0] if isinstance(session.peer, tuple) else ""
        trace = b""
        if "GREENARROW_SMTP_RECEIVED_HIDE" not in env:
            trace = (
                f"Received: from {session.host_name or 'unknown'} ([{ip}])\r\n"
                f"\tby {settings.me} with {'ESMTPS' if session.ssl else 'ESMTP'};"
                f" {msglib.rfc5322_date()}\r\n"
            ).encode("ascii", "replace")
        try:
            msguid = injection.accept(
                settings.queue_dir,
                settings.fifo,
                msglib.to_crlf(envelope.original_content),
                "" if envelope.mail_from == "<>" else envelope.mail_from,
                list(envelope.rcpt_tos),
                env,
                settings.me,
                source_ip=ip,
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

    def _rule(self, session: Session) -> tcprules.TcpRule | None:
        peer = session.peer
        ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        return self.settings.rules.match(ip)


class SmtpServer:
    """The listeners of `control/smtp.listen`, sharing one handler."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.handler = InjectionHandler(Settings(root))
        self.servers: list[asyncio.AbstractServer] = []

    def _factory(self) -> SMTP:
        settings = self.handler.settings
        return SMTP(
            self.handler,
            data_size_limit=settings.databytes or None,
            hostname=settings.me,
            ident="GreenArrow-compatible ESMTP",
            decode_data=False,
            enable_SMTPUTF8=True,  # not advertised: see handle_EHLO
            timeout=300,
            tls_context=settings.tls_context,  # None: STARTTLS neither offered nor accepted
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in control.read(self.root.control, "smtp.listen"):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server = await loop.create_server(
                self._factory, host=host, port=port, family=family, reuse_address=True
            )
            self.servers.append(server)
            log.info("listening on %s:%d", host, port)
        if self.handler.settings.tls_context is not None:
            log.info("STARTTLS offered")

    def reload(self) -> None:
        """Re-read smtp.tcp, databytes, me and the TLS files; an error keeps the old settings."""
        try:
            self.handler.settings = Settings(self.root)
        except (control.ControlError, tcprules.TcpRulesError, OSError) as e:
            log.error("reload failed, keeping the previous settings: %s", e)
        else:
            log.info("reloaded control files")

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
