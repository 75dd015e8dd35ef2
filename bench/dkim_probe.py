"""The simplemh scenario's DKIM probe: does this MTA really sign, and does it verify?

One message goes through the MTA (configured as for the measured runs, but
relaying to a capturing SMTP server instead of the counting sink); the
captured copy must carry exactly one DKIM-Signature, for the bench's domain
and selector, that dkimpy verifies with the bench key's public half.
Bounded: `timeout` seconds for the message to arrive.
"""

from __future__ import annotations

import base64
import smtplib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import genmsg
from bench.peers import DKIM_SELECTOR, SENDER_DOMAIN, Peer, dkim_key_path
from bench.procs import free_port


@dataclass
class ProbeResult:
    problem: str = ""  # "" when the signature verified
    tags: str = ""  # a=, c=, d=, s= and h= of the signature


def public_txt(work: Path) -> bytes:
    """The TXT record of the bench key (`dkim_key` made it)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(dkim_key_path(work).read_bytes(), password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def probe(peer: Peer, restart: Callable[[int], None], message: bytes, work: Path,
          timeout: float = 60.0) -> ProbeResult:
    """`restart(port)` (re)starts `peer` relaying to `port`; one message through it, checked."""
    import aiosmtpd.controller
    from aiosmtpd.smtp import SMTP

    got: list[bytes] = []
    arrived = threading.Event()

    class Capture(SMTP):
        line_length_limit = 1 << 20  # lines as the MTA sends them; only the signature matters

    class Controller(aiosmtpd.controller.Controller):
        def factory(self):  # noqa: ANN202
            return Capture(self.handler, hostname="probe.bench.test")

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN202
            got.append(envelope.original_content or envelope.content)
            arrived.set()
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        restart(port)
        with smtplib.SMTP("127.0.0.1", peer.smtp_port, timeout=30) as smtp:
            smtp.sendmail(genmsg.SENDER, [genmsg.RCPT],
                          message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        if not arrived.wait(timeout):
            return ProbeResult(f"the probe message did not arrive within {timeout:.0f} s")
    finally:
        controller.stop()
    return check(got[0], work)


def check(content: bytes, work: Path) -> ProbeResult:
    """One DKIM-Signature for the bench domain and selector, verified by dkimpy."""
    import dkim

    headers, _ = dkim.rfc822_parse(content)
    signatures = [v for k, v in headers if k.lower() == b"dkim-signature"]
    if len(signatures) != 1:
        return ProbeResult(f"{len(signatures)} DKIM-Signature headers, expected 1")
    tags = dkim.util.parse_tag_value(signatures[0])
    shown = "; ".join(f"{k}=" + "".join(tags.get(k.encode(), b"").decode().split())
                      for k in ("a", "c", "d", "s", "h"))
    if tags.get(b"d") != SENDER_DOMAIN.encode() or tags.get(b"s") != DKIM_SELECTOR.encode():
        return ProbeResult(f"signed as d={tags.get(b'd')!r} s={tags.get(b's')!r}", shown)
    txt = public_txt(work)
    name = f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}.".encode()

    def dnsfunc(query: bytes, timeout: int = 5) -> bytes | None:
        return txt if query.lower() == name else None

    try:
        ok = dkim.DKIM(content).verify(0, dnsfunc=dnsfunc)
    except dkim.DKIMException as e:
        return ProbeResult(f"dkimpy: {e}", shown)
    return ProbeResult("" if ok else "dkimpy: the signature does not verify", shown)
