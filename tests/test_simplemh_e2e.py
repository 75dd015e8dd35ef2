"""SimpleMH end to end: the real engine, `sendmail` and SMTP injection, an independent receiver.

A Mail Class in greenarrow.conf; messages injected through bin/sendmail (the
class named by GREENARROW_MAILCLASS) and over SMTP (named by the header),
two recipients each; the receiver (aiosmtpd, not the engine's code) gets
each recipient's own copy: the envelope sender is that recipient's encoded
bounce address, which decodes back to ListID, SendID and recipient; every
link is a tracking URL that decodes to its original; X-Mailer-Info and
List-Unsubscribe name the recipient; no X-GreenArrow-* header is left; the
delivery log records Mail Class, InstanceID and click tracking id.
"""

from __future__ import annotations

import re
import smtplib
from email import message_from_bytes, policy

from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.lib.config import secret_constants
from greenarrow.lib.simplemh import return_path as ba
from greenarrow.lib.simplemh import tracking_url as tu

CLASS = """
mail_class news {
    listid t100
    track_clicks_and_opens yes
    url_domain https://links.example.com
    bounce_address bounce@bounces.example.com
    statistic_report_grouping per_instanceid_legacy
}
"""
HTML = (
    "From: Shop <news@origin.test>\r\n"
    "To: list@dest.test\r\n"
    "Subject: {subject}\r\n"
    "MIME-Version: 1.0\r\n"
    "{extra}"
    "Content-Type: text/html; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n"
    "\r\n"
    '<html><body><p>Caf=C3=A9 <a href=3D"https://shop.example.com/p/1?a=3D1&amp;b=3D2">one</a>=\r\n'
    ' <a href=3D"mailto:help@origin.test">help</a></p></body></html>\r\n'
)
LINK = re.compile(r"https://links\.example\.com/(click|open)\?([A-Za-z0-9_-]+)")


def test_simplemh_through_the_engine(tmp_path) -> None:
    rcpts = ["ann@dest.test", "bob@dest.test"]
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}) + CLASS)
        constants = secret_constants.read(engine.root.control)
        with engine:
            cli = HTML.format(subject="via cli", extra="X-GreenArrow-InstanceID: 1001\r\n")
            result = engine.sendmail("-f", "news@origin.test", *rcpts,
                                     message=cli.replace("\r\n", "\n").encode(),
                                     env={"GREENARROW_MAILCLASS": "news"})
            assert result.returncode == 0, result.stderr
            smtp_msg = HTML.format(subject="via smtp",
                                   extra="X-GreenArrow-MailClass: news\r\n"
                                         "X-GreenArrow-InstanceID: 1002\r\n"
                                         "X-GreenArrow-Click-Tracking-ID: ct-7\r\n")
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                smtp.sendmail("news@origin.test", rcpts, smtp_msg.encode())
            wait_until(lambda: len(rx.messages) >= 4, 60, "four copies at the receiver")
            # queue-send logs an attempt after the receiver has the message: wait for the lines
            wait_until(lambda: len(engine.records()) >= 4, 60, "four delivery log lines")
            records = engine.records()

        assert len(rx.messages) == 4
        for m in rx.messages:
            (rcpt,) = m.recipients
            via = "smtp" if b"via smtp" in m.content else "cli"
            instance = "1002" if via == "smtp" else "1001"
            bounce = ba.decode(m.sender, constants)
            assert (bounce.listid, bounce.sendid, bounce.recipient) == (
                "t100", f"news{instance}", rcpt)
            assert b"X-GreenArrow" not in m.content
            msg = message_from_bytes(m.content, policy=policy.default)
            info = tu.decode("".join(msg["X-Mailer-Info"].split()), constants)
            assert (info.recipient, info.sendid, info.instanceid) == (rcpt, f"news{instance}",
                                                                      instance)
            assert rcpt.replace("@", "=40") in msg["List-Unsubscribe"]
            html = msg.get_content()
            assert "Caf\u00e9" in html and 'href="mailto:help@origin.test"' in html
            found = {kind: tu.decode(data, constants) for kind, data in LINK.findall(html)}
            assert found["click"].url == "https://shop.example.com/p/1?a=1&b=2"
            assert found["click"].recipient == found["open"].recipient == rcpt
            assert found["click"].click_tracking_id == ("ct-7" if via == "smtp" else "")
        assert sorted((r["email"], r["mailclass"], r["instanceid"], r["click_tracking_id"])
                      for r in records) == sorted(
            [(r, "news", "1001", "") for r in rcpts] + [(r, "news", "1002", "ct-7") for r in rcpts])
