"""queue-send's local branch, on a real Scheduler and real queue files (links stand in).

A recipient at an incoming mailbox goes to the local link with its Maildir,
others to a remote worker; an entry whose kind of link is down waits
(parked) without holding back the other kind, and goes out when its link
connects; a local deferral stays in the ram-queue.
"""

from __future__ import annotations

import asyncio
import os
import time

from greenarrow.lib.core import remote_link
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.queue.scheduler import LOCAL, Scheduler, WorkerLink

CONF = "incoming_email_domain bounces.example.com {\n    bounce_mailbox return\n}\n"


class _Writer:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class _Jobs:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)


def _up(link: WorkerLink) -> None:
    link.writer, link.jobs = _Writer(), _Jobs()


def _jobs(link: WorkerLink) -> list[dict]:
    lines, link.jobs.lines = link.jobs.lines, []
    return [remote_link.decode(line) for line in lines]


def test_local_and_remote_recipients_take_their_own_links(tmp_path) -> None:
    root = Root(tmp_path / "hvmail")
    init_root(root, me="engine.test")
    (root.control / "greenarrow.conf").write_text(CONF)
    envelopes = [{"sender": "a@x.test", "recipient": r, "msguid": "m1",
                  "injected_time": int(time.time())}
                 for r in ("Return@Bounces.Example.com", "bob@remote.test")]
    queue_entry.commit(str(root.queue("ram")), envelopes, b"Subject: s\r\n\r\nhi\r\n")

    async def run() -> None:
        scheduler = Scheduler(root, "ram")
        remote = WorkerLink(0, "unused")
        local = WorkerLink(-1, "unused", LOCAL)
        scheduler.links, scheduler.local_link = [remote], local
        try:
            _up(remote)
            scheduler.rescan()
            scheduler.dispatch()  # the local agent is down: its entry waits, the other goes
            (job,) = _jobs(remote)
            assert job["path"].endswith("-1.0.0") and "maildir" not in job
            assert len(scheduler.parked[LOCAL]) == 1
            _up(local)
            scheduler.unpark(LOCAL)
            scheduler.dispatch()
            (job,) = _jobs(local)
            assert job["maildir"] == f"{root.path}/maildata/bounces.example.com/return/"
            assert job["path"].endswith("-0.0.0")
            await scheduler.apply_results([{"id": job["id"], "status": "deferral",
                                            "text": "cannot write to Maildir x: full"}])
            (record,) = _records(root)
            assert record["channel"] == "local" and record["status"] == "deferral"
            assert record["mx_hostname"] == record["outmtaid_name"] == ""
            entries = os.listdir(root.queue("ram") / "entries")
            assert sorted(name.split(".")[1] for name in entries) == ["0", "1"]
            assert os.listdir(root.queue("disk") / "entries") == []
        finally:
            scheduler.log.close()

    asyncio.run(run())


def _records(root: Root) -> list[dict]:
    from greenarrow.lib.core import delivery_log

    return list(delivery_log.iter_records(root.delivery_log("ram")))
