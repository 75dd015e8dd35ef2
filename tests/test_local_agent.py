"""The local agent's delivery function and its tmp/ cleaning, on real files."""

from __future__ import annotations

import os
import time

from greenarrow.lib.core import remote_link
from greenarrow.lib.core.paths import Root
from greenarrow.lib.local.agent import STALE_TMP_SECONDS, LocalAgent, clean_stale_tmp
from greenarrow.lib.queue import entry as queue_entry


def entry(tmp_path, sender: str = "a@remote.test", recipient: str = "Return@b.example") -> str:
    envelope = {"sender": sender, "recipient": recipient, "msguid": "m1", "injected_time": 1}
    path = tmp_path / "entry"
    path.write_bytes(queue_entry.envelope_line(envelope) + b"\n" + b"Subject: hi\r\n\r\nline 1\r\nline 2\r\n")
    return str(path)


def test_files_the_message_with_trace_lines_and_lf(tmp_path) -> None:
    agent = LocalAgent(Root(tmp_path))
    box = str(tmp_path / "maildata" / "b.example" / "return") + "/"
    result = agent.deliver(entry(tmp_path), box)
    assert result["status"] == remote_link.SUCCESS
    (name,) = os.listdir(box + "new")
    assert result["text"] == f"delivered to {box}new/{name}"
    assert (tmp_path / "maildata/b.example/return/new" / name).read_bytes() == (
        b"Return-Path: <a@remote.test>\nDelivered-To: Return@b.example\n"
        b"Subject: hi\n\nline 1\nline 2\n")
    assert os.listdir(box + "tmp") == []
    agent.deliver(entry(tmp_path, sender=""), box)
    assert len(os.listdir(box + "new")) == 2


def test_write_error_is_a_deferral_and_the_next_attempt_recovers(tmp_path) -> None:
    agent = LocalAgent(Root(tmp_path))
    box = tmp_path / "maildata" / "b.example" / "return"
    box.parent.mkdir(parents=True)
    box.write_text("in the way")
    result = agent.deliver(entry(tmp_path), str(box) + "/")
    assert result["status"] == remote_link.DEFERRAL
    assert result["text"].startswith(f"cannot write to Maildir {box}/: ")
    box.unlink()
    assert agent.deliver(entry(tmp_path), str(box) + "/")["status"] == remote_link.SUCCESS
    os.rename(box, tmp_path / "moved")  # a cached Maildir whose folder went away
    assert agent.deliver(entry(tmp_path), str(box) + "/")["status"] == remote_link.DEFERRAL
    assert agent.deliver(entry(tmp_path), str(box) + "/")["status"] == remote_link.SUCCESS


def test_missing_and_bad_entries(tmp_path) -> None:
    agent = LocalAgent(Root(tmp_path))
    box = str(tmp_path / "maildata" / "b.example" / "x") + "/"
    assert agent.deliver(str(tmp_path / "nothing"), box)["status"] == remote_link.MISSING
    (tmp_path / "bad").write_bytes(b"not json\nSubject: x\r\n\r\n")
    assert agent.deliver(str(tmp_path / "bad"), box)["status"] == remote_link.BAD
    assert not os.path.exists(box)


def test_clean_stale_tmp_removes_only_old_tmp_files(tmp_path) -> None:
    maildata = tmp_path / "maildata"
    tmp = maildata / "b.example" / "return" / "tmp"
    new = maildata / "b.example" / "return" / "new"
    tmp.mkdir(parents=True)
    new.mkdir()
    old_time = time.time() - STALE_TMP_SECONDS - 60
    for path in (tmp / "old", tmp / "fresh", new / "old-but-delivered"):
        path.write_text("x")
    os.utime(tmp / "old", (old_time, old_time))
    os.utime(new / "old-but-delivered", (old_time, old_time))
    assert clean_stale_tmp(str(maildata)) == 1
    assert sorted(os.listdir(tmp)) == ["fresh"]
    assert os.listdir(new) == ["old-but-delivered"]
    assert clean_stale_tmp(str(tmp_path / "absent")) == 0
