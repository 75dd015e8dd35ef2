"""Crash safety under fire: kill -9 of queue-send, remote workers, smtpd and injectors.

Three rounds of 1,700 messages (5,100 deliveries). While four SMTP clients
and a stream of `sendmail` processes inject, a chaos thread kill -9's a
random service (queue-send, a remote worker, smtpd) or a `sendmail` process
in the middle of its work, several times per round. Every message whose
injection was acknowledged (250, or exit 0) must arrive; duplicates are
allowed, counted and reported.
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import subprocess
import threading
import time

import pytest
from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

ROUNDS = 3
PER_ROUND = 1700
CLIENTS = 4
SERVICES = ["queue-send-ram", "remote-0", "remote-1", "smtpd"]


def smtp_client(port: int, recipients: list[str], acknowledged: set[str], lock: threading.Lock,
                deadline: float) -> None:
    """Inject each recipient's message until it is acknowledged, reconnecting after kills."""
    pending = list(recipients)
    smtp = None
    while pending and time.monotonic() < deadline:
        try:
            if smtp is None:
                smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
            rcpt = pending[0]
            smtp.sendmail("s@origin.test", [rcpt], f"Subject: {rcpt}\r\nMessage-ID: <{rcpt}>\r\n\r\nx\r\n")
            with lock:
                acknowledged.add(rcpt)
            pending.pop(0)
        except (OSError, smtplib.SMTPException):
            smtp = None
            time.sleep(0.2)
    if smtp is not None:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass


def chaos(engine: Engine, rng: random.Random, stop: threading.Event, kills: list[str],
          cli_acknowledged: set[str], lock: threading.Lock, round_no: int) -> None:
    n = 0
    while not stop.wait(rng.uniform(0.4, 1.2)):
        target = rng.choice(SERVICES + ["sendmail"])
        if target == "sendmail":
            # An injector killed at a random point: its message was never acknowledged.
            rcpt = f"killed{round_no}-{n}@dest.test"
            proc = subprocess.Popen([str(engine.root.bin / "sendmail"), "-f", "s@origin.test", rcpt],
                                    stdin=subprocess.PIPE, env=engine.env)
            time.sleep(rng.uniform(0, 0.03))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(b"Subject: killed\n\nx\n")
            if proc.returncode == 0:  # it finished before the signal landed
                with lock:
                    cli_acknowledged.add(rcpt)
            kills.append("sendmail")
        else:
            try:
                engine.kill_service(target)
                kills.append(target)
            except (KeyError, ProcessLookupError):
                pass  # it is being restarted right now
        n += 1


@pytest.mark.timeout(900)
def test_kill_minus_nine_during_5000_deliveries_loses_nothing(tmp_path):
    rng = random.Random(20261122)
    with Receiver() as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}), workers=2,
                        controls={"concurrencyremote": 30, "queue.retry.scale": 0.001})
        acknowledged: set[str] = set()
        lock = threading.Lock()
        kills: list[str] = []
        with engine:
            for round_no in range(ROUNDS):
                recipients = [f"r{round_no}-{n}@dest.test" for n in range(PER_ROUND)]
                stop = threading.Event()
                deadline = time.monotonic() + 600
                clients = [threading.Thread(target=smtp_client, args=(
                    engine.smtp_port, recipients[i::CLIENTS], acknowledged, lock, deadline))
                    for i in range(CLIENTS)]
                killer = threading.Thread(target=chaos, args=(engine, rng, stop, kills, acknowledged,
                                                              lock, round_no))
                for t in clients + [killer]:
                    t.start()
                for t in clients:
                    t.join()
                # Injection may outrun the chaos: keep killing while delivery goes on,
                # until this round has had its share of kills (bounded in time).
                wanted = 3 * (round_no + 1)
                deadline = time.monotonic() + 60
                while len(kills) < wanted and time.monotonic() < deadline:
                    time.sleep(0.1)
                stop.set()
                killer.join()
                assert all(r in acknowledged for r in recipients), "a client gave up"
            wait_until(lambda: acknowledged <= {m.recipients[0] for m in rx.messages}, 300,
                       "every acknowledged message to arrive")
            wait_until(lambda: not any(engine.queued(q) for q in ("ram", "bounce", "disk")), 120,
                       "the queues to drain")
        arrived = [m.recipients[0] for m in rx.messages]
        lost = acknowledged - set(arrived)
        duplicates = len(arrived) - len(set(arrived))
        unacknowledged = set(arrived) - acknowledged
        report = (f"crash safety: {len(acknowledged)} acknowledged, {len(arrived)} deliveries, "
                  f"{len(lost)} lost, {duplicates} duplicates, {len(unacknowledged)} delivered "
                  f"without acknowledgement; kills: "
                  + ", ".join(f"{k}={kills.count(k)}" for k in sorted(set(kills))))
        print(report)
        (tmp_path / "crash-safety-report.txt").write_text(report + "\n")
        assert not lost, sorted(lost)[:10]
        assert len(kills) >= 3 * ROUNDS
        assert len(acknowledged) >= ROUNDS * PER_ROUND
        assert os.path.exists(engine.root.log / "queue-send-ram" / "current")
