"""Find what a returned message reports: recipients, status codes, diagnostic text.

A bounce arrives as bytes. This module takes it apart without building a
full `email` tree (that costs more than the whole classification): line
endings are made LF once, headers are unfolded with plain string work, and a
small MIME walk (bounded in depth and part count) finds the parts that
matter:

- an RFC 3464 `message/delivery-status` part (or the same fields in a text
  part, which several MTAs send), one `RecipientReport` per recipient block;
- otherwise the human-readable text of a non-standard bounce (qmail, Exim,
  Sendmail, Exchange, Yahoo, ...): recipients are the addresses named in it,
  each with the lines that follow it;
- the original message's headers (a `message/rfc822` or
  `text/rfc822-headers` part, or the copy after a "below is a copy" line):
  X-Mailer-Info, Return-Path, To, Message-ID.

Only the first `MAX_PARSE_BYTES` of a message are read: every report format
puts its reports near the top, and a 50 MB returned attachment must cost no
more than a small one.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

MAX_PARSE_BYTES = 1 << 20
MAX_PARTS = 64
MAX_DEPTH = 6
MAX_RECIPIENTS = 200

DSN_FIELDS = ("final-recipient", "original-recipient", "x-actual-recipient", "action",
              "status", "diagnostic-code", "remote-mta", "last-attempt-date")


@dataclass
class Part:
    """One MIME part: lower-cased content type, headers, decoded body text."""
    ctype: str
    headers: dict[str, list[str]]
    body: str
    params: str = ""


@dataclass
class RecipientReport:
    """What the bounce says about one recipient (before classification)."""
    recipient: str
    status: str = ""
    action: str = ""
    text: str = ""
    reply_code: str = ""
    command: str = ""  # the SMTP command the failure answered: RCPT, DATA, MAIL or ""


@dataclass
class ParsedMessage:
    """Everything the classifier and the processors need from one message."""
    headers: dict[str, list[str]]
    parts: list[Part]
    kind: str = "none"  # dsn, text, arf, autoreply, challenge, none
    reports: list[RecipientReport] = field(default_factory=list)
    original_headers: dict[str, list[str]] = field(default_factory=dict)
    human_text: str = ""
    feedback_fields: dict[str, list[str]] = field(default_factory=dict)

    def header(self, name: str) -> str:
        values = self.headers.get(name)
        return values[0] if values else ""

    def original(self, name: str) -> str:
        values = self.original_headers.get(name)
        return values[0] if values else ""


# -- bytes to text, headers ------------------------------------------------

def to_text(data: bytes) -> str:
    """LF line endings, the parse limit applied, decoded (bad UTF-8 -> U+FFFD)."""
    data = data[:MAX_PARSE_BYTES]
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data.decode("utf-8", "replace")


_HEADER_LINE = re.compile(r"([!-9;-~]+)[ \t]*:[ \t]*(.*)")


_HEADER_FIELD = re.compile(r"([!-9;-~]+)[ \t]*:[ \t]*([^\n]*(?:\n[ \t][^\n]*)*)\n?")


def parse_headers(text: str, start: int = 0, limit: int = 2000) -> tuple[dict[str, list[str]], int]:
    """Header block at `start` -> ({lower name: [unfolded values]}, body offset).

    A line that is neither a header nor a continuation ends the block (some
    MTAs omit the blank line), as does a blank line. At most `limit` fields.
    """
    headers: dict[str, list[str]] = {}
    pos = start
    if text.startswith("From ", pos):  # mbox separator
        nl = text.find("\n", pos)
        pos = len(text) if nl < 0 else nl + 1
    match = _HEADER_FIELD.match
    for _ in range(limit):
        m = match(text, pos)
        if m is None:
            break
        value = m.group(2)
        if "\n" in value:
            value = " ".join(piece.strip() for piece in value.split("\n"))
        else:
            value = value.strip()
        headers.setdefault(m.group(1).lower(), []).append(value)
        pos = m.end()
    if text.startswith("\n", pos):
        pos += 1
    return headers, min(pos, len(text))


_PARAM = re.compile(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*(?:"([^"]*)"|([^\s;]+))')


def content_type(headers: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    values = headers.get("content-type")
    if not values:
        return "text/plain", {}
    value = values[0]
    semi = value.find(";")
    main = (value if semi < 0 else value[:semi]).strip().lower()
    params = {}
    if semi >= 0:
        for m in _PARAM.finditer(value[semi:]):
            params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return main or "text/plain", params


def _decode_body(headers: dict[str, list[str]], body: str) -> str:
    cte = headers.get("content-transfer-encoding")
    if not cte:
        return body
    cte_value = cte[0].strip().lower()
    try:
        if cte_value == "base64":
            raw = binascii.a2b_base64(body.encode("ascii", "ignore"))
        elif cte_value == "quoted-printable":
            raw = binascii.a2b_qp(body.encode("utf-8", "replace"))
        else:
            return body
    except (binascii.Error, ValueError):
        return body
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


# -- the MIME walk ---------------------------------------------------------

def walk(text: str) -> tuple[dict[str, list[str]], list[Part]]:
    """Top-level headers and the flat list of leaf parts (bounded)."""
    headers, offset = parse_headers(text)
    parts: list[Part] = []
    _walk_entity(headers, text[offset:], parts, 0)
    return headers, parts


def _walk_entity(headers: dict[str, list[str]], body: str, parts: list[Part], depth: int) -> None:
    if len(parts) >= MAX_PARTS:
        return
    ctype, params = content_type(headers)
    boundary = params.get("boundary")
    if ctype.startswith("multipart/") and boundary and depth < MAX_DEPTH:
        for chunk in _split_multipart(body, boundary):
            sub_headers, offset = parse_headers(chunk)
            _walk_entity(sub_headers, chunk[offset:], parts, depth + 1)
            if len(parts) >= MAX_PARTS:
                return
        return
    if ctype.startswith("multipart/"):
        ctype = "text/plain"  # no usable boundary: read it as text
    text = _decode_body(headers, body)
    if ctype == "text/plain":
        text = _unquote_forward(text)
    parts.append(Part(ctype, headers, text, params.get("report-type", "")))


def _unquote_forward(text: str) -> str:
    """A bounce forwarded with `> ` quoting: its text without one level of quotes."""
    head = text[:20000]
    lines = [line for line in head.split("\n", 400)[:400] if line.strip()]
    quoted = sum(line.startswith(">") and not line.startswith(">>>") for line in lines)
    if len(lines) < 5 or quoted * 2 < len(lines):  # (">>> DATA" is a Sendmail transcript)
        return text
    return "\n".join(line[2:] if line.startswith("> ") else line[1:] if line.startswith(">") else line
                     for line in text[:MAX_PARSE_BYTES].split("\n"))


def _split_multipart(body: str, boundary: str) -> list[str]:
    delimiter = "--" + boundary
    chunks = []
    pos = body.find(delimiter)
    if pos < 0:
        return [body]  # a broken multipart: the whole body as one part
    while len(chunks) < MAX_PARTS:
        start = body.find("\n", pos)
        if start < 0:
            break
        if body.startswith("--", pos + len(delimiter)):
            break  # closing delimiter
        nxt = body.find("\n" + delimiter, start)
        if nxt < 0:
            chunks.append(body[start + 1:])
            break
        chunks.append(body[start + 1:nxt])
        pos = nxt + 1
    return chunks


# -- addresses -------------------------------------------------------------

_ADDRESS = re.compile(r"(?:\"[^\"\n<>@]{1,64}\"|[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+)@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")


def first_address(value: str) -> str:
    m = _ADDRESS.search(value)
    return m.group(0).strip(".").lower() if m else ""


def addresses(value: str) -> list[str]:
    return [a.strip(".").lower() for a in _ADDRESS.findall(value)]


# -- RFC 3464 delivery-status ---------------------------------------------

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY = re.compile(r"(?<![\d.])([245]\d\d)(?:[ -]|$)")


def _strip_type(value: str) -> str:
    """`smtp; 550 ...` / `rfc822; a@b` -> the part after the type."""
    semi = value.find(";")
    if 0 <= semi < 12 and " " not in value[:semi].strip():
        return value[semi + 1:].strip()
    return value.strip()


def parse_delivery_status(body: str) -> list[RecipientReport]:
    """The per-recipient blocks of a delivery-status body (fields unfolded)."""
    reports: list[RecipientReport] = []
    fields, _ = parse_headers_all(body)
    current: dict[str, str] | None = None
    groups: list[dict[str, str]] = []
    for name, value in fields:
        if name in ("final-recipient", "original-recipient", "x-actual-recipient"):
            if current is None or name in current or (
                    name == "original-recipient" and "final-recipient" in current
                    and "status" in current):
                current = {}
                groups.append(current)
        if current is not None and name in DSN_FIELDS and name not in current:
            current[name] = value
    for g in groups[:MAX_RECIPIENTS]:
        recipient = first_address(_strip_type(g.get("final-recipient", "")))
        original = first_address(_strip_type(g.get("original-recipient", "")))
        recipient = recipient or original or first_address(g.get("x-actual-recipient", ""))
        if not recipient:
            continue
        status_match = _STATUS.search(g.get("status", ""))
        text = _strip_type(g.get("diagnostic-code", "")) if "diagnostic-code" in g else ""
        report = RecipientReport(recipient=recipient,
                                 status=status_match.group(0) if status_match else "",
                                 action=g.get("action", "").strip().lower().split(" ")[0],
                                 text=text)
        _fill_codes(report)
        reports.append(report)
    return reports


def parse_headers_all(text: str) -> tuple[list[tuple[str, str]], int]:
    """Every `name: value` field of a delivery-status body, blank lines skipped."""
    out: list[tuple[str, str]] = []
    name = ""
    value: list[str] = []
    for line in text.split("\n", 4000):
        if not line.strip():
            continue
        if line[0] in " \t" and name:
            value.append(line.strip())
            continue
        m = _HEADER_LINE.match(line)
        if name:
            out.append((name, " ".join(value)))
            name = ""
        if m is None:
            continue
        name = m.group(1).lower()
        value = [m.group(2).strip()]
    if name:
        out.append((name, " ".join(value)))
    return out, len(text)


_COMMAND = re.compile(r"(?:after|in reply to|while (?:sending|talking)|>>>|did not like our)\s*"
                      r"(?:the\s+)?(?:end of\s+)?(RCPT|DATA|MAIL|message)\b", re.IGNORECASE)


def smtp_command(text: str) -> str:
    """The last SMTP command a failure text says it answered (RCPT, DATA, MAIL)."""
    found = ""
    for m in _COMMAND.finditer(text):
        found = m.group(1).upper()
    return "DATA" if found == "MESSAGE" else found


def _fill_codes(report: RecipientReport) -> None:
    """Status, reply code and SMTP command from the diagnostic text where the fields lack them."""
    text = report.text
    if not report.command:
        report.command = smtp_command(text)
    m = _STATUS.search(text)
    if m and (not report.status or report.status.endswith(".0.0") or report.status == "5.0.0"):
        if m.group(1) == (report.status[:1] or m.group(1)):
            report.status = m.group(0)
    if not report.reply_code:
        r = _REPLY.search(text)
        if r:
            report.reply_code = r.group(1)
    if not report.status and report.reply_code:
        report.status = report.reply_code[0] + ".0.0"


# -- non-standard bounces --------------------------------------------------

# Lines that start the quoted original message in the text of a bounce.
_ORIGINAL_MARKERS = re.compile(
    r"^[ \t>|]*(?:-+ ?)?(?:"
    r"(?:this is a copy|a copy) of the (?:original )?message|"
    r"below this line is a copy of the message|"
    r"original message(?: follows| headers follow)?|"
    r"the (?:original|text of your) message|"
    r"unsent message (?:below|follows)|"
    r"returned (?:message|mail)|"
    r"the headers of (?:the|your) (?:original )?message|"
    r"message headers follow|"
    r"your message reads|"
    r"original message header|"
    r"undelivered message headers|"
    r"message text follows|"
    r"(?:the )?headers? and (?:the )?(?:top|first) \d+ lines of (?:the|your) message|"
    r"(?:a )?summary of the undelivered message"
    r")", re.MULTILINE)
MARKER_WINDOW = 64 * 1024


def original_marker(body: str) -> int:
    """Where the copy of the original message starts in a bounce's text (-1: nowhere)."""
    m = _ORIGINAL_MARKERS.search(body[:MARKER_WINDOW].lower())
    return m.start() if m else -1

