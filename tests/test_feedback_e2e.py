"""Bounces and complaints end to end: real SMTP on loopback to an HTTP event destination.

One engine (`hvmail_init`, a throwaway PostgreSQL, the event processor
posting to tests/event_receiver.py) sends SimpleMH mail in a Mail Class
whose bounce address is on one of its own incoming email domains:

- to a receiver that answers RCPT with 550 5.1.1: a synchronous
  `bounce_all` (from the delivery log) and, as the first hard bounce of the
  address, a `bounce_bad_address`; no bounce message is queued or mailed;
- to a receiver that accepts, then a DSN (mailbox full) mailed over SMTP
  to the message's encoded Return-Path, twice: two asynchronous
  `bounce_all`, and at the second soft bounce (bounce_processor.conf says 2)
  a `bounce_bad_address` with the most recent bounce's SendID;
- an ARF report quoting a delivered message, mailed to the spam-complaint
  mailbox: an `scomp` with the message's recipient, ListID and SendID.

The fields of each event are checked against seed 003's lists. A
synchronous bounce whose processor is stopped, then killed, when the failure
happens is recorded once after its restart (the log line is its only record).
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import time

import pg
from engine import Engine, route_conf, wait_until
from event_receiver import Receiver as EventReceiver
from smtp_receivers import Receiver

pg_conninfo = pg.pg_conninfo

DOMAIN = "bounces.example.com"
LISTID = "t100"

# Seed 003, field by field, in its order.
SEED_FIELDS = {
    "bounce_all": ["event_type", "event_time", "server_id", "event_unique_id", "email", "listid",
                   "sendid", "bounce_type", "bounce_code", "bounce_text", "click_tracking_id",
                   "synchronous", "mailclass", "instanceid"],
    "bounce_bad_address": ["event_type", "event_time", "server_id", "event_unique_id", "email",
                           "listid", "sendid", "bounce_type", "bounce_code", "bounce_text",
                           "click_tracking_id", "mailclass", "instanceid"],
    "scomp": ["event_type", "event_time", "server_id", "event_unique_id", "email", "listid",
              "sendid", "click_tracking_id", "mailclass", "instanceid"],
}


def conf(url: str, routes: dict[str, int]) -> str:
    return route_conf(routes) + f"""
