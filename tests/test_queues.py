"""The three queues: movement to the disk-queue, retries, bounces, lifetime, limits, tmpfs."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess

import pytest
from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.lib.core import paths
from greenarrow.lib.core.delivery_log import iter_records
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.queue.failure_notice import BREAK_LINE
from greenarrow.lib.queue.scheduler import Scheduler, WorkerLink


def test_deferred_first_attempt_moves_to_disk_queue_and_arrives_later(tmp_path):
    """A 451 at RCPT moves the entry to the disk-queue; the retry (schedule scaled
    down) is accepted and logged as a retry from the disk-queue."""
    with Receiver(rcpt_reply="451 4.7.1 greylisted, come back later") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}),
                        controls={"queue.retry.scale": 0.005})
        with engine:
            assert engine.sendmail("-f", "s@origin.test", "u@dest.test",
                                   message=b"Subject: grey\n\nhello\n").returncode == 0
            wait_until(lambda: engine.queued("disk"), 30, "the move to the disk-queue")
            name = engine.queued("disk")[0]
            assert engine.queued() == []
            entry_id, attempts, due = queue_entry.split_name(name)
            assert attempts == 1
            rx.rcpt_reply = None  # the receiver now accepts
            wait_until(lambda: rx.messages, 30, "the retry to be accepted")
            wait_until(lambda: engine.records("disk"), 10, "the disk-queue's log line")
        first, = engine.records("ram")
        retry, = engine.records("disk")
        assert (first["status"], first["is_retry"]) == ("deferral", "0")
        assert (retry["status"], retry["is_retry"]) == ("success", "1")
        assert first["msguid"] == retry["msguid"]
        assert engine.queued("disk") == []


def test_permanent_failure_bounces_to_sender_truncated_at_bouncemaxbytes(tmp_path):
    with Receiver(rcpt_reply="550 5.1.1 no such user here") as dest, Receiver() as origin:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": dest.port,
                                                   "origin.test": origin.port}),
                        controls={"bouncemaxbytes": 300})
        body = b"".join(b"line %04d of a long message body\n" % i for i in range(100))
        with engine:
            assert engine.sendmail("-f", "s@origin.test", "nobody@dest.test",
                                   message=b"Subject: big\n\n" + body).returncode == 0
            wait_until(lambda: origin.messages, 30, "the bounce")
        bounce = origin.messages[0]
        assert bounce.recipients == ["s@origin.test"]
        text = bounce.content.decode()
        assert "Hi. This is the qmail-send program at engine.test." in text
        assert "<nobody@dest.test>:" in text
        assert "does not like recipient." in text and "550 5.1.1 no such user here" in text
        quoted = bounce.content.split(BREAK_LINE.encode() + b"\r\n\r\n", 1)[1]
        assert 0 < len(quoted) <= 302  # 300 bytes and the line ending added
        assert quoted.startswith(b"Subject: big\r\n") or b"Subject: big" in quoted
        assert b"line 0099" not in quoted


def test_no_bounce_for_an_empty_sender(tmp_path):
    with Receiver(rcpt_reply="550 5.1.1 no such user") as dest:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": dest.port}))
        with engine:
            assert engine.sendmail("-f", "", "nobody@dest.test",
                                   message=b"Subject: x\n\nhello\n").returncode == 0
            wait_until(lambda: engine.records(), 30, "the failure")
            wait_until(lambda: engine.queued() == [], 10, "the entry to leave")
        assert engine.records()[0]["status"] == "failure"
        assert engine.queued("bounce") == [] and engine.records("bounce") == []


def test_queue_lifetime_expiry_with_a_simulated_clock(tmp_path):
    """A deferral past the queue lifetime becomes failure_toolong and a bounce.

    queue-send's clock is simulated: the entry was injected 8 days before "now".
    """
    engine = Engine(tmp_path, controls={"queuelifetime": 7 * 86400})
    root = engine.root
    now = 2_000_000_000.0
    envelope = {"sender": "s@origin.test", "recipient": "u@dest.test", "msguid": "abc-1-0",
                "sendid": "s1", "listid": "", "mtaid": "", "mailclass": "", "instanceid": "",
                "click_tracking_id": "", "injected_time": int(now - 8 * 86400), "source_ip": ""}
    name, = queue_entry.commit(root.queue("disk"), [envelope], b"Subject: old\r\n\r\nold\r\n",
                               durable=True, attempts=30, due=int(now))

    async def run() -> None:
        scheduler = Scheduler(root, "disk", clock=lambda: now)
        link = WorkerLink(0)
        scheduler.known.add(name)
        scheduler.inflight[name] = (link, envelope, now)
        link.inflight.add(name)
        await scheduler.apply_results([{"id": name, "status": "deferral",
                                        "text": "Connected to 127.0.0.1 but connection died."}])
        scheduler.log.close()

    asyncio.run(run())
    record, = iter_records(root.delivery_log("disk"))
    assert record["status"] == "failure_toolong"
    assert "in the queue too long" in record["message"]
    assert engine.queued("disk") == []
    bounce, = engine.queued("bounce")
    bounce_envelope, bounce_message = queue_entry.read_entry(root.queue("bounce") / "entries" / bounce)
    assert bounce_envelope["recipient"] == "s@origin.test"
    assert bounce_envelope["sendid"] == "-ic" and bounce_envelope["sender"] == ""
    assert b"in the queue too long" in bounce_message


def test_a_full_queue_refuses_for_now_and_loses_nothing(tmp_path):
    """Over queue.ram.limit.messages, SMTP answers 451 and sendmail exits 111; every
    message accepted before that is delivered."""
    with Receiver(delay=0.3, delay_at="data") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}),
                        controls={"queue.ram.limit.messages": 20, "concurrencyremote": 2})
        accepted, refused = [], 0
        with engine:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                for n in range(60):
                    try:
                        smtp.sendmail("s@origin.test", [f"u{n}@dest.test"], f"Subject: {n}\r\n\r\nx\r\n")
                        accepted.append(f"u{n}@dest.test")
                    except smtplib.SMTPDataError as e:
                        assert e.smtp_code == 451 and b"queue is full" in e.smtp_error
                        refused += 1
                    if n == 30:
                        wait_until(lambda: queue_entry.read_count(
                            paths.count_path(str(engine.root.path), "ram")) >= 20, 10,
                            "the published count")
            cli = engine.sendmail("-f", "s@origin.test", "late@dest.test", message=b"Subject: l\n\nx\n")
            assert cli.returncode == 111 and b"queue is full" in cli.stderr
            wait_until(lambda: len(rx.messages) >= len(accepted), 120, "every accepted message")
        assert refused > 0
        assert sorted(m.recipients[0] for m in rx.messages) == sorted(accepted)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_seed_bounce_queue_tuning_commands_then_restart(tmp_path):
    """The seed's commands, as written, followed by hvmail_init restart."""
    engine = Engine(tmp_path)
    bounce_dir = str(engine.root.queue("bounce"))
    try:
        with engine:
            subprocess.run("cd $HVMAIL_ROOT/control && echo 100 > queue.bounce.concurrencyremote && "
                           "echo 5000 > queue.bounce.limit.messages && "
                           "echo 50000 > queue.bounce.ramdisk.inodes && "
                           "echo 200 > queue.bounce.ramdisk.size && "
                           "echo 5120 > bouncemaxbytes", shell=True, check=True, env=engine.env)
            result = engine.program("hvmail_init", "restart")
            assert result.returncode == 0, result.stdout + result.stderr
            status = engine.program("hvmail_init", "status").stdout.decode()
            assert "bounce-queue: tmpfs of 200 MB, 50000 inodes" in status
            assert "ram-queue: plain folder" in status
            assert os.path.ismount(bounce_dir)
            assert sorted(os.listdir(bounce_dir)) == ["bad", "entries", "hold", "tmp"]
            queue_status = json.loads((engine.root.var / "queue.bounce.status").read_text())
            assert queue_status["known"] == 0
    finally:
        if os.path.ismount(bounce_dir):
            subprocess.run(["umount", bounce_dir], check=False)


