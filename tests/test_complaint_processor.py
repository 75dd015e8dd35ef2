"""Spam complaints and the lite processors against a real PostgreSQL and real Maildirs."""

from __future__ import annotations

from pathlib import Path

import pg
import psycopg
from test_bounce_processor import (
    DOMAIN,
    cnp_files,
    constants,
    delivered,
    dsn,
    events,
    maildir,
    make_root,
    new_files,
    processor,
    run_passes,
)

from greenarrow.lib.events.types import FIELDS
from greenarrow.lib.simplemh import return_path as bounce_address
from greenarrow.lib.simplemh import tracking_url

pg_conninfo = pg.pg_conninfo
CORPUS = Path("/work/shared/corpus")


def arf(original: str, feedback: str = "Feedback-Type: abuse\nUser-Agent: FBL/1.0\n"
        "Version: 1\nOriginal-Mail-From: <bounce-x@sender.test>\n"
        "Original-Rcpt-To: <rcpt@example.com>\n") -> bytes:
    return (
        "From: fbl@isp.test\nTo: fbl@bounces.test\nSubject: complaint\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="Z"\n\n'
        "--Z\nContent-Type: text/plain\n\nThis is an abuse report.\n\n"
        f"--Z\nContent-Type: message/feedback-report\n\n{feedback}\n"
        f"--Z\nContent-Type: message/rfc822\n\n{original}\nspam spam\n--Z--\n").encode()


