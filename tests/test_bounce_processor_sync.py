"""Synchronous bounces: failed delivery attempts in the delivery logs into bounce_all."""

from __future__ import annotations

import pg
import psycopg
from test_bounce_processor import DOMAIN, constants, events, make_root, processor, run_passes

from greenarrow.lib.core.delivery_log import DeliveryLogWriter
from greenarrow.lib.events.types import FIELDS
from greenarrow.lib.simplemh import return_path as bounce_address

pg_conninfo = pg.pg_conninfo


def line(n: int, sender: str, status: str = "failure", **extra) -> dict:
    base = {"timestamp": 1_700_000_000 + n, "channel": "remote", "status": status,
            "is_retry": 0, "msguid": f"m{n:08d}", "sender": sender, "email": "bob@example.com",
            "listid": "news42", "sendid": "send7", "click_tracking_id": "c1",
            "mailclass": "weekly", "instanceid": "i1",
            "message": "1.2.3.4 failed after I sent the message. Remote host said: "
                       "550 5.1.1 <bob@example.com>: user unknown"}
    base.update(extra)
    return base


def test_failure_with_encoded_sender_is_a_synchronous_bounce(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    encoded = bounce_address.encode(f"return@{DOMAIN}", "news42", "send7", "bob@example.com",
                                    constants(root))
    with DeliveryLogWriter(root.delivery_log("disk")) as writer:
        writer.write([
            line(1, encoded),
            line(2, encoded, status="success", message="250 ok"),
            line(3, encoded, status="deferral", message="451 try later"),
            line(4, "someone@elsewhere.test"),  # not SimpleMH mail: no bounce event
            line(5, f"return@{DOMAIN}"),  # the plain mailbox: not encoded
            line(6, f"lite-anything@{DOMAIN}", status="failure_toolong",
                 message="timed out"),
        ])
    p = processor(root)
    run_passes(p, 3)
    found = events(pg_conninfo, "bounce_all")
    assert len(found) == 1
    bounce = found[0]
    assert list(bounce) == list(FIELDS["bounce_all"])
    assert bounce["synchronous"] is True
    assert bounce["bounce_text"] == line(1, encoded)["message"]
    assert (bounce["email"], bounce["listid"], bounce["sendid"]) == (
        "bob@example.com", "news42", "send7")
    assert (bounce["mailclass"], bounce["instanceid"], bounce["click_tracking_id"]) == (
        "weekly", "i1", "c1")
    assert bounce["event_time"] == 1_700_000_001
    assert bounce["bounce_type"] == "h"
    assert len(events(pg_conninfo, "bounce_bad_address")) == 1
    lite = events(pg_conninfo, "bounce_lite")
    assert len(lite) == 1 and lite[0]["synchronous"] is True
    assert lite[0]["report_recipient"] == f"lite-anything@{DOMAIN}"
    # read again from the saved position by a fresh processor: nothing doubles
    run_passes(processor(root), 2)
    assert len(events(pg_conninfo)) == 3
    with psycopg.connect(pg_conninfo) as conn:
        sources = dict(conn.execute("SELECT source, lines FROM event_sources").fetchall())
    assert sources["bounce-processor/delivery/disk"] == 6


def test_log_bounce_code_is_used(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    encoded = bounce_address.encode(f"return@{DOMAIN}", "news42", "send7", "bob@example.com",
                                    constants(root))
    with DeliveryLogWriter(root.delivery_log("ram")) as writer:
        writer.write([line(1, encoded, bounce_code=20, message="452 mailbox full")])
    run_passes(processor(root), 2)
    bounce = events(pg_conninfo, "bounce_all")[0]
    assert (bounce["bounce_code"], bounce["bounce_type"]) == (20, "s")
    assert events(pg_conninfo, "bounce_bad_address") == []


def test_qmail_style_bounces(tmp_path, pg_conninfo):
    """This server's own and a listed server's are synchronous; another server's are not."""
    from test_bounce_processor import delivered, maildir, new_files

    from greenarrow.lib.queue.failure_notice import make_bounce

    root = make_root(tmp_path, pg_conninfo)
    (root.control / "opt.treat_qsbf_bounces_as_local_server_names").write_text("MTA2.test\n")
    reason = ("1.2.3.4 does not like recipient./Remote host said: 550 5.1.1 "
              "<{r}>: no such user/Giving up on 1.2.3.4.")
    box = maildir(root, "return")
    for n, server in enumerate(("mail.test", "mta2.test", "mta3.test")):
        rcpt = f"user{n}@example.com"
        encoded = bounce_address.encode(f"return@{DOMAIN}", "news42", "send7", rcpt,
                                        constants(root))
        original = f"To: {rcpt}\r\nSubject: hi\r\n\r\nhello\r\n".encode()
        box.deliver(delivered(encoded, make_bounce(server, encoded, rcpt, reason.format(r=rcpt),
                                                   original, 0, f"m{n}")))
    run_passes(processor(root), 2)
    assert new_files(root, "return") == []
    found = {e["email"]: e for e in events(pg_conninfo, "bounce_all")}
    assert sorted(found) == ["user0@example.com", "user1@example.com", "user2@example.com"]
    own = found["user0@example.com"]
    assert own["synchronous"] is True and own["bounce_text"] == reason.format(r=own["email"])
    listed = found["user1@example.com"]
    assert listed["synchronous"] is True
    assert listed["bounce_text"] == reason.format(r="user1@example.com")
    assert listed["bounce_type"] == "h"
    assert found["user2@example.com"]["synchronous"] is False
