"""Incoming mail through the real engine: smtpd's policy, queue-send's local branch, `local`.

SMTP and command-line injection to the engine's own mailboxes (greenarrow.conf
`incoming_email_domain`, a lite processor address) land in their Maildirs
under maildata/ with qmail-local's trace lines; other local parts of those
domains are refused with 550 while relaying stays as smtp.tcp says; a SimpleMH
message's encoded bounce address reaches the bounce mailbox; a Maildir that
cannot be written defers and the entry stays in the ram-queue (never the
disk-queue) until it can; hvmail_report counts the local channel; kill -9 of
the local agent with deliveries under way loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
from pathlib import Path

import pytest
from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.lib.core import users

DOMAIN = "bounces.example.com"
INCOMING = f"""
incoming_email_domain {DOMAIN} {{
    bounce_mailbox return
    spam_complaint_mailbox fbl
}}
lite_bounce_processor_address lite@{DOMAIN}
mail_class news {{
    listid t100
    bounce_address return@{DOMAIN}
}}
"""


def message(subject: str) -> bytes:
    return (f"From: someone@remote.test\r\nTo: x@{DOMAIN}\r\nSubject: {subject}\r\n\r\n"
            f"body of {subject}\r\n").encode()


def maildir(engine: Engine, local: str, domain: str = DOMAIN) -> Path:
    return engine.root.maildata / domain / local


def delivered(engine: Engine, local: str, domain: str = DOMAIN) -> list[bytes]:
    new = maildir(engine, local, domain) / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


def subjects(engine: Engine, local: str, domain: str = DOMAIN) -> list[str]:
    out = []
    for data in delivered(engine, local, domain):
        for line in data.split(b"\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return sorted(out)


def no_relay_for_loopback(engine: Engine) -> None:
    """Loopback is an ordinary client here: it may connect, not relay."""
    (engine.root.control / "smtp.tcp").write_text("127.0.0.1:allow\n:deny\n")


def test_incoming_mail_lands_in_its_maildir(tmp_path) -> None:
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}) + INCOMING)
        no_relay_for_loopback(engine)
        with engine:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                smtp.sendmail("a@remote.test", [f"return@{DOMAIN}"], message("to-return"))
                smtp.sendmail("", [f"FBL@{DOMAIN.upper()}"], message("to-fbl"))
                smtp.sendmail("a@remote.test", [f"postmaster@{DOMAIN}"], message("pm-full"))
                smtp.sendmail("a@remote.test", ["postmaster"], message("pm-bare"))
                smtp.sendmail("a@remote.test", [f"lite-anything@{DOMAIN}"], message("to-lite"))
                smtp.mail("a@remote.test")
                code, text = smtp.rcpt(f"other@{DOMAIN}")
                assert code == 550, text
                code, text = smtp.rcpt("someone@dest.test")  # no relay for this client
                assert code == 553, text
                code, text = smtp.rcpt(f"return-notencoded@{DOMAIN}")
                assert code == 550, text
                smtp.rset()
            # command-line injection to a local mailbox, and a SimpleMH message outward
            result = engine.sendmail("-f", "a@origin.test", f"fbl@{DOMAIN}",
                                     message=message("cli-fbl").replace(b"\r\n", b"\n"))
            assert result.returncode == 0, result.stderr
            result = engine.sendmail("-f", "news@origin.test", "ann@dest.test",
                                     message=message("news").replace(b"\r\n", b"\n"),
                                     env={"GREENARROW_MAILCLASS": "news"})
            assert result.returncode == 0, result.stderr
            wait_until(lambda: rx.messages, 60, "the SimpleMH message at the receiver")
            (sent,) = rx.messages
            assert sent.sender.lower().startswith("return-") and sent.sender.endswith(DOMAIN)
            # the receiver's bounce comes back to the encoded Return-Path
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                smtp.sendmail("", [sent.sender], message("async-bounce"))
            wait_until(lambda: len(delivered(engine, "return")) == 2
                       and len(delivered(engine, "fbl")) == 2
                       and len(delivered(engine, "postmaster")) == 2
                       and len(delivered(engine, "lite")) == 1, 60, "every local delivery")
            # the agent files a message before queue-send logs its result
            wait_until(lambda: sum(r["channel"] == "local" for r in engine.records()) >= 7, 30,
                       "the local deliveries' log lines")
            report = engine.program("hvmail_report", "-q", "all", "--json")
            records = engine.records()
            disk_entries = engine.queued("disk")
        assert subjects(engine, "return") == ["async-bounce", "to-return"]
        assert subjects(engine, "fbl") == ["cli-fbl", "to-fbl"]
        assert subjects(engine, "postmaster") == ["pm-bare", "pm-full"]
        assert subjects(engine, "lite") == ["to-lite"]
        (fbl,) = [d for d in delivered(engine, "fbl") if b"to-fbl" in d]
        assert fbl.startswith(b"Return-Path: <>\nDelivered-To: FBL@BOUNCES.EXAMPLE.COM\n")
        assert b"\r\n" not in fbl
        (bounce,) = [d for d in delivered(engine, "return") if b"async-bounce" in d]
        assert bounce.startswith(f"Return-Path: <>\nDelivered-To: {sent.sender}\n".encode())
        assert not disk_entries
        local = [r for r in records if r["channel"] == "local"]
        assert len(local) == 7 and all(r["status"] == "success" for r in local)
        assert all(r["mx_hostname"] == r["mx_ip"] == r["outmtaid_ip"] == "" for r in local)
        assert [r["email"] for r in records if r["channel"] == "remote"] == ["ann@dest.test"]
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["by_channel"] == {"local": 7, "remote": 1}


def test_unwritable_maildir_defers_in_the_ram_queue(tmp_path) -> None:
    engine = Engine(tmp_path, conf=INCOMING, controls={"queue.retry.scale": 0.002})
    no_relay_for_loopback(engine)
    blocker = maildir(engine, "return")
    blocker.parent.mkdir(parents=True)
    if users.separated():  # the local agent runs as the queue owner: its folder, as init makes it
        owner = users.account(users.QUEUE_USER)
        os.chown(blocker.parent, owner.uid, owner.gid)
    blocker.write_text("a file where the Maildir should be\n")
    with engine:
        with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
            smtp.sendmail("a@remote.test", [f"return@{DOMAIN}"], message("blocked"))
        wait_until(lambda: sum(r["status"] == "deferral" for r in engine.records()) >= 2,
                   60, "two deferred local attempts")
        assert engine.queued("disk") == []
        (entry,) = engine.queued("ram")
        assert int(entry.split(".")[1]) >= 2  # retried in place: the attempt count grows
        blocker.unlink()
        wait_until(lambda: delivered(engine, "return"), 60, "delivery once the Maildir can be made")
        wait_until(lambda: not engine.queued("ram"), 30, "the entry removed")
        records = engine.records()
        disk_records = engine.records("disk")
    assert subjects(engine, "return") == ["blocked"]
    deferrals = [r for r in records if r["status"] == "deferral"]
    assert all(r["channel"] == "local" and "cannot write to Maildir" in r["message"]
               for r in deferrals)
    assert records[-1]["status"] == "success" and records[-1]["is_retry"] == "1"
    assert disk_records == []


def test_kill_9_of_the_local_agent_loses_nothing(tmp_path) -> None:
    engine = Engine(tmp_path, conf=INCOMING)
    no_relay_for_loopback(engine)
    count = 30
    with engine:
        pid = engine.service_pid("local")
        os.kill(pid, signal.SIGSTOP)  # jobs reach it and wait unanswered: under way
        try:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                for i in range(count):
                    smtp.sendmail("a@remote.test", [f"return@{DOMAIN}"], message(f"m{i:02d}"))
            status = engine.root.var / "queue.ram.status"
            wait_until(lambda: status.exists()
                       and json.loads(status.read_text())["inflight"] > 0, 30,
                       "deliveries under way in the stopped agent")
        finally:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: engine.service_pid("local") != pid, 30, "the agent restarted")
        wait_until(lambda: not engine.queued("ram"), 60, "the ram-queue empty")
        assert engine.queued("disk") == []
    got = subjects(engine, "return")
    assert sorted(set(got)) == [f"m{i:02d}" for i in range(count)]  # each at least once


@pytest.mark.parametrize("bad", ["mailbox a/b", "mailbox x\n  bounce_mailbox X"])
def test_a_bad_incoming_conf_is_reported_by_check(tmp_path, bad) -> None:
    engine = Engine(tmp_path, conf=f"incoming_email_domain {DOMAIN} {{\n  {bad}\n}}\n")
    result = engine.program("greenarrow_config", "check")
    assert result.returncode != 0
    assert "greenarrow.conf:" in (result.stdout + result.stderr).decode()


def test_engine_bounce_of_simplemh_mail_reaches_the_bounce_mailbox(tmp_path) -> None:
    """A refused SimpleMH message bounces (bounce-queue) to its encoded Return-Path: local.

    (No events database here, so no processor reads the delivery log: the bounce
    message is mailed. With one, it is not: tests/test_feedback_e2e.py.)"""
    with Receiver("127.0.0.1", rcpt_reply="550 5.1.1 no such user") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}) + INCOMING)
        with engine:
            result = engine.sendmail("-f", "news@origin.test", "gone@dest.test",
                                     message=message("refused").replace(b"\r\n", b"\n"),
                                     env={"GREENARROW_MAILCLASS": "news"})
            assert result.returncode == 0, result.stderr
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                smtp.ehlo()
                smtp.mail("a@origin.test")  # loopback relays here: still no unknown local part
                code, text = smtp.rcpt(f"other@{DOMAIN}")
                assert code == 550, text
                smtp.rset()
            wait_until(lambda: delivered(engine, "return"), 60, "the bounce in the Maildir")
            wait_until(lambda: engine.records("bounce"), 30, "the bounce's log line")
            (sent,) = engine.records("ram")
            (bounce,) = engine.records("bounce")
            disk = engine.queued("disk")
    assert sent["status"] == "failure" and sent["channel"] == "remote"
    assert bounce["status"] == "success" and bounce["channel"] == "local"
    assert bounce["email"].lower().startswith("return-") and bounce["email"].endswith(DOMAIN)
    (data,) = delivered(engine, "return")
    assert data.startswith(f"Return-Path: <>\nDelivered-To: {bounce['email']}\n".encode())
    assert b"no such user" in data and b"Subject: refused" in data
    assert disk == []


def test_reload_adds_an_incoming_domain(tmp_path) -> None:
    engine = Engine(tmp_path)
    no_relay_for_loopback(engine)
    with engine:
        with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
            smtp.ehlo()
            smtp.mail("a@remote.test")
            code, text = smtp.rcpt(f"return@{DOMAIN}")
            assert code == 553, text  # not ours yet: a relay, refused
        (engine.root.control / "greenarrow.conf").write_text(INCOMING)
        result = engine.program("greenarrow_config", "reload")
        assert result.returncode == 0, result.stdout + result.stderr

        def accepted() -> bool:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                try:
                    smtp.sendmail("a@remote.test", [f"return@{DOMAIN}"], message("after"))
                except smtplib.SMTPRecipientsRefused:
                    return False
                return True

        wait_until(accepted, 30, "smtpd to take the new mailbox")
        wait_until(lambda: delivered(engine, "return"), 30, "the delivery")
    assert subjects(engine, "return") == ["after"]


def test_incoming_mail_is_filed_as_received(tmp_path) -> None:
    """No SimpleMH (even with a default Mail Class) and no X-GreenArrow-* processing."""
    conf = INCOMING + "general {\n    default_mail_class news\n}\n"
    engine = Engine(tmp_path, conf=conf)
    no_relay_for_loopback(engine)
    sent = (b"From: MAILER-DAEMON@remote.test\r\nTo: x@bounces.example.com\r\n"
            b"Subject: complaint\r\nX-GreenArrow-MailClass: news\r\n\r\n"
            b"see https://shop.example.com/p/1\r\n")
    with engine:
        with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
            smtp.sendmail("", [f"fbl@{DOMAIN}"], sent)
        wait_until(lambda: delivered(engine, "fbl"), 60, "the delivery")
        # the agent files the message before queue-send logs its result
        wait_until(lambda: engine.records(), 30, "the delivery's log line")
        (record,) = engine.records()
    (data,) = delivered(engine, "fbl")
    assert data.startswith(f"Return-Path: <>\nDelivered-To: fbl@{DOMAIN}\nReceived: from "
                           .encode())
    assert data.endswith(sent.replace(b"\r\n", b"\n"))  # the message as it came
    assert b"X-Mailer-Info" not in data and b"Message-ID" not in data
    assert record["mailclass"] == "" and record["sender"] == ""
