"""greenarrow queue status|list|hold|release|bounce|delete|retry-now, on a running engine.

Mail to defer.test is deferred by its receiver and sits in the disk-queue;
mail to ok.test keeps flowing meanwhile, so every action is exercised while
delivery runs.
"""

from __future__ import annotations

import json

from click.testing import CliRunner
from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.bin.queue import queue_command
from greenarrow.lib.queue import entry as queue_entry


def run(engine: Engine, *args: str) -> str:
    result = CliRunner().invoke(queue_command, list(args), env={"HVMAIL_ROOT": str(engine.root.path)})
    assert result.exit_code == 0, result.output
    return result.output


def listed(engine: Engine, *args: str) -> list[dict]:
    return [json.loads(line) for line in run(engine, "list", "--json", *args).splitlines()]


def test_queue_tools_while_delivery_runs(tmp_path):
    with Receiver(rcpt_reply="451 4.3.2 try again later") as deferring, Receiver() as ok, \
            Receiver() as origin:
        engine = Engine(tmp_path, conf=route_conf({"defer.test": deferring.port, "ok.test": ok.port,
                                                   "origin.test": origin.port}))
        with engine:
            for n, (sendid, listid, user) in enumerate([
                ("campA", "list1", "alice"), ("campA", "list2", "bob"), ("campB", "list1", "carol"),
                ("campB", "list2", "dave"), ("campC", "list3", "xavier"), ("campC", "list3", "xena"),
            ]):
                result = engine.sendmail("-f", "s@origin.test", f"{user}@defer.test",
                                         message=f"Subject: {n}\n\nhi\n".encode(),
                                         env={"GREENARROW_SENDID": sendid, "GREENARROW_LISTID": listid})
                assert result.returncode == 0, result.stderr
            wait_until(lambda: len(engine.queued("disk")) == 6, 30, "six deferred entries")
            for n in range(20):  # delivery goes on while the tools work
                engine.sendmail("-f", "s@origin.test", f"u{n}@ok.test", message=b"Subject: ok\n\nx\n")

            status = json.loads(run(engine, "status", "--json"))
            assert status["disk"]["messages"] == 6 and status["disk"]["deferred"] == 6
            assert status["disk"]["due_now"] == 0
            assert status["disk"]["top_domains"] == [["defer.test", 6]]
            assert status["disk"]["oldest_age"] is not None
            assert "disk-queue: 6 messages" in run(engine, "status")

            assert {r["recipient"] for r in listed(engine, "--sendid", "CAMPA")} == \
                {"alice@defer.test", "bob@defer.test"}
            assert {r["recipient"] for r in listed(engine, "--listid", "list1", "--listid", "list3")} == \
                {"alice@defer.test", "carol@defer.test", "xavier@defer.test", "xena@defer.test"}
            assert len(listed(engine, "--sendid", "campB", "--listid", "list2")) == 1
            assert {r["recipient"] for r in listed(engine, "-r", "x*@defer.test")} == \
                {"xavier@defer.test", "xena@defer.test"}
            assert len(listed(engine, "--domain", "*.test", "-q", "disk")) == 6
            assert listed(engine, "--older-than", "1h") == []
            assert len(listed(engine, "--newer-than", "1h", "--domain", "defer.test")) == 6

            assert "hold: 2 entries" in run(engine, "hold", "--sendid", "campA")
            assert {r["recipient"] for r in listed(engine, "--held")} == \
                {"alice@defer.test", "bob@defer.test"}
            assert all(r["held"] for r in listed(engine, "--held"))

            assert "release: 2 entries" in run(engine, "release", "--sendid", "campA")
            wait_until(lambda: sum(1 for r in engine.records("disk")) >= 2, 30,
                       "the released entries to be tried again")
            assert listed(engine, "--held") == []

            assert "retry-now: 2 entries" in run(engine, "retry-now", "--sendid", "campB")
            wait_until(lambda: sum(1 for r in engine.records("disk")) >= 4, 30, "the retries")
            retried = {r["email"] for r in engine.records("disk")}
            assert retried == {"alice@defer.test", "bob@defer.test", "carol@defer.test",
                               "dave@defer.test"}
            assert all(r["is_retry"] == "1" for r in engine.records("disk"))
            wait_until(lambda: sorted(queue_entry.split_name(n)[1] for n in engine.queued("disk"))
                       == [1, 1, 2, 2, 2, 2], 30, "two attempts counted for the retried four")

            assert "bounce: 1 entries" in run(engine, "bounce", "-r", "xena@defer.test")
            wait_until(lambda: origin.messages, 30, "the operator's bounce")
            assert b"bounced by the queue operator" in origin.messages[0].content

            assert "delete: 1 entries" in run(engine, "delete", "-r", "xavier@*")
            wait_until(lambda: len(engine.queued("disk")) == 4, 30, "four entries left")
            wait_until(lambda: len(ok.messages) == 20, 30, "the ok.test mail")

            no_filter = CliRunner().invoke(queue_command, ["delete"],
                                           env={"HVMAIL_ROOT": str(engine.root.path)})
            assert no_filter.exit_code != 0 and "--all" in no_filter.output


def test_queue_and_report_filters_read_wildcards_alike() -> None:
    """`[` is an address character in both (it was a character class in the queue tools)."""
    from greenarrow.lib.ops.delivery_report import Filter as ReportFilter
    from greenarrow.lib.ops.queue_tools import Entry, Filter

    entry = Entry(queue="ram", name="x-0.0.0", held=False, attempts=0, due=0, injected=0.0,
                  envelope={"recipient": "User[1]@Example.com"})
    for pattern, expected in (("user[1]@example.com", True), ("user?1]@*", True),
                              ("user1@example.com", False)):
        queue_filter = Filter(recipients=[pattern])
        report_filter = ReportFilter(recipients=[pattern])
        assert queue_filter.matches(entry, 0.0) is expected
        assert report_filter({"status": "success", "sendid": "", "listid": "", "sender": "",
                              "email": "User[1]@Example.com"}) is expected
