"""The bounce processor against a real PostgreSQL and real Maildirs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pg
import psycopg
import pytest

from greenarrow.lib.config import secret_constants
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events.types import FIELDS
from greenarrow.lib.feedback import processor_config
from greenarrow.lib.feedback.mailbox_processor import COULD_NOT_PROCESS, BounceProcessor
from greenarrow.lib.local.maildir import Maildir
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.routing import incoming
from greenarrow.lib.simplemh import return_path as bounce_address
from greenarrow.lib.simplemh import tracking_url

pg_conninfo = pg.pg_conninfo

DOMAIN = "bounces.test"
CONF = f"""general {{
  server_id test-server
  record_events all
}}
incoming_email_domain {DOMAIN} {{
  bounce_mailbox return
  spam_complaint_mailbox fbl
}}
lite_bounce_processor_address lite@{DOMAIN}
lite_fbl_processor_address litefbl@{DOMAIN}
lite_fbl_processor_headers X-Campaign, Message-ID
"""


def make_root(tmp_path: Path, conninfo: str, conf: str = CONF) -> Root:
    root = Root(tmp_path / "hvmail")
    init_root(root, me="mail.test")
    (root.control / "greenarrow.conf").write_text(conf + pg.database_conf(conninfo))
    return root


def constants(root: Root) -> tuple[str, str]:
    return secret_constants.read(root.control)


def maildir(root: Root, local: str) -> Maildir:
    return Maildir(incoming.maildir_path(str(root.path), DOMAIN, local))


def dsn(recipient: str, status: str = "5.1.1", diagnostic: str = "550 5.1.1 user unknown",
        mailer_info: str = "", return_path: str = "") -> bytes:
    original = ""
    if return_path:
        original += f"Return-Path: <{return_path}>\n"
    if mailer_info:
        original += f"X-Mailer-Info: {mailer_info}\n"
    original += f"To: {recipient}\nFrom: news@sender.test\nSubject: hello\n"
    return (
        "From: MAILER-DAEMON@mx.remote.test\n"
        "To: whoever\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n'
        "\n--B\nContent-Type: text/plain\n\nThe mail could not be delivered.\n"
        f"\n--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.remote.test\n\n"
        f"Final-Recipient: rfc822; {recipient}\nAction: failed\nStatus: {status}\n"
        f"Diagnostic-Code: smtp; {diagnostic}\n"
        f"\n--B\nContent-Type: text/rfc822-headers\n\n{original}\n--B--\n"
    ).encode()


def delivered(envelope: str, message: bytes) -> bytes:
    return f"Return-Path: <>\nDelivered-To: {envelope}\n".encode() + message


def events(conninfo: str, event_type: str | None = None) -> list[dict]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT event::text FROM events ORDER BY id").fetchall()
    found = [json.loads(r[0]) for r in rows]
    return [e for e in found if event_type is None or e["event_type"] == event_type]


def processor(root: Root) -> BounceProcessor:
    p = BounceProcessor(root)
    p.configure()
    return p


def run_passes(p: BounceProcessor, passes: int = 2) -> None:
    conn = p.connect()
    assert conn is not None
    try:
        for _ in range(passes):
            p.poll(conn)
    finally:
        conn.close()


def new_files(root: Root, local: str, sub: str = "new") -> list[str]:
    path = Path(incoming.maildir_path(str(root.path), DOMAIN, local)) / sub
    return sorted(os.listdir(path)) if path.exists() else []


def cnp_files(root: Root, local: str) -> list[str]:
    path = Path(incoming.maildir_path(str(root.path), DOMAIN, local)) / COULD_NOT_PROCESS / "new"
    return sorted(os.listdir(path)) if path.exists() else []


def test_async_bounce_with_encoded_address(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    address = bounce_address.encode(f"return@{DOMAIN}", "news42", "send7", "Bob@Example.com", c)
    info = tracking_url.encode(c, tracking_url.MAILER_INFO, "Bob@Example.com", "news42", "send7",
                               "weekly", "inst9", "click77")
    message = delivered(address, dsn("Bob@Example.com", mailer_info=info))
    maildir(root, "return").deliver(message)
    run_passes(processor(root))
    found = events(pg_conninfo)
    assert [e["event_type"] for e in found] == ["bounce_all", "bounce_bad_address"]
    bounce = found[0]
    assert list(bounce) == list(FIELDS["bounce_all"])
    assert bounce["email"] == "Bob@Example.com"
    assert (bounce["listid"], bounce["sendid"]) == ("news42", "send7")
    assert (bounce["mailclass"], bounce["instanceid"], bounce["click_tracking_id"]) == (
        "weekly", "inst9", "click77")
    assert bounce["bounce_type"] == "h" and bounce["bounce_code"] == 10
    assert bounce["synchronous"] is False
    assert bounce["server_id"] == "test-server"
    body = message.split(b"\n\n", 1)[1]
    assert bounce["bounce_text"] == body[:1024].decode()
    bad = found[1]
    assert list(bad) == list(FIELDS["bounce_bad_address"])
    assert {k: bad[k] for k in ("email", "listid", "sendid", "bounce_code", "bounce_text")} == {
        k: bounce[k] for k in ("email", "listid", "sendid", "bounce_code", "bounce_text")}
    assert new_files(root, "return") == []


def test_forged_and_tampered_addresses_are_not_trusted(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    good = bounce_address.encode(f"return@{DOMAIN}", "news42", "send7", "bob@example.com", c)
    tampered = good.replace("news42", "news43")
    forged = bounce_address.encode(f"return@{DOMAIN}", "news42", "send7", "bob@example.com",
                                   ("a" * 32, "b" * 32))
    box = maildir(root, "return")
    for address in (tampered, forged, f"return@{DOMAIN}"):
        box.deliver(delivered(address, dsn("bob@example.com")))
    box.deliver(b"\x00\xff garbage \x89PNG\r\n\x1a\n" * 100)
    box.deliver(b"Subject: hi\n\nnot a bounce at all\n")
    run_passes(processor(root))
    assert events(pg_conninfo) == []
    assert new_files(root, "return") == []
    assert len(cnp_files(root, "return")) == 5


def test_soft_bounces_cross_threshold_and_other_never(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    (root.control / processor_config.FILE).write_text(json.dumps(
        {"default": {"soft": {"count": 3, "days": 0}}}))
    c = constants(root)
    p = processor(root)
    box = maildir(root, "return")
    soft = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "full@example.com", c)
    other_list = bounce_address.encode(f"return@{DOMAIN}", "other", "s1", "full@example.com", c)
    for n in range(3):
        box.deliver(delivered(soft, dsn("full@example.com", "4.2.2", "452 4.2.2 mailbox full")))
        if n < 2:  # counted apart: two bounces on another list do not add up
            box.deliver(delivered(other_list, dsn("full@example.com", "4.2.2",
                                                  "452 4.2.2 mailbox full")))
        run_passes(p, 1)
        bad = events(pg_conninfo, "bounce_bad_address")
        assert len(bad) == (1 if n == 2 else 0), n
    assert bad[0]["listid"] == "news42" and bad[0]["bounce_type"] == "s"
    assert len(events(pg_conninfo, "bounce_all")) == 5
    # an auto-reply is 'o': never counted, however many
    auto = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "away@example.com", c)
    for _ in range(4):
        box.deliver(delivered(auto, (
            b"From: away@example.com\nSubject: Out of office\nAuto-Submitted: auto-replied\n\n"
            b"I am away until Monday.\n")))
    run_passes(p, 1)
    alls = [e for e in events(pg_conninfo, "bounce_all") if e["email"] == "away@example.com"]
    assert len(alls) == 4 and {e["bounce_type"] for e in alls} == {"o"}
    assert len(events(pg_conninfo, "bounce_bad_address")) == 1


def test_check_config(tmp_path):
    root = Root(tmp_path / "hvmail")
    init_root(root, me="mail.test")
    env = {**os.environ, "HVMAIL_ROOT": str(root.path)}

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "greenarrow.bin.hvmail_bounce_processor",
                               "--check-config"], env=env, capture_output=True, text=True,
                              timeout=60)

    assert check().returncode == 0  # absent: the defaults
    conf = root.control / processor_config.FILE
    conf.write_text('{"default": {"soft": {"count": 4, "days": 3}}, '
                    '"by_listid_prefix": {"trans": {"hard": {"count": 2}}}}')
    assert check().returncode == 0
    conf.write_text('{"default": {"soft": {"cuont": 4}}}')
    bad = check()
    assert bad.returncode == 1 and "cuont" in bad.stderr and processor_config.FILE in bad.stderr
    conf.write_text("{not json")
    assert check().returncode == 1


def test_listid_prefix_and_thresholds():
    assert [processor_config.listid_prefix(x) for x in ("foo100", "bar99baz", "99qux", "_foo")] \
        == ["foo", "bar", "99", ""]
    config = processor_config.parse(json.dumps({
        "default": {"soft": {"count": 4}},
        "by_listid_prefix": {"trans": {"soft": {"days": 2}}},
        "by_listid": {"trans7": {"hard": {"count": 3}}}}))
    t = config.thresholds("TRANS7")
    assert (t.soft.count, t.soft.days, t.hard.count) == (4, 2.0, 3)
    assert config.thresholds("news1").soft.days == processor_config.DEFAULTS.soft.days


def test_bad_config_stops_processing_and_nothing_is_lost(tmp_path, pg_conninfo, caplog):
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    conf = root.control / processor_config.FILE
    conf.write_text('{"defualt": {}}')
    p = processor(root)
    address = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "bob@example.com", c)
    maildir(root, "return").deliver(delivered(address, dsn("bob@example.com")))
    run_passes(p)
    assert len(new_files(root, "return")) == 1
    assert events(pg_conninfo) == []
    assert any("STOPPED" in r.message and "defualt" in r.message for r in caplog.records)
    conf.write_text('{"default": {}}')
    p.config_file.interval = 0  # the service re-checks every CONFIG_CHECK_SECONDS
    run_passes(p)
    assert new_files(root, "return") == []
    assert len(events(pg_conninfo, "bounce_all")) == 1


def test_replay_after_commit_gives_no_duplicate(tmp_path, pg_conninfo):
    """A crash between the commit and the unlink: the next pass only removes the file."""
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    address = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "bob@example.com", c)
    box = maildir(root, "return")
    name = box.deliver(delivered(address, dsn("bob@example.com")))
    path = Path(box.path) / "new" / name
    saved = path.read_bytes()
    stat = path.stat()
    run_passes(processor(root))
    assert len(events(pg_conninfo)) == 2
    path.write_bytes(saved)  # as if the unlink had never happened
    os.utime(path, (stat.st_atime, stat.st_mtime))
    run_passes(processor(root))
    assert len(events(pg_conninfo)) == 2
    assert not path.exists()
    with psycopg.connect(pg_conninfo) as conn:
        assert conn.execute("SELECT bounces FROM bounce_runs").fetchall() == [(1,)]


def test_service_killed_mid_stream_loses_and_doubles_nothing(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    box = maildir(root, "return")
    total = 60
    for n in range(total):
        address = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1",
                                        f"user{n}@example.com", c)
        box.deliver(delivered(address, dsn(f"user{n}@example.com")))
    env = {**os.environ, "HVMAIL_ROOT": str(root.path)}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "greenarrow.bin.hvmail_bounce_processor"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        start = len(new_files(root, "return"))
        while time.monotonic() < deadline and start - len(new_files(root, "return")) < 10 \
                and new_files(root, "return"):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    run_passes(processor(root))
    assert new_files(root, "return") == []
    alls = events(pg_conninfo, "bounce_all")
    assert sorted(e["email"] for e in alls) == sorted(f"user{n}@example.com"
                                                      for n in range(total))
    assert len(events(pg_conninfo, "bounce_bad_address")) == total


def test_large_bounce_is_processed(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    address = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "big@example.com", c)
    message = delivered(address, dsn("big@example.com")) + b"x" * 76 + b"\n"
    message += (b"y" * 76 + b"\n") * (50 * 1024 * 1024 // 77)
    maildir(root, "return").deliver(message)
    run_passes(processor(root))
    assert [e["email"] for e in events(pg_conninfo, "bounce_all")] == ["big@example.com"]
    assert new_files(root, "return") == []


@pytest.mark.parametrize("days,size,kept", [(31, 10, 1), (1, 300 << 20, 1)])
def test_could_not_process_is_pruned(tmp_path, days, size, kept):
    from greenarrow.lib.feedback.mailbox_processor import (
        could_not_process_dir,
        prune_could_not_process,
    )
    box = incoming.Mailbox(DOMAIN, "return", incoming.BOUNCE,
                           incoming.maildir_path(str(tmp_path), DOMAIN, "return"))
    folder = Path(could_not_process_dir(box)) / "new"
    folder.mkdir(parents=True)
    now = time.time()
    old, recent = folder / "old", folder / "recent"
    with open(old, "wb") as f:
        f.truncate(size)
    recent.write_bytes(b"x")
    os.utime(old, (now - days * 86400, now - days * 86400))
    assert prune_could_not_process(box, now) == 1
    assert sorted(os.listdir(folder)) == ["recent"][:kept]


def test_value_postgresql_refuses_goes_to_could_not_process(tmp_path, pg_conninfo):
    """A signed address whose recipient holds a NUL byte: refused alone, the rest goes on."""
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    box = maildir(root, "return")
    nul = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "a\x00b@example.com", c)
    box.deliver(delivered(nul, dsn("ab@example.com")))
    good = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "ok@example.com", c)
    box.deliver(delivered(good, dsn("ok@example.com")))
    run_passes(processor(root))
    assert [e["email"] for e in events(pg_conninfo, "bounce_all")] == ["ok@example.com"]
    assert new_files(root, "return") == []
    assert len(cnp_files(root, "return")) == 1


def test_service_resumes_when_the_config_is_fixed(tmp_path, pg_conninfo):
    """The running service stops on a bad bounce_processor.conf and re-reads it by itself."""
    root = make_root(tmp_path, pg_conninfo)
    conf = root.control / processor_config.FILE
    conf.write_text('{"default": {"hard": {"count": 0}}}')
    address = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "bob@example.com",
                                    constants(root))
    maildir(root, "return").deliver(delivered(address, dsn("bob@example.com")))
    env = {**os.environ, "HVMAIL_ROOT": str(root.path)}
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "greenarrow.bin.hvmail_bounce_processor"],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"STOPPED" not in log_path.read_bytes():
            time.sleep(0.1)
        assert b"count must be 1 or more" in log_path.read_bytes()
        assert len(new_files(root, "return")) == 1
        conf.write_text('{"default": {"hard": {"count": 1}}}')
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and new_files(root, "return"):
            time.sleep(0.1)
        assert new_files(root, "return") == []
        assert len(events(pg_conninfo, "bounce_all")) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