def test_arf_with_mailer_info_is_an_scomp(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    info = tracking_url.encode(c, tracking_url.MAILER_INFO, "rcpt@example.com", "news42",
                               "send7", "weekly", "inst9", "click77")
    maildir(root, "fbl").deliver(delivered(
        f"fbl@{DOMAIN}", arf(f"X-Mailer-Info: {info}\nTo: rcpt@example.com\nSubject: hi\n")))
    run_passes(processor(root))
    found = events(pg_conninfo)
    assert [e["event_type"] for e in found] == ["scomp"]
    scomp = found[0]
    assert list(scomp) == list(FIELDS["scomp"])
    assert (scomp["email"], scomp["listid"], scomp["sendid"]) == (
        "rcpt@example.com", "news42", "send7")
    assert (scomp["mailclass"], scomp["instanceid"], scomp["click_tracking_id"]) == (
        "weekly", "inst9", "click77")
    with psycopg.connect(pg_conninfo) as conn:
        assert conn.execute("SELECT email, listid, reason FROM suppressed_addresses"
                            ).fetchall() == [("rcpt@example.com", "news42", "scomp")]
    assert new_files(root, "fbl") == []


def test_non_arf_complaint_with_encoded_return_path(tmp_path, pg_conninfo):
    """Hotmail-style: the original as message/rfc822, no feedback part."""
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    rp = bounce_address.encode(f"return@{DOMAIN}", "news42", "send7", "joe@hotmail.test", c)
    message = (
        "From: staff@hotmail.test\nTo: fbl@bounces.test\nSubject: complaint\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="Y"\n\n--Y\nContent-Type: message/rfc822\n\n'
        f"Return-Path: <{rp}>\nX-HmXmrOriginalRecipient: <joe@hotmail.test>\n"
        "To: joe@hotmail.test\nSubject: hi\n\nbody\n--Y--\n").encode()
    maildir(root, "fbl").deliver(delivered(f"fbl@{DOMAIN}", message))
    run_passes(processor(root))
    found = events(pg_conninfo, "scomp")
    assert [(e["email"], e["listid"]) for e in found] == [("joe@hotmail.test", "news42")]


def test_unprocessable_complaints_go_to_could_not_process(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    box = maildir(root, "fbl")
    box.deliver(arf("To: rcpt@example.com\nSubject: never sent by us\n"))  # no X-Mailer-Info
    forged = tracking_url.encode(("a" * 32, "b" * 32), tracking_url.MAILER_INFO,
                                 "rcpt@example.com", "news42", "send7")
    box.deliver(arf(f"X-Mailer-Info: {forged}\nTo: rcpt@example.com\n"))
    box.deliver(b"\xff\xfe\x00garbage" * 1000)
    box.deliver(b"Content-Type: multipart/report; boundary=\"never closed\n\n--never")
    box.deliver(dsn("bob@example.com"))  # a bounce at the complaint mailbox
    box.deliver(b"")
    for path in sorted((CORPUS / "email-arf-perl" / "t" / "messages").glob("*.msg")):
        box.deliver(path.read_bytes())
    expected = len(new_files(root, "fbl"))
    run_passes(processor(root))
    assert events(pg_conninfo) == []
    assert new_files(root, "fbl") == []
    assert len(cnp_files(root, "fbl")) == expected


def test_scomp_lite_fields(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    report = arf("X-Campaign: spring\nX-Campaign: second\nMessage-ID: <m1@sender.test>\n"
                 "To: rcpt@example.com\nSubject: hi\n")
    maildir(root, "litefbl").deliver(delivered(f"litefbl@{DOMAIN}", report))
    run_passes(processor(root))
    found = events(pg_conninfo)
    assert [e["event_type"] for e in found] == ["scomp_lite"]
    lite = found[0]
    assert list(lite) == list(FIELDS["scomp_lite"])
    assert lite["email"] == "rcpt@example.com"
    assert lite["user_agent"] == "FBL/1.0"
    assert lite["report_sender"] == "bounce-x@sender.test"
    assert lite["report_recipient"] == f"litefbl@{DOMAIN}"
    assert lite["headers"] == {"X-Campaign": ["spring", "second"],
                               "Message-ID": ["<m1@sender.test>"]}
    assert lite["report_message_text"] == delivered(f"litefbl@{DOMAIN}", report).decode()


def test_bounce_lite_fields(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    envelope = f"lite-campaign7-user42@{DOMAIN}"
    message = delivered(envelope, dsn("someone@example.com",
                                      diagnostic="550 5.1.1 Mailbox User Unknown here"))
    maildir(root, "lite").deliver(message)
    run_passes(processor(root))
    found = events(pg_conninfo)
    assert [e["event_type"] for e in found] == ["bounce_lite"]
    lite = found[0]
    assert list(lite) == list(FIELDS["bounce_lite"])
    assert lite["bounce_code"] == 10
    assert "Mailbox User Unknown here" in lite["bounce_code_match_text"]  # as written
    assert lite["synchronous"] is False
    assert lite["report_recipient"] == envelope
    assert lite["report_message_text"] == message.decode()
    assert lite["id"] is None  # the events table's id, set when delivered


def test_lite_report_text_can_be_turned_off(tmp_path, pg_conninfo):
    from test_bounce_processor import CONF

    root = make_root(tmp_path, pg_conninfo,
                     CONF + "lite_bounce_processor_include_report_text no\n")
    maildir(root, "lite").deliver(delivered(f"lite@{DOMAIN}", dsn("someone@example.com")))
    run_passes(processor(root))
    assert events(pg_conninfo, "bounce_lite")[0]["report_message_text"] is None


def test_corpus_bounces_never_stick_the_mailbox(tmp_path, pg_conninfo):
    """Real third-party bounces (no encoded address): each is refused with a reason."""
    root = make_root(tmp_path, pg_conninfo)
    box = maildir(root, "return")
    paths = sorted((CORPUS / "sisimai" / "maildir" / "bsd").glob("*"))[:40]
    for path in paths:
        box.deliver(path.read_bytes())
    run_passes(processor(root))
    assert new_files(root, "return") == []
    assert len(cnp_files(root, "return")) == len(paths)


def test_types_not_recorded_are_not_inserted(tmp_path, pg_conninfo):
    conf = f"""general {{
  server_id test-server
  record_events bounce_bad_address
}}
incoming_email_domain {DOMAIN} {{
  bounce_mailbox return
}}
"""
    root = make_root(tmp_path, pg_conninfo, conf)
    address = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "bob@example.com",
                                    constants(root))
    maildir(root, "return").deliver(delivered(address, dsn("bob@example.com")))
    run_passes(processor(root))
    assert [e["event_type"] for e in events(pg_conninfo)] == ["bounce_bad_address"]
