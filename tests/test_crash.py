"""Crash safety: kill -9 of queue-send with 1000 attempts under way loses nothing.

The receiver is slowed down so that many attempts are in flight when
queue-send dies. The supervisor restarts it; it rebuilds its schedule from
the queue folder alone and every message arrives (a duplicate is allowed,
a loss is not).
"""

from __future__ import annotations

import smtplib
import time

from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

N = 1000


def test_kill_queue_send_mid_delivery_loses_nothing(tmp_path):
    with Receiver("127.0.0.1", delay=0.05, delay_at="data") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}), workers=2,
                        controls={"concurrencyremote": 40})
        with engine:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                for n in range(N):
                    smtp.sendmail("s@origin.test", [f"u{n}@dest.test"],
                                  f"Subject: {n}\r\nMessage-ID: <{n}@origin.test>\r\n\r\nbody {n}\r\n")
            wait_until(lambda: len(rx.messages) >= 100, 60, "the first deliveries")
            old = engine.kill_service("queue-send-ram")
            wait_until(lambda: engine.service_pid("queue-send-ram") != old, 30,
                       "the supervisor to restart queue-send")
            wait_until(lambda: len({m.recipients[0] for m in rx.messages}) >= N, 180,
                       "every message to arrive after the restart")
            wait_until(lambda: engine.queued() == [], 30, "the queue to empty")
            time.sleep(0.5)
        recipients = [m.recipients[0] for m in rx.messages]
        assert set(recipients) == {f"u{n}@dest.test" for n in range(N)}
        duplicates = len(recipients) - N
        print(f"duplicates after kill -9 of queue-send: {duplicates}")
        assert duplicates <= 40  # at most the attempts that were in flight
