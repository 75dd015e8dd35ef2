"""Bad-address suppression: the processors keep var/bad_addresses, SimpleMH injection reads it."""

from __future__ import annotations

import random
from pathlib import Path

import pg
import psycopg
import pytest
from test_bounce_processor import (
    DOMAIN,
    constants,
    delivered,
    dsn,
    maildir,
    make_root,
    processor,
    run_passes,
)
from test_complaint_processor import arf

from greenarrow.bin.inject import inject
from greenarrow.lib.core import bad_addresses
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events import store
from greenarrow.lib.events.types import make_event
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.simplemh import mail_class, tracking_url
from greenarrow.lib.simplemh import return_path as bounce_address

pg_conninfo = pg.pg_conninfo


def test_lookup_finds_exactly_the_written_pairs(tmp_path):
    root = str(tmp_path)
    (tmp_path / "var").mkdir()
    rng = random.Random(7)
    pairs = {(f"u{rng.randrange(10**6)}@d{rng.randrange(40)}.test", f"l{rng.randrange(20)}")
             for _ in range(3000)}
    assert bad_addresses.write(root, pairs) == len(pairs)
    table = bad_addresses.BadAddresses(root)
    assert all(table.contains(e.upper(), listid) for e, listid in pairs)
    for _ in range(3000):
        probe = (f"u{rng.randrange(10**6)}@d{rng.randrange(40)}.test", f"l{rng.randrange(20)}")
        assert table.contains(*probe) == (probe in pairs)
    bad_addresses.write(root, [("one@x.test", "")])  # replaced: seen at the next lookup
    assert table.contains("one@x.test", "") and not table.contains(*next(iter(pairs)))
    bad_addresses.write(root, [])
    assert not table.contains("one@x.test", "")


def test_processors_keep_the_file_in_step(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    c = constants(root)
    hard = bounce_address.encode(f"return@{DOMAIN}", "news42", "s1", "Gone@Example.com", c)
    maildir(root, "return").deliver(delivered(hard, dsn("Gone@Example.com")))
    info = tracking_url.encode(c, tracking_url.MAILER_INFO, "angry@example.com", "news42", "s1")
    maildir(root, "fbl").deliver(delivered(f"fbl@{DOMAIN}",
                                           arf(f"X-Mailer-Info: {info}\nTo: angry@example.com\n")))
    with psycopg.connect(pg_conninfo) as conn:
        p = processor(root)
        run_passes(p, 1)  # migrates the database
        store.insert_events(conn, [make_event("engine_unsub", 1_700_000_000, "t", "u1",
                                              email="Quit@Example.com", listid="News42")])
        conn.commit()
    run_passes(p, 1)
    table = bad_addresses.BadAddresses(str(root.path))
    assert table.contains("gone@example.com", "news42")
    assert table.contains("angry@example.com", "news42")
    assert table.contains("quit@example.com", "news42")
    assert not table.contains("gone@example.com", "other")
    text = (root.var / bad_addresses.FILE).read_text()
    assert text == "".join(sorted(f"news42\t{a}@example.com\n" for a in ("gone", "angry", "quit")))


CONF = """\
mail_class news {
    listid news42
    bounce_address bounce@bounces.example.com
    bad_address_suppression yes
}
mail_class other {
    listid news42
    bounce_address bounce@bounces.example.com
}
"""


@pytest.fixture
def smh_root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "smh")
    init_root(r, "smh.test")
    (r.control / "greenarrow.conf").write_text(CONF)
    mail_class._memo.clear()
    bad_addresses.write(str(r.path), [("gone@example.com", "news42")])
    return r


def queued(root: Root, mailclass: str, recipients: tuple[str, ...]) -> list[dict]:
    message = (f"From: s@origin.test\nTo: {recipients[0]}\nSubject: hi\n"
               f"X-GreenArrow-MailClass: {mailclass}\n\nhello\n").encode()
    inject(["-f", "s@origin.test", *recipients], message,
           {"HVMAIL_ROOT": str(root.path), "USER": "alice"})
    out = []
    for path in sorted((root.queue("ram") / "entries").iterdir()):
        out.append(queue_entry.read_entry(path)[0])
        path.unlink()
    return out


def test_injection_sends_suppressed_recipients_to_dev_null(smh_root):
    envs = queued(smh_root, "news", ("Gone@Example.com", "fine@example.com"))
    assert sorted(e["recipient"] for e in envs) == [
        "Gone@badaddress.discardallmail.drh.net", "fine@example.com"]
    # a Mail Class that does not ask for it leaves the address alone
    envs = queued(smh_root, "other", ("gone@example.com",))
    assert [e["recipient"] for e in envs] == ["gone@example.com"]


def test_dev_null_domain_is_configurable(smh_root):
    (smh_root.control / "greenarrow.conf").write_text(
        "general {\n    simplemh_bad_address_dev_null_domain discard.example.net\n}\n" + CONF)
    envs = queued(smh_root, "news", ("gone@example.com",))
    assert [e["recipient"] for e in envs] == ["gone@discard.example.net"]
