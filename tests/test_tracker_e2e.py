"""The tracker in the whole engine: SimpleMH mail delivered, then its links followed.

The last test is issue 14's "done when": the events reach an HTTP event
destination through the recorder, the events store and the event
processor, with a mailto: unsubscribe through smtpd and the unsubscribe
mailbox besides.

`hvmail_init` starts the tracker with the other services; a message
injected over SMTP in a tracking Mail Class whose URL domain points at the
tracker (with a path prefix and format c) reaches an independent receiver;
the link, the `##unsubscribetag##` link, the open pixel and the
List-Unsubscribe URL found in the delivered copy are followed with
http.client, and the spool holds the events with the message's ListID,
SendID, Mail Class, InstanceID and click tracking id.
"""

from __future__ import annotations

import http.client
import re
import shutil
import smtplib
import subprocess
import time
from email import message_from_bytes, policy
from pathlib import Path

import pg
import pytest
from engine import Engine, free_port, route_conf, wait_until
from event_receiver import Receiver as EventReceiver
from smtp_receivers import Receiver

from greenarrow.lib.events import types
from greenarrow.lib.tracker import spool

pg_conninfo = pg.pg_conninfo

MESSAGE = (
    "From: Shop <news@origin.test>\r\n"
    "To: ann@dest.test\r\n"
    "Subject: tracked\r\n"
    "MIME-Version: 1.0\r\n"
    "X-GreenArrow-MailClass: news\r\n"
    "X-GreenArrow-InstanceID: 2001\r\n"
    "X-GreenArrow-Click-Tracking-ID: ct-9\r\n"
    "X-GreenArrow-Tracker-Format: c\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "\r\n"
    '<html><body><a href="https://shop.example.com/p/1?a=1&amp;b=2#top">one</a>\r\n'
    '<a href="##unsubscribetag##https://shop.example.com/bye">unsubscribe</a>\r\n'
    "</body></html>\r\n"
)


def get(port: int, method: str, url: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, str | None]:
    path = url.split(f"127.0.0.1:{port}", 1)[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Location")
    finally:
        conn.close()


def test_links_of_delivered_mail_are_answered_and_recorded(tmp_path) -> None:
    port = free_port()
    mail_class = f"""
mail_class news {{
    listid t100
    track_clicks_and_opens yes
    url_domain http://127.0.0.1:{port}/t
}}
"""
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}) + mail_class,
                        controls={"tracker.listen": [f"127.0.0.1:{port}"]})
        with engine:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                smtp.sendmail("news@origin.test", ["ann@dest.test"], MESSAGE.encode())
            wait_until(lambda: len(rx.messages) >= 1, 60, "the copy at the receiver")
            msg = message_from_bytes(rx.messages[0].content, policy=policy.default)
            html = msg.get_content()
            base = re.escape(f"http://127.0.0.1:{port}/t/")
            links = re.findall(base + r"click\?qs=[A-Za-z0-9_-]+", html)
            (pixel,) = re.findall(base + r"open\?qs=[A-Za-z0-9_-]+", html)
            (unsub_url,) = re.findall(base + r"unsub\?qs=[A-Za-z0-9_-]+", msg["List-Unsubscribe"])
            assert len(links) == 2
            wait_until(lambda: _listening(port), 30, "the tracker")
            assert get(port, "GET", links[0]) == (302, "https://shop.example.com/p/1?a=1&b=2#top")
            assert get(port, "GET", links[1]) == (
                302, "https://shop.example.com/bye?email=ann%40dest.test&sendid=news-2001"
                     "&listid=t100")
            assert get(port, "GET", pixel) == (200, None)
            assert get(port, "GET", unsub_url) == (200, None)  # the confirmation page
            assert get(port, "POST", unsub_url, b"List-Unsubscribe=One-Click",
                       {"Content-Type": "application/x-www-form-urlencoded"}) == (200, None)
            events = spool.read_all_events(engine.root)
    assert sorted((e["event_type"], e.get("click_url") or "") for e in events) == [
        ("engine_click", "https://shop.example.com/p/1?a=1&b=2#top"),
        ("engine_open", ""),
        ("engine_unsub", ""),
        ("engine_unsub", "https://shop.example.com/bye"),
    ]
    for event in events:
        assert (event["email"], event["listid"], event["sendid"], event["mailclass"],
                event["instanceid"], event["click_tracking_id"], event["server_id"]) == (
            "ann@dest.test", "t100", "news-2001", "news", "2001", "ct-9", "engine.test")


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- done when

