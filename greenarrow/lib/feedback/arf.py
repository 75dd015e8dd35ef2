"""Spam complaints: ARF reports (RFC 5965) and the common non-ARF feedback loops.

An ARF report is `multipart/report; report-type=feedback-report` with a
`message/feedback-report` part (Feedback-Type, User-Agent, Original-Mail-From,
Original-Rcpt-To, ...) and the original message (or its headers). Hotmail's
JMRP and some older loops send the original as a `message/rfc822` part with
no feedback part; bounce_parse marks those `arf` too.

Who complained: GreenArrow trusts the X-Mailer-Info of the original message
(SimpleMH writes it, signed with the secret constants) for recipient, ListID
and SendID; the report's own fields are the fallback (scomp_lite: the first
Original-Rcpt-To, else X-HmXmrOriginalRecipient of the original), then the
original's To.
"""

from __future__ import annotations

from dataclasses import dataclass

from greenarrow.lib.feedback.bounce_parse import ParsedMessage, first_address
from greenarrow.lib.simplemh import tracking_url


@dataclass
class Complaint:
    recipient: str
    feedback_type: str
    user_agent: str
    report_sender: str  # Original-Mail-From
    mailer_info: str  # the X-Mailer-Info DATA of the original, white space removed
    listid: str = ""
    sendid: str = ""
    mailclass: str = ""
    instanceid: str = ""
    click_tracking_id: str = ""
    verified: bool = False  # recipient/listid/sendid come from a verified X-Mailer-Info


def _first(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name)
    return values[0].strip() if values else ""


def mailer_info(parsed: ParsedMessage) -> str:
    """The X-Mailer-Info DATA of the returned original (folding white space dropped)."""
    return "".join(parsed.original("x-mailer-info").split())


def report_recipient(parsed: ParsedMessage) -> str:
    """The complainant as the report names it (no X-Mailer-Info)."""
    fields = parsed.feedback_fields
    for value in (_first(fields, "original-rcpt-to"),
                  parsed.original("x-hmxmroriginalrecipient"),
                  _first(fields, "removal-recipient"),
                  parsed.original("to")):
        address = first_address(value)
        if address:
            return address  # as the report gives it, even if the FBL redacted it
    return ""


def complaint(parsed: ParsedMessage, constants: tuple[str, str] | None = None) -> Complaint:
    """The complaint a parsed `arf` message reports.

    With the secret constants, a verified X-Mailer-Info gives recipient,
    ListID, SendID, Mail Class, InstanceID and click tracking id; a
    missing or failed one leaves those empty and the recipient from the report.
    """
    fields = parsed.feedback_fields
    feedback_type = _first(fields, "feedback-type").lower() or "abuse"
    result = Complaint(recipient=report_recipient(parsed), feedback_type=feedback_type,
                       user_agent=_first(fields, "user-agent"),
                       report_sender=first_address(_first(fields, "original-mail-from")),
                       mailer_info=mailer_info(parsed))
    if constants is not None and result.mailer_info:
        try:
            data = tracking_url.decode(result.mailer_info, constants,
                                       frozenset((tracking_url.MAILER_INFO,)))
        except tracking_url.TrackingDataError:
            return result
        result.recipient = data.recipient
        result.listid = data.listid
        result.sendid = data.sendid
        result.mailclass = data.mailclass
        result.instanceid = data.instanceid
        result.click_tracking_id = data.click_tracking_id
        result.verified = True
    return result
