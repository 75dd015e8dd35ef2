"""A malformed queue entry goes to `bad/`; it never stops a queue or re-sends the others.

Bad entries are written straight into a queue's `entries/` folder beside good
ones (what a clumsy tool, a full disk or a bit flip leaves): valid JSON of
the wrong shape, wrong types, huge values, invalid UTF-8, no envelope line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile

import pytest
from engine import Engine, route_conf, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtp_receivers import Receiver

from greenarrow.lib.core import remote_link
from greenarrow.lib.core.paths import Root
from greenarrow.lib.deliver.remote_worker import RemoteWorker
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.queue.scheduler import Scheduler, WorkerLink

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
            wait_until(lambda: engine.queued("ram") == [], 30, "the ram-queue emptied")
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


# -- the property: in-process scheduler, many examples --------------------------
#
# queue-send's Scheduler runs in this process with one link to a real
# RemoteWorker whose SMTP step only counts (`_deliver` overridden): the
# worker still reads each entry itself, as in the engine.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(list(queue_entry.ENVELOPE_FIELDS)) | st.text(max_size=8),
                      children, max_size=6),
    max_leaves=12,
)
# near misses: a good envelope with one key replaced by any JSON value, or dropped
NEAR_MISSES = st.builds(
    lambda key, value, drop: {k: v for k, v in {**envelope(0), key: value}.items()
                              if not (drop and k == key)},
    st.sampled_from(list(queue_entry.ENVELOPE_FIELDS)), JSON_VALUES, st.booleans(),
)
ENTRY_FILES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v, nl: json.dumps(v).encode() + (b"\n" + MESSAGE if nl else b""),
              JSON_VALUES | NEAR_MISSES, st.booleans()),
    st.builds(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")
              + b"\n" + MESSAGE, JSON_VALUES | NEAR_MISSES),
)


class CountingWorker(RemoteWorker):
    """A real worker (reads the entry, throttles, answers) whose SMTP step only counts."""

    def __init__(self, root: Root) -> None:
        super().__init__(root, 0)
        self.delivered: list[str] = []

    async def _deliver(self, job: dict, envelope: dict, message: bytes) -> dict:
        self.delivered.append(os.path.basename(job["path"]))
        return {"status": remote_link.SUCCESS, "text": "counted"}


class _Writer:
    def is_closing(self) -> bool:
        return False


class _Jobs:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)


async def run_queue(root: Root, swap: dict[str, bytes] | None = None, rounds: int = 50
                    ) -> list[str]:
    """Run the ram-queue's scheduler until it has nothing left to hand out; return the
    names the worker delivered. `swap`: contents written over entries after they were
    handed out and before the worker reads them."""
    scheduler = Scheduler(root, "ram")
    worker = CountingWorker(root)
    link = WorkerLink(0)
    link.writer, link.jobs = _Writer(), _Jobs()
    scheduler.links = [link]
    try:
        scheduler.rescan()
        for _ in range(rounds):
            scheduler.dispatch()
            lines, link.jobs.lines = link.jobs.lines, []
            if not lines:
                break
            results = []
            for line in lines:
                job = remote_link.decode(line)
                if swap and job["id"] in swap:
                    with open(job["path"], "wb") as f:
                        f.write(swap[job["id"]])
                result = await worker.attempt(job)  # raising here fails the test
                results.append({**result, "id": job["id"]})
            await scheduler.apply_results(results)
        else:
            raise AssertionError(f"still dispatching after {rounds} rounds")
    finally:
        scheduler.log.close()
    return worker.delivered


@pytest.fixture(scope="module")
def property_root():
    folder = tempfile.mkdtemp(prefix="bad-entries-")
    root = Root(os.path.join(folder, "hvmail"))
    init_root(root, me="engine.test")
    yield root
    shutil.rmtree(folder)


def _empty_queue(root: Root) -> None:
    for sub in ("entries", "tmp", "bad"):
        folder = root.queue("ram") / sub
        for name in os.listdir(folder):
            os.unlink(folder / name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(goods=st.integers(1, 4), files=st.lists(ENTRY_FILES, max_size=6),
       swapped=st.lists(ENTRY_FILES, max_size=2))
def test_no_entry_stops_the_scheduler_and_good_ones_go_once(property_root, goods, files, swapped):
    """Arbitrary bytes and JSON as entries beside good ones: the scheduler never raises,
    each good entry is delivered exactly once, and every other file is either delivered
    once (it happened to be a valid envelope) or moved unchanged to bad/, never both;
    nothing is left in entries/. `swapped`: good entries whose file turns bad between
    the scheduler's read and the worker's, answered `bad` by the worker."""
    root = property_root
    _empty_queue(root)
    queue = root.queue("ram")
    good = [queue_entry.commit(queue, [envelope(n, msguid=f"a{n:x}-1-0")], MESSAGE)[0]
            for n in range(goods)]
    others = dict(zip(write_bad(str(queue / "entries"), {str(i): data for i, data in
                                                         enumerate(files)}), files, strict=True))
    swap = dict(zip(good, swapped, strict=False))  # the first len(swapped) good ones
    delivered = asyncio.run(run_queue(root, swap))
    assert os.listdir(queue / "entries") == []
    assert os.listdir(queue / "tmp") == []
    in_bad = set(os.listdir(queue / "bad"))
    for name in good:
        if name in swap:  # bad/ unless the new content happens to be a valid envelope
            assert (name in in_bad) != (delivered.count(name) == 1), name
        else:
            assert delivered.count(name) == 1, name
    for name, data in others.items():
        assert (name in in_bad) != (delivered.count(name) == 1), name
        if name in in_bad:
            assert (queue / "bad" / name).read_bytes() == data
    assert len(delivered) == len(set(delivered))


def test_a_second_bad_entry_of_the_same_name_keeps_the_first(property_root):
    root = property_root
    _empty_queue(root)
    queue = root.queue("ram")
    name = queue_entry.entry_name("dup-0", 0, 0)
    for data in (b"null\n", b"[]\n"):
        (queue / "entries" / name).write_bytes(data)
        assert asyncio.run(run_queue(root)) == []
    assert (queue / "bad" / name).read_bytes() == b"null\n"
    assert (queue / "bad" / f"{name}.1").read_bytes() == b"[]\n"


def test_check_envelope_defaults_and_ignores_unknown_keys():
    checked = queue_entry.check_envelope({"sender": "", "recipient": "u@d.test", "future": [1]})
    assert checked == {"sender": "", "recipient": "u@d.test", "msguid": "", "sendid": "",
                       "listid": "", "mtaid": "", "mailclass": "", "instanceid": "",
                       "click_tracking_id": "", "injected_time": 0, "source_ip": ""}
    assert queue_entry.check_envelope(envelope(3)) == envelope(3)
    bounce = {**envelope(3), "bounce_level": 2, "dkim": "d.test:s1"}
    assert queue_entry.check_envelope(bounce) == bounce


# -- the queue tools -----------------------------------------------------------


def test_queue_tools_count_and_list_bad_entries_and_skip_bad_ones_in_entries(tmp_path):
    """`status` counts bad/; `list --bad` says what is wrong with each file; a bad entry
    still in entries/ (queue-send has not reached it) is skipped by status, list, filters
    and explain instead of crashing them."""
    from click.testing import CliRunner

    from greenarrow.bin.queue import queue_command
    from greenarrow.lib.ops.explain import explain

    engine = Engine(tmp_path, conf=route_conf({"dest.test": 9}))
    root = engine.root
    assert all((root.queue(q) / "bad").is_dir() for q in ("ram", "bounce", "disk"))  # by init
    queue = root.queue("disk")
    queue_entry.commit(queue, [envelope(1)], MESSAGE, durable=True)
    write_bad(str(queue / "entries"), {"list": BAD["list"], "mtaid": BAD["integer-mtaid"]})
    write_bad(str(queue / "bad"), {"null": BAD["null"], "empty": BAD["empty"]})
    os.symlink("/etc/passwd", queue / "bad" / "link-0.0.0")

    def run(*args: str) -> str:
        result = CliRunner().invoke(queue_command, list(args), env={"HVMAIL_ROOT": str(root.path)})
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    status = json.loads(run("status", "--json"))
    assert status["disk"]["bad"] == 3 and status["ram"]["bad"] == 0
    assert status["disk"]["top_domains"] == [["dest.test", 1]]
    assert "0 held, 3 bad" in run("status", "-q", "disk")
    rows = [json.loads(row) for row in run("list", "--json").splitlines()]
    assert [r["recipient"] for r in rows] == ["u1@dest.test"]
    assert [r["recipient"] for r in
            map(json.loads, run("list", "--json", "--domain", "dest.test").splitlines())] \
        == ["u1@dest.test"]
    bad_rows = [json.loads(row) for row in run("list", "--bad", "--json").splitlines()]
    assert {r["entry"]: r["problem"] for r in bad_rows} == {
        "bad0-null.0.0": "envelope is a JSON null, not an object",
        "bad1-empty.0.0": "queue entry is empty",
        "link-0.0.0": "queue entry is a symbolic link",
    }
    assert all(r["queue"] == "disk" for r in bad_rows)
    assert "envelope is a JSON null" in run("list", "--bad", "-q", "disk")
    assert run("list", "--bad", "-q", "ram") == ""
    refused = CliRunner().invoke(queue_command, ["list", "--bad", "--domain", "x"],
                                 env={"HVMAIL_ROOT": str(root.path)})
    assert refused.exit_code == 2 and "--bad takes no filter" in refused.output
    assert "disk-queue: 1 queued" in "\n".join(explain(root, "dest.test"))
    assert run("delete", "--all") == "delete: 3 entries\n"  # entries/ only; bad/ untouched
    assert len(os.listdir(queue / "bad")) == 3
