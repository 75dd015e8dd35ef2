"""A malformed queue entry goes to `bad/`; it never stops a queue or re-sends the others.

Bad entries are written straight into a queue's `entries/` folder beside good
ones (what a clumsy tool, a full disk or a bit flip leaves): valid JSON of
the wrong shape, wrong types, huge values, invalid UTF-8, no envelope line.
"""

from __future__ import annotations

import json
import os

from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.lib import queue_entry

GOOD = 5


def envelope(n: int, **changes: object) -> dict:
    env = {"sender": "s@origin.test", "recipient": f"u{n}@dest.test", "msguid": f"a{n:x}-1-0",
           "sendid": "s1", "listid": "", "mtaid": "", "mailclass": "", "instanceid": "",
           "click_tracking_id": "", "injected_time": 1_700_000_000, "source_ip": ""}
    env.update(changes)
    return env


def line(env: object) -> bytes:
    return json.dumps(env).encode()


MESSAGE = b"Subject: t\r\n\r\nbody\r\n"

# name -> the whole file
BAD = {
    "list": b"[1,2,3]\n" + MESSAGE,
    "null": b"null\n" + MESSAGE,
    "empty-object": b"{}\n" + MESSAGE,
    "string": b'"hello"\n' + MESSAGE,
    "number-recipient": line(envelope(0, recipient=12345)) + b"\n" + MESSAGE,
    "integer-mtaid": line(envelope(0, mtaid=7)) + b"\n" + MESSAGE,
    "list-sender": line(envelope(0, sender=["a@b.test"])) + b"\n" + MESSAGE,
    "no-recipient": line({"sender": "s@origin.test"}) + b"\n" + MESSAGE,
    "string-injected-time": line(envelope(0, injected_time="yesterday")) + b"\n" + MESSAGE,
    "bool-bounce-level": line(envelope(0, bounce_level=True)) + b"\n" + MESSAGE,
    "crlf-in-recipient": line(envelope(0, recipient="x@dest.test\r\nRCPT TO:<y@dest.test>"))
    + b"\n" + MESSAGE,
    "huge-recipient": line(envelope(0, recipient="x" * 1_000_000 + "@dest.test")) + b"\n" + MESSAGE,
    "long-recipient": line(envelope(0, recipient="x" * 5000 + "@dest.test")) + b"\n" + MESSAGE,
    "long-listid": line(envelope(0, listid="l" * 50_000)) + b"\n" + MESSAGE,
    "lone-surrogate": line(envelope(0, sendid="\udc80")) + b"\n" + MESSAGE,
    "huge-line": b'{"sender": "' + b"x" * 300_000 + b'"}',
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000 + b"\n" + MESSAGE,
    "nesting": b"[" * 20_000 + b"]" * 20_000 + b"\n" + MESSAGE,
    "huge-integer": b'{"sender": "", "recipient": "u@dest.test", "injected_time": '
    + b"9" * 5000 + b"}\n" + MESSAGE,
    "float-time": line(envelope(0, injected_time=1.5e9)) + b"\n" + MESSAGE,
    "negative-time": line(envelope(0, injected_time=-1)) + b"\n" + MESSAGE,
    "invalid-utf8": b'{"sender": "\xff\xfe", "recipient": "u@dest.test"}\n' + MESSAGE,
    "not-json": b"sender=s@origin.test\n" + MESSAGE,
    "no-newline": line(envelope(0)),
    "empty": b"",
}


def write_bad(entries_dir: str, files: dict[str, bytes]) -> list[str]:
    names = []
    for n, (label, data) in enumerate(files.items()):
        name = queue_entry.entry_name(f"bad{n:x}-{label}", 0, 0)
        with open(os.path.join(entries_dir, name), "wb") as f:
            f.write(data)
        names.append(name)
    return names


def test_bad_entries_go_to_bad_and_good_ones_are_delivered_once(tmp_path):
    with Receiver() as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}))
        queue = engine.root.queue("ram")
        entries_dir = str(queue / "entries")
        for n in range(GOOD):
            queue_entry.commit(queue, [envelope(n)], MESSAGE)
        bad = write_bad(entries_dir, BAD)
        with engine:
            sender_pid = engine.service_pid("queue-send-ram")
            bad_dir = queue / "bad"
            wait_until(lambda: bad_dir.is_dir() and len(os.listdir(bad_dir)) == len(bad), 60,
                       "every bad entry moved to bad/")
            wait_until(lambda: len(rx.messages) >= GOOD, 60, "the good entries delivered")
            # more good mail after the bad entries: the queue carries on
            result = engine.sendmail("-f", "s@origin.test", "late@dest.test",
                                     message=b"Subject: late\n\nx\n")
            assert result.returncode == 0, result.stderr
            wait_until(lambda: len(rx.messages) >= GOOD + 1, 60, "the late message")
            assert engine.service_pid("queue-send-ram") == sender_pid  # never restarted
            assert engine.queued("ram") == []
        assert sorted(os.listdir(bad_dir)) == sorted(bad)
        for name in bad:  # moved unchanged
            label = name.split("-", 1)[1].rsplit(".", 2)[0]
            assert (bad_dir / name).read_bytes() == BAD[label]
        recipients = sorted(m.recipients[0] for m in rx.messages)
        assert recipients == sorted([f"u{n}@dest.test" for n in range(GOOD)] + ["late@dest.test"])
        log = (engine.root.log / "queue-send-ram" / "current").read_text() \
            if (engine.root.log / "queue-send-ram" / "current").exists() else ""
        for name in bad:
            assert sum(1 for row in log.splitlines() if name in row and "bad/" in row) == 1, name