def test_bounces_overflow_to_the_disk_queue_when_the_bounce_queue_is_full(tmp_path):
    """Over queue.bounce.limit.messages (as published by the bounce-queue's scheduler),
    internally created messages go to the durable disk-queue instead."""
    from greenarrow.lib.core.paths import Root
    from greenarrow.lib.ops.install_root import init_root
    from greenarrow.lib.queue import moves as queue_moves

    root = Root(tmp_path)
    init_root(root)
    bounce = ({"sender": "", "recipient": "s@origin.test", "msguid": "b-1-0", "sendid": "-ic",
               "listid": "", "mtaid": "", "mailclass": "", "instanceid": "",
               "click_tracking_id": "", "injected_time": 1, "source_ip": "", "bounce_level": 1},
              b"Subject: failure notice\r\n\r\nx\r\n")
    count_file = paths.count_path(str(root.path), "bounce")
    queue_entry.write_count(count_file, 3)
    assert queue_moves.commit_bounces(str(root.path), [bounce], bounce_limit=5) == "bounce"
    queue_entry.write_count(count_file, 5)
    second = (dict(bounce[0], msguid="b-2-0"), bounce[1])
    assert queue_moves.commit_bounces(str(root.path), [second], bounce_limit=5) == "disk"
    assert len(os.listdir(root.queue("bounce") / "entries")) == 1
    assert len(os.listdir(root.queue("disk") / "entries")) == 1
