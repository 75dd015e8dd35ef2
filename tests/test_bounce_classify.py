"""Bounce classification: rules files and overrides, fixed decisions, bounce_text, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from greenarrow.lib.feedback import bounce_codes
from greenarrow.lib.feedback.bounce_rules import LOCAL_RULES, RuleError, load_rules, parse_rules
from greenarrow.lib.feedback.classify import bounce_text, classify, classify_message, text_limit

DSN = """\
From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: bounces@sender.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; {rcpt}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; {diag}

--B
Content-Type: text/rfc822-headers

Return-Path: <bounces@sender.example>
From: news@sender.example
To: {rcpt}
X-Mailer-Info: abc
 def
Subject: News

--B--
"""


def dsn(rcpt="Someone@Dest.Example", action="failed", status="5.1.1",
        diag="550 5.1.1 <someone@dest.example>: Recipient address rejected: User unknown") -> bytes:
    return DSN.format(rcpt=rcpt, action=action, status=status, diag=diag).encode()


def test_user_unknown_dsn_is_hard_code_10_with_original_headers() -> None:
    c = classify_message(dsn())
    assert c.is_bounce and c.kind == "dsn"
    [r] = c.results
    assert (r.recipient, r.bounce_type, r.bounce_code, r.status) == (
        "someone@dest.example", "h", 10, "5.1.1")
    assert "User unknown" in r.text
    assert r.rule.startswith("bounce_rules.txt:")
    assert c.mailer_info == "abcdef"  # folding white space dropped
    assert c.return_path == "bounces@sender.example"


def test_crlf_and_cr_only_line_endings_give_the_same_result() -> None:
    lf = classify(dsn())
    assert classify(dsn().replace(b"\n", b"\r\n")) == lf
    assert classify(dsn().replace(b"\n", b"\r")) == lf


@pytest.mark.parametrize("diag,status,code,btype", [
    ("552 5.2.2 Mailbox full", "5.2.2", 22, "s"),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "5.7.1", 51, "o"),
    ("550 5.7.1 Message rejected as spam by Content Filtering", "5.7.1", 52, "o"),
    ("521 5.2.1 : (CON:B1) https://postmaster.aol.com/error-codes#554conb1", "5.2.1", 51, "o"),
    ("554 5.4.7 delivery time expired", "5.4.7", 24, "s"),
    ("550 5.1.2 Host or domain name not found", "5.1.2", 10, "h"),
])
def test_rules_give_code_and_type(diag: str, status: str, code: int, btype: str) -> None:
    [r] = classify(dsn(status=status, diag=diag))
    assert (r.bounce_code, r.bounce_type) == (code, btype)


def test_unknown_bounce_is_never_hard() -> None:
    [r] = classify(dsn(status="5.9.9", diag="599 the frobnicator declined"))
    assert r.bounce_type != "h"
    assert r.bounce_code == bounce_codes.GENERIC
    [r] = classify(dsn(status="", diag="the frobnicator declined"))
    assert r.bounce_type != "h"


def test_temporary_user_unknown_is_not_hard_unless_the_dsn_gave_up_on_4_1_1() -> None:
    [r] = classify(dsn(status="4.0.0", diag="450 <a@b.example>: User unknown"))
    assert r.bounce_type == "s"
    [r] = classify(dsn(status="4.1.1", diag="450 4.1.1 <a@b.example>: User unknown"))
    assert (r.bounce_code, r.bounce_type) == (10, "h")


def test_user_unknown_after_data_is_not_hard_unless_the_status_says_so() -> None:
    diag = "554 <a@b.example>: User unknown (in reply to end of DATA command)"
    [r] = classify(dsn(status="5.0.0", diag=diag))
    assert r.bounce_type == "s"
    [r] = classify(dsn(status="5.1.1", diag=diag))
    assert r.bounce_type == "h"


def test_delay_warning_is_other_70_and_delivered_gives_nothing() -> None:
    [r] = classify(dsn(action="delayed", status="4.4.1", diag="connection timed out"))
    assert (r.bounce_code, r.bounce_type) == (70, "o")
    c = classify_message(dsn(action="delivered", status="2.0.0", diag="250 ok"))
    assert c.results == [] and not c.is_bounce


def test_auto_reply_is_other_60_and_not_a_bounce() -> None:
    msg = (b"From: Someone <someone@dest.example>\nTo: news@sender.example\n"
           b"Subject: Out of Office: News\nAuto-Submitted: auto-replied\n\nI am away until Monday.\n")
    c = classify_message(msg)
    assert not c.is_bounce and c.kind == "autoreply"
    [r] = c.results
    assert (r.bounce_code, r.bounce_type) == (60, "o")


def test_challenge_response_is_other_100_and_not_a_bounce() -> None:
    msg = (b"From: noreply@boxbe.com\nTo: news@sender.example\nSubject: Re: News\n\n"
           b"Sender not pre-approved. Please verify that you are a person.\n")
    c = classify_message(msg)
    assert not c.is_bounce
    assert [r.bounce_code for r in c.results] == [100]


def test_ordinary_mail_is_not_a_bounce() -> None:
    c = classify_message(b"From: a@b.example\nTo: c@d.example\nSubject: lunch?\n\nAt noon?\n")
    assert not c.is_bounce and c.results == []


def test_non_standard_qmail_bounce() -> None:
    msg = (b"From: MAILER-DAEMON@mx.sender.example\nTo: bounces@sender.example\n"
           b"Subject: failure notice\n\nHi. This is the qmail-send program at mx.sender.example.\n"
           b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
           b"This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
           b"<gone@dest.example>:\n192.0.2.7 does not like recipient.\n"
           b"Remote host said: 550 5.1.1 <gone@dest.example>: no such user\n"
           b"Giving up on 192.0.2.7.\n\n--- Below this line is a copy of the message.\n\n"
           b"Return-Path: <bounces@sender.example>\nTo: gone@dest.example\nSubject: News\n\nHello\n")
    c = classify_message(msg)
    assert c.is_bounce
    [r] = c.results
    assert (r.recipient, r.bounce_code, r.bounce_type, r.status) == ("gone@dest.example", 10, "h", "5.1.1")
    assert c.return_path == "bounces@sender.example"


@pytest.mark.parametrize("marker", [
    "-----------------------------------------",  # no words: the quoted headers themselves
    "   -- The header and top 20 lines of the message follows --",
    "A summary of the undelivered message you sent follows:",
])
def test_addresses_of_quoted_header_fields_are_not_recipients(marker: str) -> None:
    """Message ids, list and relay addresses of a quoted original are not bounced recipients."""
    msg = (f"From: MAILER-DAEMON@mx.dest.example\nTo: news@sender.example\n"
           f"Subject: Undeliverable mail\n\nThis message was undeliverable. The following "
           f"address failed:\n\n  <gone@dest.example>: 550 unknown user\n\n{marker}\n"
           "Received: from mx.sender.example (mx.sender.example [192.0.2.1])\n"
           "\tby mx.dest.example with ESMTP id 42\n\tfor <other@dest.example>; Mon, 1 Jan 2024\n"
           "Message-ID: <1234.5678@mx.sender.example>\n"
           "References: <abc@list.example> <def@list.example>\n"
           "Sender: list-bounces@list.example\nList-Id: News <news.list.example>\n"
           "X-BeenThere: news@list.example\n"
           "To: gone@dest.example\nSubject: News\n\nHello\n").encode()
    c = classify_message(msg)
    assert [(r.recipient, r.bounce_type) for r in c.results] == [("gone@dest.example", "h")]


def test_rule_file_errors_name_file_and_line() -> None:
    with pytest.raises(RuleError, match=r"x.rules:2: unknown bounce code '77'"):
        parse_rules("# comment\n77 text foo\n", "x.rules")
    with pytest.raises(RuleError, match=r"x.rules:1: bounce type 'q'"):
        parse_rules("10/q text foo\n", "x.rules")
    with pytest.raises(RuleError, match=r"x.rules:1: WHERE must be one of"):
        parse_rules("10 body foo\n", "x.rules")
    with pytest.raises(RuleError, match=r"x.rules:1: bad regular expression"):
        parse_rules("10 text (unclosed\n", "x.rules")
    with pytest.raises(RuleError, match=r"x.rules:1: expected CODE"):
        parse_rules("10 text\n", "x.rules")


def test_status_glob_and_reply_rules() -> None:
    rules = parse_rules("25 status 5.7.*\n22 reply 55*\n", "t")
    assert rules[0].matches("5.7.26") and not rules[0].matches("5.1.1")
    assert rules[1].matches("552") and not rules[1].matches("452")


def test_local_override_is_read_first_and_wins(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / LOCAL_RULES).write_text("# we know better\n50/o text user unknown\n")
    rules = load_rules(tmp_path)
    [r] = classify(dsn(), rules)
    assert (r.bounce_code, r.bounce_type) == (50, "o")
    assert r.rule == f"{tmp_path / LOCAL_RULES}:2"
    # no local file: shipped rules only
    assert load_rules(tmp_path / "nowhere") == load_rules(None)


def test_bounce_text_is_the_raw_body_cut_to_1024_utf8_bytes() -> None:
    body = "Zustellung fehlgeschlagen =C3=A4 " + "\u00e4" * 2000
    msg = b"Subject: x\r\nFrom: y\r\n\r\n" + body.encode() + b"\xff"
    text = bounce_text(msg)
    assert text.startswith("Zustellung fehlgeschlagen =C3=A4 ")  # no QP decoding
    assert len(text.encode("utf-8")) <= 1024
    assert len(text.encode("utf-8")) >= 1022  # cut inside a character: dropped, not mangled
    assert bounce_text(b"Subject: x\n\nbad \xff byte") == "bad \ufffd byte"
    assert bounce_text(b"Subject: x\r\rCR only") == "CR only"
    assert text_limit("abc", 2) == "ab"


def run_cli(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HVMAIL_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "greenarrow.bin.greenarrow", "bounce", "classify", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_prints_one_json_line_per_file(tmp_path: Path) -> None:
    one = tmp_path / "one.eml"
    one.write_bytes(dsn())
    two = tmp_path / "two.eml"
    two.write_bytes(b"From: a@b.example\nSubject: hi\n\nhello\n")
    done = run_cli([str(one), str(two)], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["file"] == str(one) and lines[0]["is_bounce"] is True
    assert lines[0]["results"][0]["recipient"] == "someone@dest.example"
    assert lines[0]["results"][0]["bounce_type"] == "h"
    assert lines[0]["results"][0]["bounce_code"] == 10
    assert lines[0]["results"][0]["status"] == "5.1.1"
    assert lines[1] == {"file": str(two), "is_bounce": False, "results": []}


def test_cli_uses_the_local_override_and_reports_bad_rules(tmp_path: Path) -> None:
    one = tmp_path / "one.eml"
    one.write_bytes(dsn())
    (tmp_path / "control").mkdir()
    (tmp_path / LOCAL_RULES).write_text("20/s text user unknown\n")
    done = run_cli([str(one)], tmp_path)
    assert json.loads(done.stdout)["results"][0]["bounce_code"] == 20
    done = run_cli(["--no-local", str(one)], tmp_path)
    assert json.loads(done.stdout)["results"][0]["bounce_code"] == 10
    (tmp_path / LOCAL_RULES).write_text("20/s text (broken\n")
    done = run_cli([str(one)], tmp_path)
    assert done.returncode == 1
    assert "bounce_rules.local:1: bad regular expression" in done.stderr


def test_cli_names_a_missing_file_and_exits_1(tmp_path: Path) -> None:
    done = run_cli([str(tmp_path / "nope.eml")], tmp_path)
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]
