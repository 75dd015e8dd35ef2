"""What one message in a feedback mailbox becomes: events, counted bounces, or a refusal.

`analyse` is pure (no database, no files): the mailbox processor
(mailbox_processor) reads the message, calls it, and commits the outcome.
By mailbox kind (greenarrow.lib.routing.incoming):

* bounce: a bounce becomes one `bounce_all` (asynchronous) for the address
  the engine sent to, and is counted for repeat counting; an ARF report
  that arrives there is taken as a complaint (`scomp`);
* spam_complaint: an ARF report (or a common non-ARF loop, bounce_parse)
  becomes one `scomp`;
* lite_bounce / lite_fbl: `bounce_lite` / `scomp_lite` with what the
  message itself says (nothing is verified; nothing is counted).

Who bounced or complained is only taken from what the engine signed (docs/
bounces.md "Trust"): the encoded bounce address the bounce was sent to
(Delivered-To), else the encoded Return-Path of the returned original, else
its X-Mailer-Info. ListID and SendID are public and may be forged, so a
message none of these verify is refused (CouldNotProcess) instead of being
recorded against an address the sender of the bounce chose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from greenarrow.lib.events.types import make_event
from greenarrow.lib.feedback import arf, classify
from greenarrow.lib.feedback.bounce_parse import first_address, parse, parse_headers, to_text, walk
from greenarrow.lib.routing import incoming
from greenarrow.lib.simplemh import return_path as bounce_address
from greenarrow.lib.simplemh import tracking_url

BOUNCE_ALL = "bounce_all"
BOUNCE_BAD_ADDRESS = "bounce_bad_address"
BOUNCE_LITE = "bounce_lite"
SCOMP = "scomp"
SCOMP_LITE = "scomp_lite"
# The fields of bounce_all that bounce_bad_address repeats from the run's latest bounce.
BAD_ADDRESS_FIELDS = ("email", "listid", "sendid", "bounce_type", "bounce_code", "bounce_text",
                      "click_tracking_id", "mailclass", "instanceid")


@dataclass(frozen=True)
class Settings:
    """What analysis needs from the configuration."""

    server_id: str
    constants: tuple[str, str] | None  # None: nothing verifies, every bounce is refused
    fbl_headers: tuple[str, ...] = ()  # lite_fbl_processor_headers
    lite_bounce_report_text: bool = True  # lite_bounce_processor_include_report_text
    lite_fbl_report_text: bool = True  # lite_fbl_processor_include_report_text
    me: str = ""  # this server's name (control/me): its own qmail-style bounces
    qsbf_local: frozenset[str] = frozenset()  # opt.treat_qsbf_bounces_as_local_server_names
    qsbf_all: bool = False  # opt.treat_all_qsbf_bounces_as_local


@dataclass
class Counted:
    """One bounce for repeat counting: its key, its kind and its bounce_all fields."""

    email: str
    listid: str
    kind: str  # h, s or o
    fields: dict[str, Any]


@dataclass
class Outcome:
    events: list[dict[str, Any]] = field(default_factory=list)
    counted: list[Counted] = field(default_factory=list)
    suppress: list[tuple[str, str, str]] = field(default_factory=list)  # email, listid, why
    refused: str = ""  # why it goes to CouldNotProcess ("" if it was processed)


@dataclass
class Identity:
    email: str
    listid: str
    sendid: str
    mailclass: str = ""
    instanceid: str = ""
    click_tracking_id: str = ""


# qmail-send's bounce format (greenarrow.lib.queue.failure_notice writes it too)
_QSBF = re.compile(r"Hi\. This is the qmail-send program at ([^\s]+?)\.?\s*\n")
_QSBF_RECIPIENT = re.compile(r"^<([^<>\s]*)>:\s*$", re.M)


def qsbf(message: bytes) -> tuple[str, str] | None:
    """(server name, failure reason) of a qmail-style bounce; None if it is not one.

    The reason is the lines under the first `<recipient>:` joined with `/`,
    which gives back the delivery log's message the sending server logged.
    """
    text = to_text(message[:262144])
    m = _QSBF.search(text)
    if m is None or m.start() > 16384:
        return None
    r = _QSBF_RECIPIENT.search(text, m.end())
    if r is None:
        return m.group(1).lower(), ""
    lines = []
    for row in text[r.end() + 1:].split("\n", 200):
        if not row.strip():
            break
        lines.append(row)
    return m.group(1).lower(), "/".join(lines)


def envelope_recipient(message: bytes) -> str:
    """The address the message was delivered to: the first Delivered-To local delivery wrote."""
    headers, _ = parse_headers(to_text(message[:65536]), limit=200)
    for name in ("delivered-to", "x-original-to"):
        values = headers.get(name)
        if values:
            return first_address(values[0]) or values[0].strip()
    return ""


def _mailer_info(text: str, constants: tuple[str, str]) -> tracking_url.TrackingData | None:
    if not text:
        return None
    try:
        return tracking_url.decode(text, constants, frozenset((tracking_url.MAILER_INFO,)))
    except tracking_url.TrackingDataError:
        return None


# An X-Mailer-Info line in a text part, maybe quoted with `>`, with its folded lines.
_PASTED_MAILER_INFO = re.compile(
    r"^>?[ \t]*X-Mailer-Info[ \t]*:[ \t]*([A-Za-z0-9_-]+(?:\n>?[ \t]+[A-Za-z0-9_-]+)*)",
    re.IGNORECASE | re.MULTILINE)


def pasted_mailer_info(message: bytes) -> str:
    """The X-Mailer-Info DATA of headers pasted into a message's text, or "".

    A person (or a feedback loop that is not ARF) may send the headers of a
    message the engine sent as plain text. The DATA is signed, so the
    caller verifies it as it does an ARF report's.
    """
    _, parts = walk(to_text(message))
    for part in parts:
        if part.ctype.startswith("text/"):
            found = _PASTED_MAILER_INFO.search(part.body)
            if found:
                return re.sub(r"[\s>]", "", found.group(1))
    return ""


def identity(candidates: list[str], mailer_info: str, constants: tuple[str, str],
             domains: frozenset[str]) -> tuple[Identity | None, str]:
    """The verified identity of a returned message, or None and why not.

    `candidates`: encoded bounce addresses to try, in order; `domains`: the
    bounce domains an address of the old versions (1-4, domain not signed)
    may name.
    """
    info = _mailer_info(mailer_info, constants)
    reasons = []
    for address in candidates:
        if not address:
            continue
        try:
            decoded = bounce_address.decode(address, constants, mailer_info or None)
        except bounce_address.BounceAddressError as exc:
            reasons.append(str(exc))
            continue
        if decoded.unsubscribe:
            reasons.append(f"{address!r} is an unsubscribe address, not a bounce address")
            continue
        if not decoded.domain_bound and decoded.mailbox.rpartition("@")[2].lower() not in domains:
            reasons.append(f"{address!r} names a domain that is not a bounce domain")
            continue
        found = Identity(decoded.recipient, decoded.listid, decoded.sendid, decoded.mailclass,
                         decoded.instanceid, decoded.click_tracking_id)
        if info is not None and (info.recipient, info.listid, info.sendid) == (
                found.email, found.listid, found.sendid):
            found.mailclass, found.instanceid = info.mailclass, info.instanceid
            found.click_tracking_id = info.click_tracking_id
        return found, ""
    if info is not None:
        return Identity(info.recipient, info.listid, info.sendid, info.mailclass,
                        info.instanceid, info.click_tracking_id), ""
    if mailer_info:
        reasons.append("X-Mailer-Info of the original failed verification")
    if not reasons:
        return None, "no encoded bounce address and no X-Mailer-Info to say who it was sent to"
    return None, "; ".join(reasons)


def analyse(message: bytes, mailbox: incoming.Mailbox, when: int, source_key: str,
            settings: Settings, domains: frozenset[str] = frozenset()) -> Outcome:
    """The outcome of one message received at `mailbox` at `when` (never raises on bad mail)."""
    if mailbox.kind == incoming.LITE_BOUNCE:
        return _lite_bounce(message, mailbox, when, source_key, settings)
    if mailbox.kind == incoming.LITE_FBL:
        return _lite_fbl(message, mailbox, when, source_key, settings)
    if settings.constants is None:
        return Outcome(refused="no secret constants (control/secret_constants): "
                               "nothing can be verified")
    result = classify.classify_message(message, constants=settings.constants)
    envelope = envelope_recipient(message)
    if result.kind == "arf":
        return _complaint(result, envelope, when, source_key, settings, domains)
    if mailbox.kind == incoming.SPAM_COMPLAINT:
        pasted = pasted_mailer_info(message)
        if pasted:  # someone mailed in the headers they got (seeds 000/001, test step 5)
            result.mailer_info = pasted
            return _complaint(result, envelope, when, source_key, settings, domains)
        return Outcome(refused=f"not a complaint report (looks like: {result.kind})")
    qmail = qsbf(message) if result.kind == "text" else None
    if not result.results:
        what = "a delivery report with no failure" if result.kind in ("dsn", "text") else (
            "not a bounce")
        return Outcome(refused=what)
    who, why = identity([envelope, result.return_path], result.mailer_info,
                        settings.constants, domains | {mailbox.domain})
    if who is None:
        return Outcome(refused=f"sender not verified ({why})")
    synchronous = False
    text = classify.bounce_text(message)
    if qmail is not None:
        server, reason = qmail
        # This server mails none for a failure it logged as a synchronous bounce (queue-send,
        # incoming.sync_bounce_mailbox): one of its own reports a failure no log line holds
        # (an operator's `queue bounce`, or queued before that rule): synchronous as well.
        if server == settings.me.lower() or settings.qsbf_all or server in settings.qsbf_local:
            synchronous, text = True, classify.text_limit(reason)
    chosen = next((r for r in result.results if r.recipient.lower() == who.email.lower()),
                  result.results[0])
    fields = {"email": who.email, "listid": who.listid, "sendid": who.sendid,
              "bounce_type": chosen.bounce_type, "bounce_code": chosen.bounce_code,
              "bounce_text": text,
              "click_tracking_id": who.click_tracking_id, "mailclass": who.mailclass,
              "instanceid": who.instanceid}
    outcome = Outcome()
    outcome.events.append(make_event(BOUNCE_ALL, when, settings.server_id, source_key,
                                     synchronous=synchronous, **fields))
    outcome.counted.append(Counted(who.email, who.listid, chosen.bounce_type, fields))
    return outcome


def _complaint(result: classify.Classification, envelope: str, when: int, source_key: str,
               settings: Settings, domains: frozenset[str]) -> Outcome:
    assert settings.constants is not None
    c = result.complaint
    if c is not None and c.verified:
        who = Identity(c.recipient, c.listid, c.sendid, c.mailclass, c.instanceid,
                       c.click_tracking_id)
    else:
        who, why = identity([result.return_path], result.mailer_info, settings.constants,
                            domains)
        if who is None:
            return Outcome(refused=f"complaint about mail the engine cannot verify it sent ({why})")
    outcome = Outcome()
    outcome.events.append(make_event(
        SCOMP, when, settings.server_id, source_key, email=who.email, listid=who.listid,
        sendid=who.sendid, click_tracking_id=who.click_tracking_id, mailclass=who.mailclass,
        instanceid=who.instanceid))
    outcome.suppress.append((who.email, who.listid, SCOMP))
    return outcome


def report_text(message: bytes) -> str:
    """The message as received, as text (bad UTF-8 -> U+FFFD)."""
    return message.decode("utf-8", "replace")


def _lite_bounce(message: bytes, mailbox: incoming.Mailbox, when: int, source_key: str,
                 settings: Settings) -> Outcome:
    result = classify.classify_message(message)
    if result.kind == "arf":
        return _lite_fbl(message, mailbox, when, source_key, settings)
    if not result.results:
        return Outcome(refused=f"not a bounce (looks like: {result.kind})")
    first = result.results[0]
    event = make_event(
        BOUNCE_LITE, when, settings.server_id, source_key, bounce_code=first.bounce_code,
        bounce_code_match_text=_as_written(message, first.match_text), synchronous=False,
        report_recipient=envelope_recipient(message) or mailbox.address,
        report_message_text=report_text(message) if settings.lite_bounce_report_text else None)
    return Outcome(events=[event])


def _as_written(message: bytes, match_text: str) -> str:
    """The matched line(s) with the case they have in the message (the rules see it lower-cased)."""
    if not match_text:
        return match_text
    text = to_text(message)
    lower = text.lower()
    at = lower.find(match_text)
    if at < 0 or len(lower) != len(text):
        return match_text
    return text[at:at + len(match_text)]


def _lite_fbl(message: bytes, mailbox: incoming.Mailbox, when: int, source_key: str,
              settings: Settings) -> Outcome:
    parsed = parse(message)
    if parsed.kind != "arf":
        return Outcome(refused=f"not a complaint report (looks like: {parsed.kind})")
    c = arf.complaint(parsed)
    headers = {name: list(parsed.original_headers.get(name.lower(), []))
               for name in settings.fbl_headers}
    event = make_event(
        SCOMP_LITE, when, settings.server_id, source_key, email=c.recipient or None,
        user_agent=c.user_agent or None, headers=headers,
        report_recipient=envelope_recipient(message) or mailbox.address,
        report_message_text=report_text(message) if settings.lite_fbl_report_text else None,
        report_sender=c.report_sender or None)
    return Outcome(events=[event])


def bad_address_event(fields: dict[str, Any], when: int, settings: Settings,
                      source_key: str) -> dict[str, Any]:
    """bounce_bad_address with the fields of the run's most recent bounce."""
    return make_event(BOUNCE_BAD_ADDRESS, when, settings.server_id, source_key,
                      **{name: fields.get(name) for name in BAD_ADDRESS_FIELDS})