_BOUNCE_SENDER = re.compile(
    r"mailer-daemon|postmaster|mail delivery (?:subsystem|system)|mail.?delivery|"
    r"^(?:bounce|bounces|nobody|mdaemon|mailadmin)@", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (?:status|failure|failed|notification|problem|report)|"
    r"mail delivery|returned mail|failure notice|non.?deliver|could not (?:be )?deliver|"
    r"delivery has failed|bounce|not delivered|nondeliverable|mail system error|"
    r"rejected|mail failure|delivery error|warning: could not|delayed mail|"
    r"message (?:not delivered|delivery|status)|error sending message|"
    r"permanent error|returned to sender|unable to deliver|mail could not|"
    r"delivery (?:incomplete|unsuccessful)|send(?:ing)? failed|fehlgeschlagen|"
    r"unzustellbar|no se puede entregar|non remis|undelivered",
    re.IGNORECASE)
_STRONG_BODY = re.compile(
    r"could not be delivered to|delivery to the following recipients? failed|"
    r"undeliverable to|permanent (?:error|failure)|this is the qmail-send program|"
    r"message (?:was|could) not be delivered", 0)
_BOUNCE_BODY = re.compile(
    r"could not be delivered|permanent(?:ly)? (?:error|fatal|failure)|delivery (?:has )?failed|"
    r"undeliver|not be delivered|following (?:address|recipient)|"
    r"delivery to the following|unable to deliver|returned to sender|"
    r"user unknown|does not exist|no such user|mailbox (?:is )?(?:full|unavailable)|"
    r"this is the qmail-send program|mail delivery software|rejected|"
    r"delivery attempts? (?:will continue|failed)|could not deliver|was not delivered|"
    r"failed addresses|no valid recipients",
    0)


