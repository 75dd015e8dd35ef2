"""greenarrow.conf's incoming mail: the schema, mailboxes() and find()."""

from __future__ import annotations

import pytest

from greenarrow.lib.config import conf
from greenarrow.lib.routing import incoming
from greenarrow.lib.simplemh import return_path as bounce_address

CONF = """
incoming_email_domain Bounces.Example.com {
    bounce_mailbox return
    spam_complaint_mailbox fbl
    mailbox postmaster
    mailbox Abuse
}
lite_bounce_processor_address lite-bounces@bounces.example.com
general {
    lite_fbl_processor_address lite-fbl@other.example
}
"""
CONSTANTS = ("ab" * 16, "cd" * 16)


@pytest.fixture
def c() -> conf.Block:
    return conf.parse(CONF)


def test_mailboxes_in_file_order_with_implicit_postmaster(c: conf.Block) -> None:
    boxes = incoming.mailboxes("/r", c)
    assert [(b.address, b.kind) for b in boxes] == [
        ("return@bounces.example.com", "bounce"),
        ("fbl@bounces.example.com", "spam_complaint"),
        ("postmaster@bounces.example.com", "mailbox"),
        ("abuse@bounces.example.com", "mailbox"),
        ("lite-bounces@bounces.example.com", "lite_bounce"),
        ("lite-fbl@other.example", "lite_fbl"),
        ("postmaster@other.example", "mailbox"),
    ]
    assert boxes[0].path == "/r/maildata/bounces.example.com/return/"
    assert incoming.incoming_domains(c) == {"bounces.example.com", "other.example"}


@pytest.mark.parametrize(
    "address, expected",
    [
        ("RETURN@Bounces.Example.COM", "return"),
        ("<fbl@bounces.example.com>", "fbl"),
        ("abuse@bounces.example.com", "abuse"),
        ("postmaster", "postmaster@bounces.example.com"),
        ("PostMaster@other.example", "postmaster@other.example"),
        ("lite-bounces-anything-here@bounces.example.com", "lite-bounces"),
        ("other@bounces.example.com", None),
        ("return-notencoded@bounces.example.com", None),
        ("fbl-x@bounces.example.com", None),
        ("return@elsewhere.example", None),
        ("nobody", None),
    ],
)
def test_find(c: conf.Block, address: str, expected: str | None) -> None:
    box = incoming.find("/r", c, address)
    if expected is None:
        assert box is None
    elif "@" in expected:
        assert box is not None and box.address == expected
    else:
        assert box is not None and box.local == expected


def test_encoded_bounce_address_finds_its_bounce_mailbox(c: conf.Block) -> None:
    for recipient in ("Bob@x.com", "x" * 60 + "@long.example"):  # full and short forms
        address = bounce_address.encode("return@bounces.example.com", "L1", "s1", recipient,
                                        CONSTANTS)
        box = incoming.find("/r", c, address.upper())
        assert box is not None and box.kind == "bounce", address


def test_sync_bounce_mailbox(c: conf.Block) -> None:
    """Whose failures the bounce processor records from the delivery log (and so queue-send
    mails no bounce message for): encoded bounce addresses and lite bounce addresses."""
    encoded = bounce_address.encode("return@bounces.example.com", "L1", "s1", "bob@x.com",
                                    CONSTANTS)
    assert incoming.sync_bounce_mailbox("/r", c, encoded).local == "return"
    assert incoming.sync_bounce_mailbox("/r", c, "lite-bounces-x@bounces.example.com"
                                        ).kind == "lite_bounce"
    assert incoming.sync_bounce_mailbox("/r", c, "lite-bounces@bounces.example.com"
                                        ).kind == "lite_bounce"
    for sender in ("", "return@bounces.example.com", "fbl@bounces.example.com",
                   "postmaster@bounces.example.com", "news@origin.test",
                   "return-notencoded@bounces.example.com"):
        assert incoming.sync_bounce_mailbox("/r", c, sender) is None, sender
    # no database: no processor reads the logs, the bounce message is still mailed
    without = conf.parse(CONF + "general {\n    events_database_url none\n}\n")
    assert incoming.sync_bounce_mailbox("/r", without, encoded) is None


def test_bare_postmaster_without_incoming_domain_uses_me(tmp_path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.example.net\n")
    box = incoming.find(str(tmp_path), conf.parse(""), "postmaster")
    assert box is not None
    assert box.path == f"{tmp_path}/maildata/mx.example.net/postmaster/"
    assert incoming.find(str(tmp_path), conf.parse(""), "PostMaster@mx.example.net") == box
    assert incoming.find(str(tmp_path), conf.parse(""), "postmaster@other.example") is None
    assert incoming.find(str(tmp_path), conf.parse(""), "abuse@mx.example.net") is None


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("incoming_email_domain *.a.com {\n}\n", 1, "not a pattern"),
        ("incoming_email_domain a.com {\n  mailbox a/b\n}\n", 2, "'/' is not allowed"),
        ("incoming_email_domain a.com {\n  mailbox a..b\n}\n", 2, "bad local part"),
        ("incoming_email_domain a.com {\n  bounce_mailbox x y\n}\n", 2, "takes 1 argument"),
        ("general {\n  lite_bounce_processor_address nodomain\n}\n", 2, "bad address"),
        ("mailbox x\n", 1, "not allowed at top level"),
    ],
)
def test_schema_errors_name_the_line(text: str, line: int, what: str) -> None:
    with pytest.raises(conf.ConfError) as e:
        conf.parse(text)
    assert e.value.line == line and what in e.value.what


def test_local_part_twice_is_an_error_with_both_lines() -> None:
    c = conf.parse("incoming_email_domain a.com {\n mailbox x\n}\n"
                   "incoming_email_domain A.com {\n bounce_mailbox X\n}\n")
    with pytest.raises(conf.ConfError) as e:
        incoming.mailboxes("/r", c)
    assert e.value.line == 5 and "first at line 2" in e.value.what