general {{
    server_id e2e
}}
incoming_email_domain {DOMAIN} {{
    bounce_mailbox return
    spam_complaint_mailbox fbl
}}
mail_class news {{
    listid {LISTID}
    bounce_address return@{DOMAIN}
}}
event_delivery_destination app {{
    event_delivery_url "{url}"
    event_delivery_events bounce_all bounce_bad_address scomp
}}
"""


def simplemh(to: str, instance: str) -> bytes:
    return (f"From: Shop <news@origin.test>\r\nTo: {to}\r\nSubject: offer {instance}\r\n"
            f"X-GreenArrow-MailClass: news\r\nX-GreenArrow-InstanceID: {instance}\r\n"
            f"X-GreenArrow-Click-Tracking-ID: ct-{instance}\r\n\r\nhello\r\n").encode()


def dsn(recipient: str, original: bytes) -> bytes:
    """A receiving MTA's later DSN: mailbox full, with the original's headers."""
    headers = original.split(b"\r\n\r\n", 1)[0].decode()
    return (
        "From: MAILER-DAEMON@mx.dest.test\r\nTo: <>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n"
        f"\r\nFinal-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.2.2\r\n"
        f"Diagnostic-Code: smtp; 552 5.2.2 <{recipient}>: mailbox full\r\n\r\n"
        f"--B\r\nContent-Type: text/rfc822-headers\r\n\r\n{headers}\r\n\r\n--B--\r\n"
    ).encode()


def arf(recipient: str, original: bytes) -> bytes:
    """An RFC 5965 abuse report quoting the delivered message whole."""
    return (
        b"From: fbl@isp.test\r\nTo: fbl@" + DOMAIN.encode() + b"\r\nSubject: complaint\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="Z"\r\n\r\n'
        b"--Z\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n"
        b"--Z\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
        b"User-Agent: isp-fbl/1.0\r\nVersion: 1\r\n"
        b"Original-Rcpt-To: <" + recipient.encode() + b">\r\n\r\n"
        b"--Z\r\nContent-Type: message/rfc822\r\n\r\n" + original + b"\r\n--Z--\r\n"
    )


def posted(http: EventReceiver, event_type: str) -> list[dict]:
    with http.lock:
        return [e for batch in http.batches for e in batch if e["event_type"] == event_type]


def check_fields(event: dict) -> None:
    assert list(event) == SEED_FIELDS[event["event_type"]], event
    assert isinstance(event["event_time"], int) and event["server_id"] == "e2e"
    assert len(event["event_unique_id"]) == 64


def test_bounces_and_complaints_reach_the_http_destination(tmp_path, pg_conninfo) -> None:
    with Receiver("127.0.0.1", rcpt_reply="550 5.1.1 <gone@gone.test>: no such user") as refuse, \
            Receiver("127.0.0.1") as accept, EventReceiver() as http:
        engine = Engine(tmp_path, conf=conf(http.url, {"gone.test": refuse.port,
                                                       "dest.test": accept.port}),
                        database=pg.database_url(pg_conninfo))
        (engine.root.control / "bounce_processor.conf").write_text(json.dumps(
            {"default": {"soft": {"count": 2, "days": 0}}}))
        with engine:
            started = int(time.time())

            def send(to: str, instance: str) -> None:
                with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                    smtp.sendmail("news@origin.test", [to], simplemh(to, instance))

            # 1. refused at RCPT: a synchronous bounce, the first hard one
            send("gone@gone.test", "2001")
            wait_until(lambda: posted(http, "bounce_bad_address"), 120,
                       "the synchronous bounce's events at the destination")
            ram = engine.records("ram")
            # 2. accepted, then bounced twice by mail to the encoded Return-Path
            for n, instance in enumerate(("2002", "2003"), start=1):
                send("ann@dest.test", instance)
                wait_until(lambda n=n: len(accept.messages) == n, 60, "the message delivered")
                sent = accept.messages[-1]
                with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                    smtp.sendmail("", [sent.sender], dsn("ann@dest.test", sent.content))
                wait_until(lambda n=n: len([e for e in posted(http, "bounce_all")
                                            if not e["synchronous"]]) == n, 120,
                           f"asynchronous bounce {n} at the destination")
            wait_until(lambda: len(posted(http, "bounce_bad_address")) == 2, 60,
                       "the soft bounce_bad_address")
            # 3. a complaint about a delivered message
            send("carol@dest.test", "2004")
            wait_until(lambda: len(accept.messages) == 3, 60, "the third message delivered")
            original = accept.messages[-1].content
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                smtp.sendmail("fbl@isp.test", [f"fbl@{DOMAIN}"], arf("carol@dest.test", original))
            wait_until(lambda: posted(http, "scomp"), 120, "the scomp at the destination")
            time.sleep(2)  # room for a stray extra event or bounce message to show up
            bounce_queue = engine.records("bounce")
            maildir = engine.root.maildata / DOMAIN / "return"
            left = sorted(p.name for p in maildir.rglob("*") if p.is_file())

    bounces = posted(http, "bounce_all")
    bad = posted(http, "bounce_bad_address")
    scomps = posted(http, "scomp")
    for event in bounces + bad + scomps:
        check_fields(event)
        assert event["event_time"] >= started - 1
    assert len(bounces) == 3 and len(bad) == 2 and len(scomps) == 1
    assert len(http.unique_ids()) == 6  # each event once

    sync, *async_ = bounces
    (failure,) = [r for r in ram if r["status"] == "failure"]
    assert sync["synchronous"] is True
    assert (sync["email"], sync["listid"], sync["sendid"]) == ("gone@gone.test", LISTID, "news-2001")
    assert (sync["mailclass"], sync["instanceid"], sync["click_tracking_id"]) == (
        "news", "2001", "ct-2001")
    assert (sync["bounce_type"], sync["bounce_code"]) == ("h", 10)
    assert sync["bounce_text"] == failure["message"] and "no such user" in sync["bounce_text"]
    hard = bad[0]
    assert (hard["email"], hard["listid"], hard["sendid"], hard["bounce_type"],
            hard["bounce_code"], hard["bounce_text"]) == (
        "gone@gone.test", LISTID, "news-2001", "h", 10, sync["bounce_text"])
    # the failure was recorded from the delivery log: no bounce message made or delivered
    assert bounce_queue == [] and left == []

    for event, instance in zip(async_, ("2002", "2003"), strict=True):
        assert event["synchronous"] is False
        assert (event["email"], event["listid"], event["sendid"], event["mailclass"],
                event["instanceid"], event["click_tracking_id"]) == (
            "ann@dest.test", LISTID, f"news-{instance}", "news", instance, f"ct-{instance}")
        assert (event["bounce_type"], event["bounce_code"]) == ("s", 22)
        assert "mailbox full" in event["bounce_text"]
        assert len(event["bounce_text"].encode()) <= 1024
    soft = bad[1]
    assert (soft["email"], soft["listid"], soft["bounce_type"], soft["bounce_code"]) == (
        "ann@dest.test", LISTID, "s", 22)
    # the fields of the most recent bounce of the run
    assert (soft["sendid"], soft["instanceid"], soft["bounce_text"]) == (
        "news-2003", "2003", async_[1]["bounce_text"])

    (scomp,) = scomps
    assert (scomp["email"], scomp["listid"], scomp["sendid"], scomp["mailclass"],
            scomp["instanceid"], scomp["click_tracking_id"]) == (
        "carol@dest.test", LISTID, "news-2004", "news", "2004", "ct-2004")


def test_a_synchronous_bounce_waits_in_the_log_while_the_processor_is_down(
        tmp_path, pg_conninfo) -> None:
    """No bounce message is mailed, so the log line is the only record: a processor that is
    stopped when the failure happens, then killed, records it once after its restart."""
    with Receiver("127.0.0.1", rcpt_reply="550 5.1.1 no such user") as refuse, \
            EventReceiver() as http:
        engine = Engine(tmp_path, conf=conf(http.url, {"gone.test": refuse.port}),
                        database=pg.database_url(pg_conninfo))
        with engine:
            pid = engine.service_pid("bounce-processor")
            os.kill(pid, signal.SIGSTOP)
            try:
                with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                    smtp.sendmail("news@origin.test", ["gone@gone.test"],
                                  simplemh("gone@gone.test", "3001"))
                wait_until(lambda: any(r["status"] == "failure" for r in engine.records("ram")),
                           60, "the failure logged")
                wait_until(lambda: not engine.queued("ram"), 30, "the failed entry removed")
            finally:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: engine.service_pid("bounce-processor") != pid, 30,
                       "the processor restarted")
            wait_until(lambda: posted(http, "bounce_bad_address"), 120,
                       "the events after the restart")
            time.sleep(2)  # room for a duplicate to show up
            bounce_queue = engine.records("bounce")
    (bounce,) = posted(http, "bounce_all")
    assert bounce["synchronous"] is True and bounce["email"] == "gone@gone.test"
    assert bounce["sendid"] == "news-3001"
    assert len(posted(http, "bounce_bad_address")) == 1
    assert bounce_queue == []
