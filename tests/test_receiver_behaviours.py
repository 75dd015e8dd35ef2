"""How each receiver behaviour is logged: status and qmail-remote's wording.

One engine routes each test domain to a receiver scripted to behave one way:
accept; 4xx or 5xx at RCPT; 5xx or 4xx after DATA; refuse the connection;
answer slower than the timeout. A deferred first attempt moves to the
disk-queue with one attempt counted; a failure leaves the queue and its
bounce goes back to the sender.
"""

from __future__ import annotations

from engine import Engine, free_port, route_conf, wait_until
from smtp_receivers import Receiver

CASES = {
    # domain: (status, words in the log message)
    "ok.test": ("success", "accepted message./Remote host said: 250"),
    "rcpt4xx.test": ("deferral", "does not like recipient./Remote host said: 451"),
    "rcpt5xx.test": ("failure", "does not like recipient./Remote host said: 550"),
    "data5xx.test": ("failure", "failed after I sent the message./Remote host said: 554"),
    "data4xx.test": ("deferral", "failed after I sent the message./Remote host said: 452"),
    "refused.test": ("deferral", "Sorry, I wasn't able to establish an SMTP connection."),
    "slow.test": ("deferral", "connection died"),
}


def test_each_receiver_behaviour_is_logged_with_its_status_and_text(tmp_path):
    with Receiver() as ok, \
            Receiver(rcpt_reply="451 4.2.1 try later") as rcpt4, \
            Receiver(rcpt_reply="550 5.1.1 no such user") as rcpt5, \
            Receiver(data_reply="554 5.7.1 rejected as spam") as data5, \
            Receiver(data_reply="452 4.3.1 out of storage") as data4, \
            Receiver(delay=5, delay_at="mail") as slow, \
            Receiver() as sender_mx:
        routes = {"ok.test": ok.port, "rcpt4xx.test": rcpt4.port, "rcpt5xx.test": rcpt5.port,
                  "data5xx.test": data5.port, "data4xx.test": data4.port,
                  "refused.test": free_port(), "slow.test": slow.port,
                  "origin.test": sender_mx.port}
        engine = Engine(tmp_path, conf=route_conf(routes),
                        controls={"timeoutremote": 1, "queue.retry.scale": 100})
        with engine:
            for domain in CASES:
                result = engine.sendmail("-f", "s@origin.test", f"user@{domain}",
                                         message=f"Subject: {domain}\n\nhello\n".encode())
                assert result.returncode == 0, result.stderr
            wait_until(lambda: len(engine.records()) >= len(CASES), 60, "one attempt each")
            by_domain = {r["email"].split("@")[1]: r for r in engine.records()}
            for domain, (status, words) in CASES.items():
                record = by_domain[domain]
                assert record["status"] == status, (domain, record)
                assert words in record["message"], (domain, record["message"])
                assert "\t" not in record["message"]
            deferred = sum(1 for s, _ in CASES.values() if s == "deferral")
            wait_until(lambda: len(engine.queued("disk")) == deferred, 30, "moves to the disk-queue")
            assert engine.queued() == []
            # A moved entry keeps its id and counts one attempt.
            assert all(name.split(".")[1] == "1" for name in engine.queued("disk"))
            failures = sum(1 for s, _ in CASES.values() if s == "failure")
            wait_until(lambda: len(sender_mx.messages) == failures, 30, "the bounces")
            wait_until(lambda: len(engine.records("bounce")) == failures, 30, "their log lines")
        assert len(ok.messages) == 1
        for bounce in sender_mx.messages:
            assert bounce.sender in ("", "<>")  # aiosmtpd reports the null sender as <>
            assert bounce.recipients == ["s@origin.test"]
            assert b"Hi. This is the qmail-send program at engine.test." in bounce.content
        bounce_records = engine.records("bounce")
        assert [r["sendid"] for r in bounce_records] == ["-ic"] * failures
