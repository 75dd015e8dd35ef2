"""Classify a returned message: one `BounceResult` per bounced recipient.

`classify_message(message)` is what the bounce processor calls; `classify`
is the same returning only the results. Codes and types come from the rules
(bounce_rules) over the parse (bounce_parse); complaints from arf.

Fixed decisions that are not rules (docs/bounces.md says why):
- a DSN `Action: delayed` is a delay warning: 70 transient, other;
- an auto-reply is 60, a challenge-response 100, both other, and neither is
  `is_bounce` (they report no delivery failure);
- an ARF report gives one `scomp` result (code 90 for Feedback-Type opt-out);
- a bounce no rule matches gets a generic code by status class, never hard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from greenarrow.lib.feedback import arf, bounce_codes
from greenarrow.lib.feedback.bounce_parse import (
    RecipientReport,
    first_address,
    parse,
)
from greenarrow.lib.feedback.bounce_rules import Rule, load_rules

# Temporary statuses that still say the address is bad (RFC 3463 X.1.1, X.1.2).
FINAL_ADDRESS_STATUSES = ("4.1.1", "4.1.2")
BOUNCE = "bounce"
SCOMP = "scomp"
MAX_TEXT = 1024


@dataclass
class BounceResult:
    recipient: str
    bounce_type: str
    bounce_code: int
    status: str = ""
    text: str = ""
    event: str = BOUNCE  # bounce or scomp
    reply_code: str = ""
    action: str = ""
    rule: str = ""  # file:line of the rule that matched ("" for a fixed decision)
    match_text: str = ""  # bounce_code_match_text: the line(s) the rule matched
    feedback_type: str = ""

    def as_json(self) -> dict:
        out = {"recipient": self.recipient, "bounce_type": self.bounce_type,
               "bounce_code": self.bounce_code, "status": self.status, "text": self.text}
        if self.event != BOUNCE:
            out["event"] = self.event
        if self.feedback_type:
            out["feedback_type"] = self.feedback_type
        if self.rule:
            out["rule"] = self.rule
        return out


@dataclass
class Classification:
    is_bounce: bool
    kind: str  # dsn, text, arf, autoreply, challenge, none
    results: list[BounceResult] = field(default_factory=list)
    mailer_info: str = ""  # X-Mailer-Info DATA of the returned original
    return_path: str = ""  # Return-Path of the returned original
    original_message_id: str = ""
    complaint: arf.Complaint | None = None


_DEFAULT_RULES: list[Rule] | None = None


def default_rules() -> list[Rule]:
    global _DEFAULT_RULES
    if _DEFAULT_RULES is None:
        _DEFAULT_RULES = load_rules(None)
    return _DEFAULT_RULES


def classify_message(message: bytes, rules: list[Rule] | None = None,
                     constants: tuple[str, str] | None = None) -> Classification:
    parsed = parse(message)
    rules = default_rules() if rules is None else rules
    out = Classification(is_bounce=parsed.kind in ("dsn", "text", "arf"), kind=parsed.kind,
                         mailer_info=arf.mailer_info(parsed),
                         return_path=first_address(parsed.original("return-path")),
                         original_message_id=parsed.original("message-id"))
    if parsed.kind == "arf":
        c = arf.complaint(parsed, constants)
        out.complaint = c
        code = bounce_codes.UNSUBSCRIBE if c.feedback_type == "opt-out" else None
        out.results.append(BounceResult(
            recipient=c.recipient, bounce_type=bounce_codes.OTHER,
            bounce_code=code if code is not None else bounce_codes.NOT_A_BOUNCE, event=SCOMP,
            feedback_type=c.feedback_type, text=_first_line(parsed.human_text)))
        return out
    if parsed.kind in ("autoreply", "challenge"):
        code = bounce_codes.AUTO_REPLY if parsed.kind == "autoreply" else bounce_codes.CHALLENGE_RESPONSE
        recipient = first_address(parsed.header("from"))
        out.results.append(BounceResult(recipient=recipient, bounce_type=bounce_codes.OTHER,
                                        bounce_code=code, text=_clip(parsed.header("subject"))))
        return out
    subject = parsed.header("subject")
    for report in parsed.reports:
        if report.action in ("delivered", "relayed", "expanded"):
            continue
        out.results.append(classify_report(report, rules, subject))
    if parsed.kind in ("dsn", "text") and not out.results and parsed.reports:
        out.is_bounce = False  # a success notice
    return out


def classify(message: bytes, rules: list[Rule] | None = None) -> list[BounceResult]:
    return classify_message(message, rules).results


def classify_report(report: RecipientReport, rules: list[Rule], subject: str = "") -> BounceResult:
    result = BounceResult(recipient=report.recipient, bounce_type=bounce_codes.SOFT,
                          bounce_code=bounce_codes.GENERIC, status=report.status,
                          text=_clip(report.text), reply_code=report.reply_code, action=report.action)
    if report.action == "delayed":
        result.bounce_code = bounce_codes.TRANSIENT
        result.bounce_type = bounce_codes.code_type(bounce_codes.TRANSIENT)
        return result
    values = {"text": report.text.lower(), "status": report.status, "reply": report.reply_code,
              "subject": subject}
    for rule in rules:
        value = values[rule.where]
        if not value:
            continue
        m = rule.matches(value)
        if m is None:
            continue
        result.bounce_code = rule.code
        result.bounce_type = rule.type
        result.rule = rule.source
        result.match_text = _line_around(value, m.start(), m.end())
        return _not_hard_unless_permanent(result, report, rule.explicit_type)
    status_class = (report.status or report.reply_code)[:1]
    code = {"5": bounce_codes.GENERIC, "4": bounce_codes.GENERIC_SOFT}.get(
        status_class, bounce_codes.UNDETERMINED)
    result.bounce_code = code
    result.bounce_type = bounce_codes.code_type(code)
    return result


def _not_hard_unless_permanent(result: BounceResult, report: RecipientReport,
                               explicit: bool) -> BounceResult:
    """A hard result needs a permanent failure at the recipient stage.

    A 4xx says "try again" (but a DSN that failed for good on 4.1.1 or 4.1.2,
    "no such mailbox / domain" every time the MTA retried, is hard), and a rejection after DATA came after the server
    accepted the recipient at RCPT TO (often a content filter saying
    "unknown"), unless the status code itself is an address status (5.1.x:
    pipelined sessions answer RCPT after DATA was sent) or the rule says `/h`
    itself (a provider known to refuse unknown users at DATA).
    """
    if result.bounce_type != bounce_codes.HARD:
        return result
    permanent_class = (result.status or result.reply_code)[:1] != "4" or (
        result.status in FINAL_ADDRESS_STATUSES and report.action == "failed")
    address_status = result.status.startswith("5.1.")
    if permanent_class and (report.command != "DATA" or explicit or address_status):
        return result
    result.bounce_code = bounce_codes.GENERIC_SOFT
    result.bounce_type = bounce_codes.code_type(bounce_codes.GENERIC_SOFT)
    return result


def _line_around(value: str, start: int, end: int) -> str:
    left = value.rfind("\n", 0, start) + 1
    right = value.find("\n", end)
    return value[left:right if right >= 0 else len(value)]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text[:MAX_TEXT]


def _first_line(text: str) -> str:
    for line in text.split("\n", 50):
        if line.strip():
            return _clip(line)
    return ""


def bounce_text(message: bytes, limit: int = 1024) -> str:
    """bounce_text of an asynchronous bounce (GreenArrow's "Bounce Text Format"; docs/bounces.md).

    The raw body of the bounce as received (no MIME or quoted-printable
    decoding), bytes that are not valid UTF-8 turned into U+FFFD, cut to
    `limit` bytes (never inside a character).
    """
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n"), message.find(b"\r\r"))
            if i >= 0]
    if not ends:
        body = b""
    else:
        at = min(ends)
        sep = 4 if message.startswith(b"\r\n\r\n", at) else 2
        body = message[at + sep:]
    return text_limit(body[:limit * 4].decode("utf-8", "replace"), limit)


def text_limit(text: str, limit: int = 1024) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, never inside a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")