def _human_text(parts: list[Part]) -> str:
    """The first text part that is not the returned message, cut before the copy."""
    for part in parts:
        if part.ctype in ("text/plain", "text/html", "text") or part.ctype.startswith("text/"):
            if part.ctype == "text/rfc822-headers":
                continue
            body = part.body
            if part.ctype == "text/html":
                body = _strip_html(body)
            at = original_marker(body)
            if at > 0:
                body = body[:at]
            return body[:64 * 1024]
    return ""


_TAG = re.compile(r"<(?:br|p|div|tr|li)[^>]*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<[^>]{0,2000}>")


def _strip_html(body: str) -> str:
    body = _TAG.sub("\n", body)
    body = _ANY_TAG.sub(" ", body)
    return body.replace("&lt;", "<").replace("&gt;", ">").replace("&nbsp;", " ").replace("&amp;", "&")


# Header fields of a quoted original (or of a forwarded report) whose addresses are
# message ids, lists, relays or senders: never the recipient that failed.
_NOT_RECIPIENT_FIELD = re.compile(
    r"(?:message-id|in-reply-to|references|received|sender|reply-to|errors-to|list-[a-z-]+|"
    r"x-beenthere|x-list-[a-z-]+|x-mailman-[a-z-]+|return-receipt-to|"
    r"disposition-notification-to):", re.IGNORECASE)


