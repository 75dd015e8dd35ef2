"""The tracker in the whole engine: SimpleMH mail delivered, then its links followed.

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
import smtplib
from email import message_from_bytes, policy

from engine import Engine, free_port, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.lib.tracker import spool

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
