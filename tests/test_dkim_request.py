"""X-GreenArrow-DKIM at injection: honoured for SimpleMH mail, stripped and ignored otherwise."""

from __future__ import annotations

import os

import pytest

from greenarrow.bin.inject import inject
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject.accept import InjectionError
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry


@pytest.fixture
def root(tmp_path):
    root = Root(tmp_path)
    init_root(root, me="inject.test")
    (root.control / "greenarrow.conf").write_text("mail_class news {\n  listid news\n}\n")
    return root


def queued(root: Root) -> list[tuple[dict, bytes]]:
    folder = root.queue("ram") / "entries"
    return [queue_entry.read_entry(folder / name) for name in sorted(os.listdir(folder))]


def send(root: Root, headers: str) -> None:
    message = f"From: a@origin.test\nTo: u@dest.test\n{headers}Subject: s\n\nhello\n".encode()
    inject(["-f", "a@origin.test", "u@dest.test"], message, {"HVMAIL_ROOT": str(root.path)})


def test_simplemh_mail_carries_its_dkim_request(root):
    send(root, "X-GreenArrow-MailClass: news\n"
               'X-GreenArrow-DKIM: [{"domain": "origin.test", "selector": "s1"},\n'
               ' {"domain": "Example.ORG"}]\n')
    (envelope, message), = queued(root)
    assert envelope["dkim"] == "origin.test:s1,example.org:default"
    assert b"X-GreenArrow-DKIM" not in message


def test_raw_injection_ignores_and_strips_it(root):
    send(root, 'X-GreenArrow-DKIM: {"domain": "origin.test"}\n')
    (envelope, message), = queued(root)
    assert "dkim" not in envelope
    assert b"X-GreenArrow-DKIM" not in message


def test_a_bad_request_is_a_permanent_error_naming_the_header(root):
    with pytest.raises(InjectionError) as e:
        send(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-DKIM: {not json}\n")
    assert e.value.permanent and "X-GreenArrow-DKIM" in e.value.text
    assert queued(root) == []