def parse_text_bounce(text: str, exclude: set[str], failed: list[str]) -> list[RecipientReport]:
    """Recipients of a human-readable bounce: each address named, with its lines.

    `failed` (X-Failed-Recipients) fixes the recipient set when given;
    `exclude` holds the bounce's own sender and recipient addresses.
    """
    lines = text.split("\n")[:3000]
    found: dict[str, list[int]] = {}
    quoted_field = False  # inside a quoted header field that names no recipient
    for i, line in enumerate(lines):
        if line[:1] in (" ", "\t") and line.strip():
            if quoted_field:
                continue  # its continuation line
        else:
            quoted_field = bool(_NOT_RECIPIENT_FIELD.match(line))
            if quoted_field:
                continue
        if "@" not in line:
            continue
        for address in addresses(line):
            if address in exclude or address in found:
                continue
            if _BOUNCE_SENDER.search(address) and not failed:
                continue
            found[address] = [i]
    order = list(found)
    if failed:
        order = [a for a in failed if a not in exclude] or failed
    reports = []
    for address in order[:MAX_RECIPIENTS]:
        start = found[address][0] if address in found else None
        others = frozenset(a for a in order if a != address)
        context = _context(lines, start, others) if start is not None else _best_error_lines(lines)
        report = RecipientReport(recipient=address, action="failed", text=context)
        _fill_codes(report)
        reports.append(report)
    return reports


