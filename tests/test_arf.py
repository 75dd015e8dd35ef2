"""Spam complaints: ARF reports, Hotmail-style reports, X-Mailer-Info decoding."""

from __future__ import annotations

from greenarrow.lib.feedback.classify import SCOMP, classify_message
from greenarrow.lib.simplemh import tracking_url

CONSTANTS = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")

ARF = """\
From: feedback@fbl.example.net
To: fbl@sender.example
Subject: FW: News
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="P"

--P
Content-Type: text/plain

This is an email abuse report for an email message received from IP 192.0.2.5.

--P
Content-Type: message/feedback-report

Feedback-Type: {ftype}
User-Agent: SomeFBL/1.0
Version: 1
Original-Mail-From: <bounces@sender.example>
{rcpt_line}
--P
Content-Type: message/rfc822

Return-Path: <bounces@sender.example>
From: news@sender.example
To: {to}
Subject: News
X-Mailer-Info: {mailer_info}

Hello
--P--
"""


def arf(ftype="abuse", rcpt_line="Original-Rcpt-To: <complainer@dest.example>", to="whoever@dest.example",
        mailer_info="") -> bytes:
    return ARF.format(ftype=ftype, rcpt_line=rcpt_line, to=to, mailer_info=mailer_info).encode()


def test_arf_report_is_an_scomp_with_the_original_rcpt_to() -> None:
    c = classify_message(arf())
    assert c.is_bounce and c.kind == "arf"
    [r] = c.results
    assert (r.event, r.recipient, r.bounce_type, r.feedback_type) == (
        SCOMP, "complainer@dest.example", "o", "abuse")
    assert c.complaint.report_sender == "bounces@sender.example"
    assert c.complaint.user_agent == "SomeFBL/1.0"


def test_without_original_rcpt_to_the_original_to_is_used() -> None:
    [r] = classify_message(arf(rcpt_line="")).results
    assert r.recipient == "whoever@dest.example"


def test_opt_out_feedback_is_code_90() -> None:
    [r] = classify_message(arf(ftype="opt-out")).results
    assert (r.event, r.bounce_code) == (SCOMP, 90)


def test_verified_x_mailer_info_names_recipient_listid_and_sendid() -> None:
    data = tracking_url.encode(CONSTANTS, tracking_url.MAILER_INFO, "real@dest.example", "list7",
                               "send42", "default", "inst1", "ct9")
    folded = data[:30] + "\n " + data[30:]  # as SimpleMH folds it
    c = classify_message(arf(mailer_info=folded), constants=CONSTANTS)
    assert c.complaint.verified
    assert (c.complaint.recipient, c.complaint.listid, c.complaint.sendid) == (
        "real@dest.example", "list7", "send42")
    assert c.results[0].recipient == "real@dest.example"
    # other constants: not verified, the report's own recipient stays
    other = ("1" * 32, "2" * 32)
    c = classify_message(arf(mailer_info=folded), constants=other)
    assert not c.complaint.verified
    assert c.complaint.recipient == "complainer@dest.example" and c.complaint.listid == ""


def test_hotmail_style_report_without_feedback_part() -> None:
    msg = (b"From: staff@hotmail.com\nTo: fbl@sender.example\nSubject: complaint about message from 192.0.2.5\n"
           b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"H\"\n\n--H\n"
           b"Content-Type: text/plain\n\nThis is an email abuse report.\n--H\nContent-Type: message/rfc822\n\n"
           b"X-HmXmrOriginalRecipient: <hotuser@hotmail.com>\nFrom: news@sender.example\n"
           b"To: <hotuser@hotmail.com>\nSubject: News\n\nHello\n--H--\n")
    c = classify_message(msg)
    [r] = c.results
    assert (r.event, r.recipient) == (SCOMP, "hotuser@hotmail.com")
