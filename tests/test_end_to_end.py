"""End to end: real services, real injection, an independent receiver.

500 messages through the `sendmail` entry point with GREENARROW_SENDID and
500 over SMTP with the X-GreenArrow-SendID header, all delivered to an
aiosmtpd receiver that is not the engine's code; each arrives byte-identical
to what was injected apart from the headers the engine adds (Received: the
SMTP client's, or the uid that ran `sendmail`) or strips (X-GreenArrow-*); `hvmail_report` counts 1000 successes for
that SendID; `hvmail_init stop` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import smtplib

from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

N = 500
SENDID = "e2e-send"


def message(n: int, via: str) -> bytes:
    lines = [
        "From: Sender <sender@origin.test>",
        f"To: <user{n}@dest.test>",
        f"Subject: message {n} via {via}",
        f"Message-ID: <{via}-{n}@origin.test>",
        "Date: Sun, 22 Nov 2026 10:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"Body of message {n}.",
        ".a line that starts with a dot",
        "..two dots",
        "last line",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def test_thousand_messages_end_to_end(tmp_path):
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}), workers=2,
                        controls={"concurrencyremote": 50})
        with engine:
            for n in range(N):
                result = engine.sendmail("-f", "sender@origin.test", f"user{n}@dest.test",
                                         message=message(n, "cli").replace(b"\r\n", b"\n"),
                                         env={"GREENARROW_SENDID": SENDID})
                assert result.returncode == 0, result.stderr
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                for n in range(N):
                    raw = message(n, "smtp").replace(
                        b"MIME-Version", f"X-GreenArrow-SendID: {SENDID}\r\nMIME-Version".encode(), 1)
                    smtp.sendmail("sender@origin.test", [f"user{n}@dest.test"], raw)
            wait_until(lambda: len(rx.messages) >= 2 * N, 120, "1000 messages at the receiver")

            received = {}
            for m in rx.messages:
                assert m.sender == "sender@origin.test"
                received[m.recipients[0] + ("|smtp" if b"via smtp" in m.content else "|cli")] = m
            assert len(received) == 2 * N  # no duplicates, nothing missing
            for n in range(N):
                cli = received[f"user{n}@dest.test|cli"].content
                trace = b"Received: by engine.test (GreenArrow, from userid %d);\r\n\t" % os.getuid()
                assert cli.startswith(trace)
                assert cli[cli.index(b"\r\nFrom: ") + 2:] == message(n, "cli")
                smtp_msg = received[f"user{n}@dest.test|smtp"].content
                assert smtp_msg.startswith(b"Received: from ")
                first_header_end = smtp_msg.index(b"\r\nFrom: ") + 2
                assert smtp_msg[first_header_end:] == message(n, "smtp")
                assert b"X-GreenArrow" not in smtp_msg

            report = engine.program("hvmail_report", "-q", "all", "--sendid", SENDID, "--json")
            assert report.returncode == 0, report.stderr
            summary = json.loads(report.stdout)
            assert summary["attempts"] == 2 * N
            assert summary["by_status"]["success"] == 2 * N
            text = engine.program("hvmail_report", "-q", "ram")
            assert SENDID in text.stdout.decode()
            assert engine.queued() == []