_ERRORISH = re.compile(r"\b[45]\d\d\b|\b[45]\.\d{1,3}\.\d{1,3}\b|unknown|not exist|no such|"
                       r"full|quota|reject|denied|refused|invalid|disabled|unavailable|"
                       r"blocked|spam|timed? ?out|expired|too (?:large|big)|not found|"
                       r"could not|unable|error|fail", 0)


def _context(lines: list[str], start: int, others: frozenset[str] = frozenset()) -> str:
    """The address line and the lines after it that carry the error.

    Stops at two blank lines in a row, at a line naming another recipient,
    or after a few lines.
    """
    out = [lines[start].strip()]
    blank = 0
    for line in lines[start + 1:start + 16]:
        s = line.strip()
        if not s:
            blank += 1
            if blank > 1 and len(out) > 1:
                break
            continue
        blank = 0
        if others and "@" in s and any(a in others for a in addresses(s)):
            break  # the next recipient's block
        out.append(s)
        if len(out) >= 8:
            break
    text = " ".join(out)
    if not _ERRORISH.search(text.lower()):
        before = " ".join(x.strip() for x in lines[max(0, start - 3):start] if x.strip())
        text = (before + " " + text).strip()
    return text[:1000]


def _best_error_lines(lines: list[str]) -> str:
    picked = [s.strip() for s in lines if s.strip() and _ERRORISH.search(s.lower())]
    return " ".join(picked[:4])[:1000]


# -- the whole message -----------------------------------------------------

_AUTO_SUBJECT = re.compile(
    r"out of (?:the )?office|auto(?:matic|matische)? ?(?:reply|response|answer|antwort|respuesta)|"
    r"autoreply|auto-reply|^auto:|vacation|abwesenheit|absence|away from|on leave|"
    r"automatyczna|r[ée]ponse automatique|risposta automatica|fuera de la oficina",
    re.IGNORECASE)
_CHALLENGE = re.compile(
    r"boxbe|sender not pre-?approved|please verify (?:your|that)|verify your (?:email|address|identity)|"
    r"challenge|spam ?arrest|mailblocks|bluebottle|confirm (?:that )?you are (?:a )?(?:human|real)|"
    r"added to (?:my|the) (?:approved|safe) (?:senders|list)|sender verification|awaiting your confirmation",
    0)


