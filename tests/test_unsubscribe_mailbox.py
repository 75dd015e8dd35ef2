"""mailto: unsubscribe requests (greenarrow.lib.tracker.unsubscribe_mailbox, docs/tracker.md).

Routing of the unsubscribe form of an encoded bounce address to the domain's
unsubscribe_mailbox, and the processor's events: every field from the
subject's DATA, the same id as the one-click POST of the same message, the
address alone when the subject was dropped, and refusals that record nothing.
The whole path through smtpd is in test_tracker_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.config import secret_constants
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.routing import incoming
from greenarrow.lib.simplemh import return_path as ba
from greenarrow.lib.simplemh import tracking_url as tu
from greenarrow.lib.tracker import answer
from greenarrow.lib.tracker.spool import read_events
from greenarrow.lib.tracker.unsubscribe_mailbox import (
    COULD_NOT_PROCESS,
    SPOOL,
    UnsubscribeProcessor,
)

CONF = """incoming_email_domain bounces.test {
  bounce_mailbox return
  unsubscribe_mailbox unsub
}
"""
IDS = ("ann@dest.test", "t100", "news-1", "news", "i1", "ct-1")


@pytest.fixture
def root(tmp_path: Path) -> Root:
    root = Root(tmp_path / "hvmail")
    init_root(root, me="mail.test")
    (root.control / "greenarrow.conf").write_text(CONF)
    return root


def _address(root: Root, unsubscribe: bool = True) -> str:
    return ba.encode("return@bounces.test", IDS[1], IDS[2], IDS[0],
                     secret_constants.read(root.control), unsubscribe=unsubscribe)


def _deliver(root: Root, address: str, subject: str, name: str = "1.a.host") -> Path:
    box = incoming.find(str(root.path), conflib.load_root(root), address)
    assert box is not None
    new = Path(box.path) / "new"
    new.mkdir(parents=True, exist_ok=True)
    for sub in ("tmp", "cur"):
        (Path(box.path) / sub).mkdir(exist_ok=True)
    (new / name).write_bytes(f"Return-Path: <x@y.test>\nDelivered-To: {address}\n"
                             f"From: x@y.test\nSubject: {subject}\n\nplease\n".encode())
    return Path(box.path)


def test_unsubscribe_requests_go_to_the_unsubscribe_mailbox(root: Root) -> None:
    tree = conflib.load_root(root)
    unsub = incoming.find(str(root.path), tree, _address(root))
    bounce = incoming.find(str(root.path), tree, _address(root, unsubscribe=False))
    assert (unsub.kind, unsub.local) == (incoming.UNSUBSCRIBE, "unsub")
    assert (bounce.kind, bounce.local) == (incoming.BOUNCE, "return")
    # without the directive, the request goes to the bounce mailbox as before
    (root.control / "greenarrow.conf").write_text(CONF.replace("  unsubscribe_mailbox unsub\n",
                                                               ""))
    tree = conflib.load_root(root)
    assert incoming.find(str(root.path), tree, _address(root)).kind == incoming.BOUNCE


def test_request_with_the_subject_gives_every_field_and_the_one_click_id(root: Root) -> None:
    constants = secret_constants.read(root.control)
    data = tu.encode(constants, tu.LIST_UNSUBSCRIBE, *IDS)
    box = _deliver(root, _address(root), f"unsubscribe-{data}")
    processor = UnsubscribeProcessor(root)
    assert processor.run_once() == 1
    (event,) = read_events(root.log / "events" / SPOOL)
    one_click = answer.unsub_event(tu.decode(data, constants), "mail.test", 0, data, "")
    assert event["event_unique_id"] == one_click["event_unique_id"]
    assert (event["event_type"], event["email"], event["listid"], event["sendid"],
            event["mailclass"], event["instanceid"], event["click_tracking_id"],
            event["click_url"], event["server_id"]) == ("engine_unsub", *IDS, "", "mail.test")
    assert not list((box / "new").iterdir())  # taken
    # the same request again (a second mail, or a crash before the unlink): the same id
    _deliver(root, _address(root), f"Re: unsubscribe-{data}", name="2.b.host")
    assert processor.run_once() == 1
    ids = {e["event_unique_id"] for e in read_events(root.log / "events" / SPOOL)}
    assert ids == {event["event_unique_id"]}
    processor.close()


def test_request_without_the_subject_is_read_from_the_address(root: Root) -> None:
    _deliver(root, _address(root), "unsubscribe")
    processor = UnsubscribeProcessor(root)
    assert processor.run_once() == 1
    (event,) = read_events(root.log / "events" / SPOOL)
    assert (event["email"], event["listid"], event["sendid"], event["click_url"]) == (
        *IDS[:3], "")
    processor.close()


def test_what_is_not_a_request_made_here_is_refused_and_records_nothing(root: Root) -> None:
    address = _address(root)
    local, _, domain = address.partition("@")
    forged = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    box = _deliver(root, forged, "unsubscribe", name="1.forged")
    (box / "new" / "2.plain").write_bytes(b"From: x@y.test\nSubject: hi\n\nno Delivered-To\n")
    processor = UnsubscribeProcessor(root)
    assert processor.run_once() == 2
    assert processor.refused == 2 and processor.recorded == 0
    assert sorted(p.name for p in (box / COULD_NOT_PROCESS / "new").iterdir()) == [
        "1.forged", "2.plain"]
    assert read_events(root.log / "events" / SPOOL) == []
    processor.close()
