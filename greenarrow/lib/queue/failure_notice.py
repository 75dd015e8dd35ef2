"""The bounce message: qmail-send's bounce format (QSBF), and who gets one.

A permanent failure (or a deferral past the queue lifetime) of a message
with a sender produces a bounce to that sender, sent with an empty sender
and SendID `-ic` from the bounce-queue. The failure of a message with an
empty sender (a bounce, usually) produces a double bounce to
`control/doublebounceto`, or nothing when that is empty; the failure of a
double bounce (`bounce_level` 2 in its envelope) produces nothing, so bounces
never loop.

The original message is quoted below the break line, truncated at
`control/bouncemaxbytes` bytes.
"""

from __future__ import annotations

from greenarrow.lib.core.message import rfc5322_date

INTERNAL_SENDID = "-ic"
BREAK_LINE = "--- Below this line is a copy of the message."


def bounce_text(me: str, recipient: str, reason: str, double: bool = False) -> str:
    """The human part of a QSBF bounce, with qmail-send's wording."""
    lines = [
        f"Hi. This is the qmail-send program at {me}.",
        "I'm afraid I wasn't able to deliver your message to the following addresses.",
        "This is a permanent error; I've given up. Sorry it didn't work out.",
        "",
    ]
    if double:
        lines[1:1] = ["I tried to deliver a bounce message to this address, but the bounce bounced!"]
    lines += [f"<{recipient}>:", *reason.split("/"), "", BREAK_LINE, ""]
    return "\r\n".join(lines) + "\r\n"


def make_bounce(me: str, to: str, recipient: str, reason: str, original: bytes,
                max_bytes: int, msguid: str, double: bool = False) -> bytes:
    """A complete bounce message (CRLF) to `to` about `recipient`."""
    quoted = original if not max_bytes or len(original) <= max_bytes else original[:max_bytes]
    if quoted and not quoted.endswith(b"\r\n"):
        quoted += b"\r\n"
    subject = "failure notice"
    head = (
        f"From: MAILER-DAEMON@{me}\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {rfc5322_date()}\r\n"
        f"Message-ID: <{msguid}.bounce@{me}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    )
    body = bounce_text(me, recipient, reason, double)
    return head.encode("ascii", "replace") + body.encode("ascii", "replace") + quoted


def bounce_recipient(envelope: dict, doublebounceto: str) -> tuple[str, bool] | None:
    """Who gets the bounce of a failed entry, and whether it is a double bounce; None: nobody."""
    level = int(envelope.get("bounce_level", 0) or 0)
    if envelope.get("sender"):
        return envelope["sender"], False
    if level < 2 and doublebounceto:
        return doublebounceto, True
    return None