def parse(message: bytes) -> ParsedMessage:
    """Take a returned message apart (never raises on any input)."""
    text = to_text(message)
    headers, parts = walk(text)
    parsed = ParsedMessage(headers=headers, parts=parts)
    parsed.original_headers = _original_headers(parts, text)
    parsed.human_text = _human_text(parts)

    for part in parts:
        if part.ctype == "message/feedback-report" or (
                part.params.lower() == "feedback-report"):
            parsed.kind = "arf"
        if part.ctype == "message/feedback-report":
            fields, _ = parse_headers_all(part.body)
            for name, value in fields:
                parsed.feedback_fields.setdefault(name, []).append(value)
    if parsed.kind == "arf" or _looks_like_non_arf_complaint(parsed):
        parsed.kind = "arf"
        return parsed

    if _CHALLENGE.search(parsed.header("from").lower()) or _challenge_headers(headers):
        parsed.kind = "challenge"  # challenge-response systems dress up as DSNs too
        return parsed

    dsn_reports: list[RecipientReport] = []
    for part in parts:
        if part.ctype in ("message/delivery-status", "message/global-delivery-status") or (
                part.ctype.startswith("text/") and "Status:" in part.body and (
                    "Final-Recipient:" in part.body or "Original-Recipient:" in part.body
                    or "final-recipient:" in part.body.lower()[:20000])):
            dsn_reports.extend(parse_delivery_status(part.body))
    if dsn_reports:
        parsed.kind = "dsn"
        parsed.reports = _merge_human_text(_dedupe(dsn_reports), parsed.human_text)
        return parsed

    subject = parsed.header("subject")
    sender = parsed.header("from")
    human_lower = parsed.human_text[:16000].lower()
    failed = addresses(" ".join(headers.get("x-failed-recipients", [])))
    is_dsn_type = any(p.params.lower() == "delivery-status" for p in parts)
    bounce_like = bool(failed) or is_dsn_type or bool(_BOUNCE_SENDER.search(sender)) or bool(
        _BOUNCE_SUBJECT.search(subject)) or bool(
        parsed.original_headers and _STRONG_BODY.search(human_lower[:8000]))
    auto = _is_auto_reply(headers, subject)
    if not bounce_like or (auto and not failed and not _BOUNCE_SENDER.search(sender)):
        if auto:
            parsed.kind = "autoreply"
        elif _CHALLENGE.search(subject.lower()) or _CHALLENGE.search(sender.lower()) or _CHALLENGE.search(
                human_lower[:4000]):
            parsed.kind = "challenge" if bounce_like or _challenge_headers(headers) else "none"
        return parsed
    if _CHALLENGE.search(sender.lower()) or (_CHALLENGE.search(human_lower[:4000])
                                     and not _BOUNCE_BODY.search(human_lower[:8000])):
        parsed.kind = "challenge"
        return parsed
    if not failed and not _BOUNCE_BODY.search(human_lower[:16000]) and not _BOUNCE_SUBJECT.search(
            subject):
        return parsed
    exclude = set(addresses(" ".join(headers.get("to", []) + headers.get("from", [])
                                     + headers.get("return-path", []))))
    exclude.update(addresses(parsed.original("from")))
    exclude.update(addresses(parsed.original("return-path")))
    reports = parse_text_bounce(parsed.human_text, exclude, failed)
    if not reports:
        to = first_address(parsed.original("to"))
        if to and to not in exclude:
            reports = [RecipientReport(recipient=to, action="failed",
                                       text=_best_error_lines(parsed.human_text.split("\n")[:400]))]
            _fill_codes(reports[0])
    parsed.kind = "text"
    parsed.reports = reports
    return parsed


def _is_auto_reply(headers: dict[str, list[str]], subject: str) -> bool:
    auto_submitted = " ".join(headers.get("auto-submitted", [])).lower()
    if "auto-replied" in auto_submitted:
        return True
    if "x-autoreply" in headers or "x-autorespond" in headers or "x-autoreply-from" in headers:
        return True
    precedence = " ".join(headers.get("precedence", [])).lower()
    if "auto_reply" in precedence:
        return True
    return bool(_AUTO_SUBJECT.search(subject))


