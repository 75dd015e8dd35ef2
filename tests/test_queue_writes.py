"""A queue write that fails part-way removes its partial file from tmp/ at once.

Every write under a queue's tmp/ goes through queue_entry.place (injection,
moves to the disk-queue, bounces). The failures are real: a file size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored so the write answers EFBIG) in a child
process, and, as root, a tmpfs too small for the message (ENOSPC).
"""

from __future__ import annotations

import os
import resource
import signal
import smtplib
import subprocess
import sys

import pytest
from engine import Engine, route_conf

from greenarrow.lib.queue import entry as queue_entry

LIMIT = 16384  # bytes: the most a child may write to one file
BIG = b"Subject: big\n\n" + (b"y" * 76 + b"\n") * 2600  # ~200 KB


def _small_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death (kept across exec)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_sendmail_write_failing_part_way_leaves_nothing_in_tmp(tmp_path):
    engine = Engine(tmp_path)
    queue = engine.root.queue("ram")
    result = subprocess.run([str(engine.root.bin / "sendmail"), "-f", "s@origin.test",
                             "a@dest.test", "b@dest.test"], input=BIG, capture_output=True,
                            env=engine.env, timeout=60, preexec_fn=_small_files)
    assert result.returncode == 111, result.stderr  # temporary failure: try again later
    assert b"cannot write to the queue" in result.stderr
    assert listing(queue / "tmp") == []
    assert listing(queue / "entries") == []
    # the same message goes through without the limit
    result = subprocess.run([str(engine.root.bin / "sendmail"), "-f", "s@origin.test",
                             "a@dest.test"], input=BIG, capture_output=True, env=engine.env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(listing(queue / "entries")) == 1 and listing(queue / "tmp") == []


MOVE = """
import sys
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.queue import moves as queue_moves
root, src, name = sys.argv[1:4]
try:
    queue_moves.move_entries(root, [(src, name)])
except queue_entry.QueueWriteError as e:
    print("QueueWriteError:", e)
    sys.exit(75)
"""


def test_move_to_disk_failing_part_way_leaves_nothing_in_tmp(tmp_path):
    """A deferred entry's move to the (durable) disk-queue fails: the copy's partial file
    goes, the original stays."""
    engine = Engine(tmp_path)
    env = {"sender": "s@origin.test", "recipient": "u@dest.test", "msguid": "abc-1-0",
           "injected_time": 1_700_000_000}
    name, = queue_entry.commit(engine.root.queue("ram"), [env], BIG.replace(b"\n", b"\r\n"))
    src = str(engine.root.queue("ram") / "entries" / name)
    moved = queue_entry.entry_name("abc-1-0-0", 1, 1_700_000_100)
    result = subprocess.run([sys.executable, "-c", MOVE, str(engine.root.path), src, moved],
                            capture_output=True, timeout=60, preexec_fn=_small_files)
    assert result.returncode == 75, result.stderr
    assert b"File too large" in result.stdout
    disk = engine.root.queue("disk")
    assert listing(disk / "tmp") == [] and listing(disk / "entries") == []
    assert os.path.exists(src)


def test_place_removes_the_file_an_exception_interrupted(tmp_path):
    """Not only OSError: whatever stops a write part-way (here a chunk that is not bytes,
    after the first was written) leaves no file behind."""
    queue_dir = tmp_path / "q"
    queue_entry.ensure_queue_dirs(queue_dir)
    with pytest.raises(TypeError):
        queue_entry.place(queue_dir, [("a-0.0.0", [b"{}\n", b"x" * 100_000]),
                                      ("a-1.0.0", [b"{}\n", "not bytes"])])
    assert listing(queue_dir / "tmp") == [] and listing(queue_dir / "entries") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_smtp_message_larger_than_the_queue_gets_451_and_leaves_nothing(tmp_path):
    """The ram-queue on a 64 KB tmpfs: a 200 KB message over SMTP is refused for now
    (ENOSPC part-way), and tmp/ is empty right after the answer."""
    engine = Engine(tmp_path, conf=route_conf({"dest.test": 9}))
    queue = engine.root.queue("ram")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(queue)],
                   check=True)
    try:
        queue_entry.ensure_queue_dirs(queue)
        with engine:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    smtp.sendmail("s@origin.test", ["u@dest.test"], BIG.replace(b"\n", b"\r\n"))
                assert 400 <= refused.value.smtp_code < 500
                assert listing(queue / "tmp") == []
                assert listing(queue / "entries") == []
                smtp.sendmail("s@origin.test", ["u@dest.test"], b"Subject: small\r\n\r\nx\r\n")
                assert listing(queue / "tmp") == []
    finally:
        subprocess.run(["umount", str(queue)], check=False)