DONE_MESSAGE = (
    "From: Shop <news@origin.test>\r\n"
    "To: {to}\r\n"
    "Subject: tracked\r\n"
    "MIME-Version: 1.0\r\n"
    "X-GreenArrow-MailClass: news\r\n"
    "X-GreenArrow-InstanceID: 3001\r\n"
    "X-GreenArrow-Click-Tracking-ID: ct-{n}\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "\r\n"
    '<html><body><a href="https://shop.example.com/p/1?a=1&amp;b=2#top">one</a>\r\n'
    '<a href="##linkid:spring-sale##https://shop.example.com/sale">sale</a>\r\n'
    '<a href="##unsubscribetag##https://shop.example.com/bye">unsubscribe</a>\r\n'
    "</body></html>\r\n"
)
UA = "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0 tracker-e2e"


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-A", UA,
                           "--max-time", "30", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _tracked(msg, port: int) -> dict[str, list[str]]:
    html = msg.get_content()
    base = re.escape(f"http://127.0.0.1:{port}/t/")
    return {"click": re.findall(base + r"click\?[A-Za-z0-9_-]+", html),
            "open": re.findall(base + r"open\?[A-Za-z0-9_-]+", html),
            "unsub": re.findall(base + r"unsub\?[A-Za-z0-9_-]+", msg["List-Unsubscribe"]),
            "mailto": re.findall(r"<mailto:([^>]+)>", msg["List-Unsubscribe"])}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_opened_clicked_and_unsubscribed_mail_reaches_an_event_destination(tmp_path,
                                                                        pg_conninfo) -> None:
    """Done when (issue 14): mail sent through the engine in a tracking Mail Class,
    opened, clicked and unsubscribed by curl and http.client (and by mailto: through
    the engine's smtpd), gives engine_open, engine_click and engine_unsub at an HTTP
    event destination, with every field of seed 003 checked."""
    port = free_port()
    with Receiver("127.0.0.1") as rx, EventReceiver() as destination:
        conf = f"""general {{
  server_id e2e-tracker
}}
incoming_email_domain bounces.test {{
  bounce_mailbox return
  unsubscribe_mailbox unsub
}}
mail_class news {{
  listid t100
  track_clicks_and_opens yes
  url_domain http://127.0.0.1:{port}/t
  bounce_address return@bounces.test
}}
event_delivery_destination app {{
  event_delivery_url "{destination.url}"
  event_delivery_events engine_click, engine_open, engine_unsub
}}
""" + route_conf({"dest.test": rx.port})
        engine = Engine(tmp_path, conf=conf, database=pg.database_url(pg_conninfo),
                        controls={"tracker.listen": [f"127.0.0.1:{port}"],
                                  "tracker.processes": 2,
                                  "opt.simplemh_tracking_include_user_agent": 1})
        with engine:
            status = engine.program("hvmail_init", "status").stdout.decode()
            assert "tracker-0" in status and "tracker-1" in status
            assert "unsubscribe-processor" in status
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                for n, to in enumerate(("ann@dest.test", "bob@dest.test")):
                    smtp.sendmail("news@origin.test", [to],
                                  DONE_MESSAGE.format(to=to, n=n).encode())
            wait_until(lambda: len(rx.messages) >= 2, 60, "both copies at the receiver")
            copies = {m.recipients[0]: message_from_bytes(m.content, policy=policy.default)
                      for m in rx.messages}
            ann, bob = _tracked(copies["ann@dest.test"], port), _tracked(
                copies["bob@dest.test"], port)
            assert len(ann["click"]) == 3 and len(ann["open"]) == 1
            wait_until(lambda: _listening(port), 30, "the tracker")
            # ann: opens (curl), clicks both links (http.client), unsubscribes by the
            # ##unsubscribetag## link (http.client) and by one-click POST (curl)
            assert _curl(ann["open"][0]).stdout == "200"
            agent = {"User-Agent": UA}
            assert get(port, "GET", ann["click"][0], headers=agent) == (
                302, "https://shop.example.com/p/1?a=1&b=2#top")
            assert get(port, "GET", ann["click"][1], headers=agent) == (
                302, "https://shop.example.com/sale")
            assert get(port, "GET", ann["click"][2], headers=agent) == (
                302, "https://shop.example.com/bye?email=ann%40dest.test&sendid=news-3001"
                     "&listid=t100")
            assert _curl("-d", "List-Unsubscribe=One-Click", ann["unsub"][0]).stdout == "200"
            # bob: the mailto: of List-Unsubscribe, twice, through the engine's smtpd,
            # and the one-click POST: one unsubscribe
            address, _, query = bob["mailto"][0].partition("?")
            subject = query.removeprefix("subject=")
            assert address.endswith("@bounces.test") and subject.startswith("unsubscribe-")
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                for _ in range(2):
                    smtp.sendmail("bob@dest.test", [address],
                                  f"From: bob@dest.test\r\nTo: {address}\r\n"
                                  f"Subject: {subject}\r\n\r\nunsubscribe\r\n".encode())
            unsub_box = engine.root.maildata / "bounces.test" / "unsub"
            wait_until(lambda: _delivered(unsub_box) >= 2, 60, "the requests delivered")
            assert _curl("-d", "List-Unsubscribe=One-Click", bob["unsub"][0]).stdout == "200"

            def received() -> list[dict]:
                with destination.lock:
                    return [e for batch in destination.batches for e in batch]

            wait_until(lambda: len(received()) >= 6, 120, "six events at the destination")
            wait_until(lambda: not list((unsub_box / "new").iterdir()), 30,
                       "the unsubscribe mailbox emptied")
            time.sleep(3)  # a duplicate, had there been one, would have arrived by now
            events = received()
    assert sorted(destination.unique_ids().values()) == [1] * 6  # each delivered once
    by_type = sorted(events, key=lambda e: (e["event_type"], e["email"], e.get("click_url") or ""))
    assert [(e["event_type"], e["email"], e.get("click_url"), e.get("linkid"))
            for e in by_type] == [
        ("engine_click", "ann@dest.test", "https://shop.example.com/p/1?a=1&b=2#top", None),
        ("engine_click", "ann@dest.test", "https://shop.example.com/sale", "spring-sale"),
        ("engine_open", "ann@dest.test", None, None),
        ("engine_unsub", "ann@dest.test", "", None),
        ("engine_unsub", "ann@dest.test", "https://shop.example.com/bye", None),
        ("engine_unsub", "bob@dest.test", "", None),
    ]
    for event in events:
        assert list(event) == list(types.FIELDS[event["event_type"]])  # every field of seed 003
        n = 0 if event["email"] == "ann@dest.test" else 1
        assert (event["server_id"], event["listid"], event["sendid"], event["mailclass"],
                event["instanceid"], event["click_tracking_id"]) == (
            "e2e-tracker", "t100", "news-3001", "news", "3001", f"ct-{n}")
        assert abs(event["event_time"] - time.time()) < 600
        assert re.fullmatch(r"[0-9a-f]{64}", event["event_unique_id"])
        if event["event_type"] in ("engine_click", "engine_open"):
            assert (event["engine_ip"], event["user_agent"]) == ("127.0.0.1", UA)
        if event["event_type"] == "engine_open":
            assert event["is_privacy_open"] is False


def _delivered(maildir: Path) -> int:
    return sum(len(list((maildir / sub).glob("*"))) for sub in ("new", "cur")
               if (maildir / sub).is_dir()) + (
        len(list((maildir / ".INBOX.CouldNotProcess" / "new").glob("*")))
        if (maildir / ".INBOX.CouldNotProcess" / "new").is_dir() else 0)