def _challenge_headers(headers: dict[str, list[str]]) -> bool:
    return "x-boxbe-challenge" in headers or any(h.startswith("x-challenge") for h in headers)


def _looks_like_non_arf_complaint(parsed: ParsedMessage) -> bool:
    """Hotmail/JMRP and other feedback loops that do not use message/feedback-report."""
    h = parsed.headers
    if "x-hmxmroriginalrecipient" in parsed.original_headers and (
            "x-hmxmroriginalrecipient" not in h):
        return True
    subject = parsed.header("subject").lower()
    return ("complaint" in subject or "abuse report" in subject or "feedback" in subject
            and "loop" in subject) and any(p.ctype == "message/rfc822" for p in parsed.parts) and (
        "delivery-status" not in " ".join(p.params.lower() for p in parsed.parts))


def _dedupe(reports: list[RecipientReport]) -> list[RecipientReport]:
    seen: dict[str, RecipientReport] = {}
    for r in reports:
        if r.recipient not in seen:
            seen[r.recipient] = r
    return list(seen.values())


def _merge_human_text(reports: list[RecipientReport], human: str) -> list[RecipientReport]:
    """A DSN without Diagnostic-Code: take the lines naming the recipient from the text."""
    lines = None
    for r in reports:
        if r.text:
            _fill_codes(r)
            continue
        if lines is None:
            lines = human.split("\n")[:3000]
        others = frozenset(x.recipient for x in reports if x is not r)
        for i, line in enumerate(lines):
            if r.recipient in line.lower():
                r.text = _context(lines, i, others)
                break
        else:
            r.text = _best_error_lines(lines)
        _fill_codes(r)
    for r in reports:
        if r.command or not human:
            continue
        if lines is None:
            lines = human.split("\n")[:3000]
        for i, line in enumerate(lines):
            if r.recipient in line.lower():
                r.command = smtp_command(_context(lines, i))
                break
        if not r.command:
            r.command = transcript_command(human)
    return reports


def transcript_command(human: str) -> str:
    """The command a session transcript shows answered by the first 4xx/5xx reply.

    Sendmail-style transcripts: `>>> DATA` then `<<< 550 ...`.
    """
    last = ""
    for line in human.split("\n", 400)[:400]:
        s = line.lstrip()
        if s.startswith(">>> "):
            last = s[4:].split(":", 1)[0].split(" ", 1)[0].upper()
        elif s.startswith(("<<< 5", "<<< 4")) and last:
            return "DATA" if last in ("DATA", ".") else last[:4]
    return ""


def _unquote(lines: list[str]) -> str:
    """A quoted copy without its `>` marks and the indent of its first line.

    Only that indent is removed from each line, so a folded header (a long
    X-Mailer-Info, say) keeps the white space that makes its next line a
    continuation.
    """
    lines = [line[1:] if line.startswith(">") else line for line in lines]
    first = next((line for line in lines if line.strip()), "")
    pad = " " * (len(first) - len(first.lstrip(" ")))
    return "\n".join(line[len(pad):] if line.startswith(pad) else line.lstrip(" ")
                     for line in lines)


def _original_headers(parts: list[Part], text: str) -> dict[str, list[str]]:
    """Headers of the returned original message, wherever the bounce put them."""
    for part in parts:
        if part.ctype in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers",
                          "message/global", "message/global-headers"):
            headers, _ = parse_headers(part.body.lstrip("\n"))
            if headers:
                return headers
    for part in parts:
        if not part.ctype.startswith("text/"):
            continue
        at = original_marker(part.body)
        if at < 0:
            continue
        nl = part.body.find("\n", at + 1)
        if nl < 0:
            continue
        rest = part.body[nl + 1:nl + 1 + 64 * 1024].lstrip("\n")
        rest = _unquote(rest.split("\n", 400)[:400])
        headers, _ = parse_headers(rest)
        if headers:
            return headers
    return {}
