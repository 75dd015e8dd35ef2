"""Every SimpleMH header of seed 004, through real injection (greenarrow.lib.simplemh.processing).

Each header: its valid values and what they do, its invalid values (a
permanent error naming the header: exit 100 on the command line, 554 over
SMTP), and its precedence against GREENARROW_* variables and the Mail
Class, including the MtaID list of seed 004 as far as it applies at
injection (items 4, 5, 8, 9, 10, 11: header_pattern and custom code act at
delivery). Messages go through `greenarrow.bin.inject.inject` in-process
against a fresh install root; one class of tests runs over SMTP.
"""

from __future__ import annotations

import io
import os
import re
import smtplib
import sys
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import test_smtpd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_smtpd import port_of

from greenarrow.bin.inject import EXIT_PERMANENT, EXIT_TEMPORARY, inject, run
from greenarrow.lib.config import control, secret_constants
from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject import accept as injection
from greenarrow.lib.inject.accept import InjectionError
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.simplemh import mail_class
from greenarrow.lib.simplemh import return_path as ba
from greenarrow.lib.simplemh import tracking_url as tu

start_server = test_smtpd.start_server  # the SMTP-service fixture, with this module's root

ME = "smh.test"
RCPT = "rcpt@dest.example"
CONF = """\
general {
    process_x_job_header yes
}
mail_class news {
    listid t100
    virtual_mta pool1
    track_clicks_and_opens yes
    url_domain https://links.example.com
    bounce_address bounce@bounces.example.com
    statistic_report_grouping per_instanceid_legacy
}
mail_class plain {
}
mail_class trans {
    url_domain http://t.example.com
    bounce_address b@t.example.com
    list_unsubscribe no
}
"""
HTML = (
    "MIME-Version: 1.0\n"
    "Content-Type: text/html; charset=utf-8\n"
    "\n"
    '<html><body><p><a href="https://example.com/a?x=1&amp;y=2">A</a> '
    '<a href="mailto:x@example.com">m</a> <a href="#top">t</a> '
    '<a href="##unsubscribetag##https://example.com/unsub?u=1">unsubscribe</a></p></body></html>\n'
)
TRACK_RE = re.compile(rb"(https?://[a-z.]+)/(click|open|unsub)(/|\?qs=|\?)([A-Za-z0-9_-]+)")


@pytest.fixture
def root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "hvmail")
    init_root(r, ME)
    (r.control / "greenarrow.conf").write_text(CONF)
    mail_class._memo.clear()
    return r


@pytest.fixture
def constants(root: Root) -> tuple[str, str]:
    return secret_constants.read(root.control)


def environ(root: Root, **extra: str) -> dict[str, str]:
    return {"HVMAIL_ROOT": str(root.path), "USER": "alice", **extra}


def entries(root: Root) -> list[tuple[dict, bytes]]:
    out = []
    for path in sorted((root.queue("ram") / "entries").iterdir(),
                       key=lambda p: int(queue_entry.split_name(p.name)[0].rsplit("-", 1)[1])):
        out.append(queue_entry.read_entry(path))
    for path in (root.queue("ram") / "entries").iterdir():
        path.unlink()
    return out


def send(root: Root, headers: str = "", body: str = HTML, env: dict[str, str] | None = None,
         recipients: tuple[str, ...] = (RCPT,), sender: str = "s@origin.example") -> list:
    message = (f"From: {sender}\nTo: {recipients[0]}\nSubject: hi\n{headers}" + body).encode()
    inject(["-f", sender, *recipients], message, environ(root, **(env or {})))
    return entries(root)


def one(root: Root, headers: str = "", **kw) -> tuple[dict, bytes]:
    (item,) = send(root, headers, **kw)
    return item


def refused(root: Root, headers: str, env: dict[str, str] | None = None) -> str:
    """The text of the permanent error the message is refused with (nothing queued)."""
    with pytest.raises(InjectionError) as e:
        send(root, headers, env=env)
    assert e.value.permanent, e.value.text
    assert entries(root) == []
    return e.value.text


def header(msg: bytes, name: str) -> str | None:
    headers, _ = msglib.split_headers(msg)
    h = msglib.find(headers, name.lower().encode())
    return None if h is None else msglib.header_value(msg, h)


def tracked(msg: bytes, constants: tuple[str, str]) -> list[tuple[str, str, tu.TrackingData]]:
    """(base, format, data) of every tracking URL in a message (headers and decoded body)."""
    parsed = message_from_bytes(msg, policy=policy.compat32)
    texts = [msg[:msglib.split_headers(msg)[1]]]  # the headers, then each decoded part
    for part in parsed.walk():
        if not part.is_multipart():
            texts.append(part.get_payload(decode=True) or b"")
    out = []
    seen = set()
    for text in texts:
        for m in TRACK_RE.finditer(text.replace(b"\r\n ", b"")):
            if m.group(0) in seen:
                continue
            seen.add(m.group(0))
            fmt = {b"/": "a", b"?": "b", b"?qs=": "c"}[m.group(3)]
            out.append((m.group(1).decode(), fmt, tu.decode(m.group(4).decode(), constants)))
    return out


def clicks(msg: bytes, constants) -> list[str]:
    return [d.url for _, _, d in tracked(msg, constants) if d.kind == tu.CLICK]


# --------------------------------------------------------------------------- Mail Class


def test_mailclass_header_turns_simplemh_on(root: Root, constants) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\n")
    assert (env["mailclass"], env["listid"], env["mtaid"]) == ("news", "t100", "pool1")
    assert env["sendid"].startswith("news2")  # legacy grouping, no InstanceID: the date
    assert clicks(msg, constants) == ["https://example.com/a?x=1&y=2"]
    assert b"mailto:x@example.com" in msg and b'href="#top"' in msg
    assert b"X-GreenArrow" not in msg


def test_precedence_header_variable_default(root: Root) -> None:
    conf = CONF.replace("general {", "general {\n    default_mail_class plain")
    (root.control / "greenarrow.conf").write_text(conf)
    assert one(root)[0]["mailclass"] == "plain"
    assert one(root, env={"GREENARROW_MAILCLASS": "trans"})[0]["mailclass"] == "trans"
    env, _ = one(root, "X-GreenArrow-MailClass: news\n", env={"GREENARROW_MAILCLASS": "trans"})
    assert env["mailclass"] == "news"


def test_class_names_are_case_insensitive(root: Root) -> None:
    assert one(root, "X-GreenArrow-MailClass: NEWS\n")[0]["mailclass"] == "news"


def test_unknown_class(root: Root) -> None:
    text = refused(root, "X-GreenArrow-MailClass: nosuch\n")
    assert "unknown Mail Class 'nosuch' (from header X-GreenArrow-MailClass)" in text
    assert "news, plain, trans" in text
    with pytest.raises(InjectionError, match="environment variable GREENARROW_MAILCLASS"):
        send(root, env={"GREENARROW_MAILCLASS": "nosuch"})


def test_no_class_selected_is_raw_injection(root: Root) -> None:
    message = "From: s@o.example\nSubject: raw\nMessage-ID: <m@x>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
    (env, msg), = send(root, "X-GreenArrow-ListID: l1\n", body="\nhttp://example.com/\n",
                       sender="s@o.example")
    assert env["sender"] == "s@o.example" and env["mailclass"] == "" and env["listid"] == "l1"
    assert b"X-Mailer-Info" not in msg and b"http://example.com/" in msg
    assert message  # the raw path itself is covered by test_inject.py


def test_broken_conf_is_temporary(root: Root) -> None:
    (root.control / "greenarrow.conf").write_text("mail_class {\n")
    with pytest.raises(InjectionError) as e:
        send(root, "X-GreenArrow-MailClass: news\n")
    assert not e.value.permanent and "greenarrow.conf:1" in e.value.text


# --------------------------------------------------------------------------- InstanceID, X-Job, SendID


def test_instanceid_legacy(root: Root) -> None:
    env, _ = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-InstanceID: 0901220005\n")
    assert (env["instanceid"], env["sendid"]) == ("0901220005", "news0901220005")


@pytest.mark.parametrize("value", ["a0901", "1" * 28, "12-3"])
def test_instanceid_legacy_invalid(root: Root, value: str) -> None:
    text = refused(root, f"X-GreenArrow-MailClass: news\nX-GreenArrow-InstanceID: {value}\n")
    assert f"invalid X-GreenArrow-InstanceID {value!r}" in text and "legacy" in text


def test_instanceid_other_grouping(root: Root) -> None:
    env, _ = one(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-InstanceID: Spring Sale 2026!\n")
    assert env["instanceid"] == "Spring Sale 2026!"  # case kept for events
    assert env["sendid"] == mail_class.build_sendid("plain", "spring sale 2026!",
                                                     mail_class.DEFAULT_GROUPING, 0)
    other, _ = one(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-InstanceID: SPRING sale 2026!\n")
    assert other["sendid"] == env["sendid"]  # SendIDs are case-insensitive
    env, _ = one(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-InstanceID: Camp42\n")
    assert env["sendid"] == "plain-camp42"
    text = refused(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-InstanceID: " + "x" * 301 + "\n")
    assert "X-GreenArrow-InstanceID" in text and "300" in text


def test_x_job_wins_when_enabled(root: Root) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-InstanceID: 1\nX-Job: 2\n")
    assert env["instanceid"] == "2"
    assert header(msg, "X-Job") == "2"  # not an X-GreenArrow-* header: kept
    assert "invalid X-Job 'x-1'" in refused(root, "X-GreenArrow-MailClass: news\nX-Job: x-1\n")
    (root.control / "greenarrow.conf").write_text(CONF.replace("process_x_job_header yes",
                                                               "process_x_job_header no"))
    env, _ = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-InstanceID: 1\nX-Job: 2\n")
    assert env["instanceid"] == "1"


def test_sendid_header_ignored_but_checked(root: Root) -> None:
    env, _ = one(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-SendID: mine\n")
    assert env["sendid"].startswith("plain-")
    assert "invalid SendID" in refused(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-SendID: a b\n")


# --------------------------------------------------------------------------- ListID, MtaID


def test_listid_precedence(root: Root) -> None:
    base = "X-GreenArrow-MailClass: news\n"
    assert one(root, base)[0]["listid"] == "t100"
    assert one(root, base, env={"GREENARROW_LISTID": "fromenv"})[0]["listid"] == "fromenv"
    env, _ = one(root, base + "X-GreenArrow-ListID: hdr\n", env={"GREENARROW_LISTID": "fromenv"})
    assert env["listid"] == "hdr"
    assert one(root, "X-GreenArrow-MailClass: plain\n")[0]["listid"] == ""
    assert "invalid ListID" in refused(root, base + "X-GreenArrow-ListID: no-dash\n")


def test_mtaid_precedence(root: Root) -> None:
    """Seed 004's list at injection: X-Virtual-MTA (when enabled) > X-GreenArrow-MtaID >
    GREENARROW_MTAID > the class's VirtualMTA > none (the default VirtualMTA)."""
    base = "X-GreenArrow-MailClass: news\n"
    assert one(root, base)[0]["mtaid"] == "pool1"  # 10
    assert one(root, "X-GreenArrow-MailClass: plain\n")[0]["mtaid"] == ""  # 11
    assert one(root, base, env={"GREENARROW_MTAID": "envmta"})[0]["mtaid"] == "envmta"  # 9
    env, _ = one(root, base + "X-GreenArrow-MtaID: hdrmta\n", env={"GREENARROW_MTAID": "envmta"})
    assert env["mtaid"] == "hdrmta"  # 5
    env, msg = one(root, base + "X-GreenArrow-MtaID: hdrmta\nX-Virtual-MTA: vmta\n")
    assert env["mtaid"] == "hdrmta"  # process_x_virtual_mta_header is off
    assert header(msg, "X-Virtual-MTA") == "vmta"
    (root.control / "greenarrow.conf").write_text(
        CONF.replace("general {", "general {\n    process_x_virtual_mta_header yes"))
    env, _ = one(root, base + "X-GreenArrow-MtaID: hdrmta\nX-Virtual-MTA: vmta\n")
    assert env["mtaid"] == "vmta"  # 4
    assert "invalid MtaID" in refused(root, base + "X-Virtual-MTA: a@b\n")
    # raw injection honours it too
    env, _ = one(root, "X-GreenArrow-MtaID: hdrmta\nX-Virtual-MTA: vmta\n")
    assert (env["mailclass"], env["mtaid"]) == ("", "vmta")


def test_mtaid_from_smtp_service_rule(root: Root, start_server) -> None:
    """Item 8: the GREENARROW_MTAID of the SMTP service's rule; the header still wins."""
    server = start_server('127.0.0.1:allow,RELAYCLIENT="",GREENARROW_MTAID="smtpmta",'
                          'GREENARROW_MAILCLASS="news"\n:deny\n')
    assert server
    body = (b"From: s@o.example\r\nTo: r@d.example\r\nSubject: x\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", port_of(root), timeout=15) as smtp:
        smtp.sendmail("s@o.example", [RCPT], body)
        smtp.sendmail("s@o.example", [RCPT], b"X-GreenArrow-MtaID: hdrmta\r\n" + body)
    first, second = sorted(entries(root), key=lambda e: e[0]["msguid"])
    assert (first[0]["mailclass"], first[0]["mtaid"]) == ("news", "smtpmta")
    assert second[0]["mtaid"] == "hdrmta"


def test_invalid_header_over_smtp_is_554(root: Root, start_server) -> None:
    start_server('127.0.0.1:allow,RELAYCLIENT=""\n:deny\n')
    body = b"From: s@o.example\r\nX-GreenArrow-MailClass: news\r\nX-GreenArrow-Click-Tracking-Do: maybe\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", port_of(root), timeout=15) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as e:
            smtp.sendmail("s@o.example", [RCPT], body)
    assert e.value.smtp_code == 554
    assert b"X-GreenArrow-Click-Tracking-Do 'maybe'" in e.value.smtp_error
    assert entries(root) == []


# --------------------------------------------------------------------------- bounce address


def test_bounce_address_from_class(root: Root, constants) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-InstanceID: 7\n")
    assert env["sender"].endswith("@bounces.example.com")
    d = ba.decode(env["sender"], constants)
    assert (d.listid, d.sendid, d.recipient) == ("t100", "news7", RCPT)
    assert header(msg, "Return-Path") is None


def test_bounce_mailbox_override(root: Root, constants) -> None:
    h = "X-GreenArrow-MailClass: plain\nX-GreenArrow-BounceMailboxOverride: ev@events.example.com\n"
    env, _ = one(root, h)
    assert ba.decode(env["sender"], constants).mailbox == "ev@events.example.com"
    env, _ = one(root, h.replace("plain", "news"))  # wins over the class's
    assert env["sender"].endswith("@events.example.com")
    assert env["sender"] != "s@origin.example"
    text = refused(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-BounceMailboxOverride: nobody\n")
    assert "invalid X-GreenArrow-BounceMailboxOverride 'nobody'" in text


def test_no_bounce_mailbox_keeps_sender(root: Root) -> None:
    env, _ = one(root, "X-GreenArrow-MailClass: plain\n")
    assert env["sender"] == "s@origin.example"


def test_long_recipient_gets_the_short_form(root: Root, constants) -> None:
    rcpt = "a.very.long.recipient.name.for.testing@a-long-subdomain.dest.example"
    (env, msg), = send(root, "X-GreenArrow-MailClass: news\n", recipients=(rcpt,))
    local = env["sender"].rpartition("@")[0]
    assert len(local) <= 64 and not ba.is_full(env["sender"])
    d = ba.decode(env["sender"], constants, mailer_info=header(msg, "X-Mailer-Info"))
    assert d.recipient == rcpt and d.sendid == env["sendid"]


def test_handle_bounce_and_fbl(root: Root) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-HandleBounceAndFbl: no\n")
    assert env["sender"] == "s@origin.example" and header(msg, "X-Mailer-Info") is None
    for value in ("yes", "1", "YES"):
        env, msg = one(root, f"X-GreenArrow-MailClass: news\nX-GreenArrow-HandleBounceAndFbl: {value}\n")
        assert env["sender"] != "s@origin.example" and header(msg, "X-Mailer-Info")
    env, _ = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-HandleBounceAndFbl: 0\n")
    assert env["sender"] == "s@origin.example"
    assert "X-GreenArrow-HandleBounceAndFbl 'maybe'" in refused(
        root, "X-GreenArrow-MailClass: news\nX-GreenArrow-HandleBounceAndFbl: maybe\n")


def test_existing_return_path_and_mailer_info_replaced(root: Root, constants) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\nReturn-Path: <x@y>\nX-Mailer-Info: fake\n")
    assert header(msg, "Return-Path") is None
    info = tu.decode("".join(header(msg, "X-Mailer-Info").split()), constants)
    assert (info.kind, info.recipient, info.sendid, info.listid) == ("m", RCPT, env["sendid"], "t100")
    assert msg.count(b"X-Mailer-Info") == 1


# --------------------------------------------------------------------------- Obscured-Email, Click-Tracking-ID


def test_obscured_email(root: Root, constants) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-Obscured-Email: userid-1\n"
                         "X-GreenArrow-Click-Tracking-ID: 1234\n")
    assert env["recipient"] == RCPT and env["click_tracking_id"] == "1234"
    for _, _, d in tracked(msg, constants):
        assert (d.recipient, d.click_tracking_id) == ("userid-1", "1234")
    assert ba.decode(env["sender"], constants).recipient == "userid-1"
    info = tu.decode("".join(header(msg, "X-Mailer-Info").split()), constants)
    assert info.recipient == "userid-1"
    assert "X-GreenArrow-Obscured-Email" in refused(
        root, "X-GreenArrow-MailClass: news\nX-GreenArrow-Obscured-Email: has space\n")


@pytest.mark.parametrize("value", ["x" * 301, "tab\there"])
def test_click_tracking_id_invalid(root: Root, value: str) -> None:
    assert "invalid X-GreenArrow-Click-Tracking-ID" in refused(
        root, f"X-GreenArrow-MailClass: news\nX-GreenArrow-Click-Tracking-ID: {value}\n")


def test_click_tracking_id_any_printable(root: Root, constants) -> None:
    value = "a b~!" + "z" * 295
    env, msg = one(root, f"X-GreenArrow-MailClass: news\nX-GreenArrow-Click-Tracking-ID: {value}\n")
    assert env["click_tracking_id"] == value
    assert {d.click_tracking_id for _, _, d in tracked(msg, constants)} == {value}


# --------------------------------------------------------------------------- tracking switches


def test_click_tracking_do_no_leaves_body_alone(root: Root) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-Click-Tracking-Do: no\n",
                   body=HTML.replace("##unsubscribetag##", ""))
    body = msg[msg.index(b"\r\n\r\n") + 4:]
    assert body == msglib.to_crlf(HTML.replace("##unsubscribetag##", "").encode()).split(b"\r\n\r\n", 1)[1]


def test_click_tracking_do_yes_and_invalid(root: Root, constants) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: trans\nX-GreenArrow-Click-Tracking-Do: 1\n")
    assert clicks(msg, constants) == ["https://example.com/a?x=1&y=2"]
    assert {base for base, _, _ in tracked(msg, constants)} == {"http://t.example.com"}
    text = refused(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-Click-Tracking-Do: yes\n")
    assert "needs a URL domain" in text
    assert "X-GreenArrow-Click-Tracking-Do 'sure'" in refused(
        root, "X-GreenArrow-MailClass: news\nX-GreenArrow-Click-Tracking-Do: sure\n")


def test_url_domain(root: Root, constants) -> None:
    h = "X-GreenArrow-MailClass: news\nX-GreenArrow-URL-Domain: "
    _, msg = one(root, h + "https://other.example.com/\n")
    assert {base for base, _, _ in tracked(msg, constants)} == {"https://other.example.com"}
    _, msg = one(root, h + "other.example.com\n")  # no scheme: ignored, as the seed says
    assert {base for base, _, _ in tracked(msg, constants)} == {"https://links.example.com"}
    assert "invalid X-GreenArrow-URL-Domain" in refused(root, h + "https://bad host\n")
    # with a header domain, a class without one can track
    _, msg = one(root, "X-GreenArrow-MailClass: plain\nX-GreenArrow-Click-Tracking-Do: yes\n"
                       "X-GreenArrow-URL-Domain: http://h.example\n")
    assert clicks(msg, constants)


@pytest.mark.parametrize("fmt", ["a", "b", "c"])
def test_tracker_format_header(root: Root, constants, fmt: str) -> None:
    _, msg = one(root, f"X-GreenArrow-MailClass: news\nX-GreenArrow-Tracker-Format: {fmt.upper()}\n")
    assert {f for _, f, _ in tracked(msg, constants)} == {fmt}


def test_tracker_format_control_file(root: Root, constants) -> None:
    _, msg = one(root, "X-GreenArrow-MailClass: news\n")
    assert {f for _, f, _ in tracked(msg, constants)} == {"b"}  # the default
    (root.control / "opt.simplemh.tracker_format").write_text("c\n")
    _, msg = one(root, "X-GreenArrow-MailClass: news\n")
    assert {f for _, f, _ in tracked(msg, constants)} == {"c"}
    _, msg = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-Tracker-Format: a\n")
    assert {f for _, f, _ in tracked(msg, constants)} == {"a"}
    assert "X-GreenArrow-Tracker-Format 'd'" in refused(
        root, "X-GreenArrow-MailClass: news\nX-GreenArrow-Tracker-Format: d\n")
    (root.control / "opt.simplemh.tracker_format").write_text("z\n")
    with pytest.raises(InjectionError) as e:
        send(root, "X-GreenArrow-MailClass: news\n")
    assert not e.value.permanent and "opt.simplemh.tracker_format" in e.value.text


def test_event_tracking_metadata_storage(root: Root, constants) -> None:
    h = "X-GreenArrow-MailClass: news\n"

    def stateless(headers: str) -> set[bool]:
        return {d.stateless for _, _, d in tracked(one(root, headers)[1], constants)}

    assert stateless(h) == {False}
    assert stateless(h + "X-GreenArrow-EventTrackingMetadataStorage: stateless\n") == {True}
    control.write(root.control, "opt.simplemh_stateless_event_handling", 1)
    assert stateless(h) == {True}
    assert stateless(h + "X-GreenArrow-EventTrackingMetadataStorage: system_default\n") == {True}
    assert stateless(h + "X-GreenArrow-EventTrackingMetadataStorage: local\n") == {False}
    assert stateless(h + "X-GreenArrow-EventTrackingMetadataStorage: external\n") == {False}
    assert "X-GreenArrow-EventTrackingMetadataStorage 'cloud'" in refused(
        root, h + "X-GreenArrow-EventTrackingMetadataStorage: cloud\n")


def test_every_tracked_field(root: Root, constants) -> None:
    """Stateless DATA of a link names recipient, ListID, SendID, Mail Class, InstanceID,
    click tracking id and target."""
    env, msg = one(root, "X-GreenArrow-MailClass: news\nX-GreenArrow-InstanceID: 42\n"
                         "X-GreenArrow-Click-Tracking-ID: ct9\n"
                         "X-GreenArrow-EventTrackingMetadataStorage: stateless\n")
    kinds = {}
    for _, _, d in tracked(msg, constants):
        kinds[d.kind] = d
        assert (d.recipient, d.listid, d.sendid, d.mailclass, d.instanceid,
                d.click_tracking_id, d.stateless) == (RCPT, "t100", "news42", "news", "42",
                                                      "ct9", True)
    assert set(kinds) == {"c", "u", "o", "l"}
    assert kinds["u"].url == "https://example.com/unsub?u=1"
    assert kinds["o"].url == kinds["l"].url == ""


# --------------------------------------------------------------------------- List-Unsubscribe


def test_list_unsubscribe_added(root: Root, constants) -> None:
    env, msg = one(root, "X-GreenArrow-MailClass: news\n")
    value = header(msg, "List-Unsubscribe")
    mailto, https = re.findall(r"<([^>]+)>", value)
    address, _, subject = mailto.removeprefix("mailto:").partition("?subject=unsubscribe-")
    d = ba.decode(address, constants)
    assert d.unsubscribe and (d.recipient, d.sendid) == (RCPT, env["sendid"])
    assert subject == tu.data_from_url(re.findall(r"<([^>]+)>", value)[1])[1]  # one-click's
    assert https.startswith("https://links.example.com/unsub?")
    assert tu.decode(tu.data_from_url(https)[1], constants).kind == "l"
    assert header(msg, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"


def test_list_unsubscribe_http_url_and_post(root: Root) -> None:
    h = ("X-GreenArrow-MailClass: news\n"
         "X-GreenArrow-List-Unsubscribe-HTTP-URL: https://u.example/unsub/1-2-3\n")
    _, msg = one(root, h)
    assert header(msg, "List-Unsubscribe").endswith("<https://u.example/unsub/1-2-3>")
    assert header(msg, "List-Unsubscribe-Post") is None  # not known to take POST
    _, msg = one(root, h + "X-GreenArrow-List-Unsubscribe-HTTP-URL-Post: List-Unsubscribe=One-Click\n")
    assert header(msg, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    _, msg = one(root, "X-GreenArrow-MailClass: news\n"
                       "X-GreenArrow-List-Unsubscribe-HTTP-URL-Post: x=y\n")  # no URL: ignored
    assert header(msg, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    assert "X-GreenArrow-List-Unsubscribe-HTTP-URL" in refused(
        root, "X-GreenArrow-MailClass: news\nX-GreenArrow-List-Unsubscribe-HTTP-URL: ftp://x\n")
    assert "X-GreenArrow-List-Unsubscribe-HTTP-URL-Post" in refused(
        root, h + "X-GreenArrow-List-Unsubscribe-HTTP-URL-Post: a\tb\n")


def test_list_unsubscribe_disabled_or_present(root: Root) -> None:
    for value in ("yes", "1"):
        _, msg = one(root, "X-GreenArrow-MailClass: news\n"
                           f"X-GreenArrow-Disable-Auto-List-Unsubscribe-Header: {value}\n")
        assert header(msg, "List-Unsubscribe") is None
    _, msg = one(root, "X-GreenArrow-MailClass: news\n"
                       "X-GreenArrow-Disable-Auto-List-Unsubscribe-Header: no\n")
    assert header(msg, "List-Unsubscribe")
    _, msg = one(root, "X-GreenArrow-MailClass: news\nList-Unsubscribe: <mailto:mine@x.example>\n")
    assert header(msg, "List-Unsubscribe") == "<mailto:mine@x.example>"
    assert header(msg, "List-Unsubscribe-Post") is None
    _, msg = one(root, "X-GreenArrow-MailClass: trans\n")  # list_unsubscribe no
    assert header(msg, "List-Unsubscribe") is None
    _, msg = one(root, "X-GreenArrow-MailClass: trans\n"
                       "X-GreenArrow-Disable-Auto-List-Unsubscribe-Header: 0\n")
    assert header(msg, "List-Unsubscribe").startswith("<mailto:")
    assert "X-GreenArrow-Disable-Auto-List-Unsubscribe-Header" in refused(
        root, "X-GreenArrow-MailClass: news\nX-GreenArrow-Disable-Auto-List-Unsubscribe-Header: y\n")


# --------------------------------------------------------------------------- seeding, DKIM


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("X-GreenArrow-SeedDo", ["yes", "no", "1", "0"], ["2", "true"]),
    ("X-GreenArrow-SeedProgress", ["0", "50.23", "100", ".5"], ["101", "-1", "1e2", "x", "5.5.5"]),
    ("X-GreenArrow-Pcompat-DKIM-Disable", ["yes", "no", "1", "0"], ["off"]),
])
def test_validated_and_stripped(root: Root, name: str, good: list[str], bad: list[str]) -> None:
    for value in good:
        _, msg = one(root, f"X-GreenArrow-MailClass: news\n{name}: {value}\n")
        assert name.encode() not in msg
    for value in bad:
        assert f"invalid {name} {value!r}" in refused(root, f"X-GreenArrow-MailClass: news\n{name}: {value}\n")


def test_campaign_id_is_left_alone(root: Root) -> None:
    _, msg = one(root, "X-GreenArrow-MailClass: news\nX-CampaignID: spring\n")
    assert header(msg, "X-CampaignID") == "spring"


# --------------------------------------------------------------------------- recipients, exit codes


def test_each_recipient_gets_its_own_copy(root: Root, constants) -> None:
    rcpts = ("a@d.example", "b@d.example", "c@d.example")
    items = send(root, "X-GreenArrow-MailClass: news\n", recipients=rcpts)
    assert [e["recipient"] for e, _ in items] == list(rcpts)
    for (env, msg), rcpt in zip(items, rcpts, strict=True):
        assert {d.recipient for _, _, d in tracked(msg, constants)} == {rcpt}
        assert ba.decode(env["sender"], constants).recipient == rcpt
    assert len({e["msguid"] for e, _ in items}) == 1


def test_exit_100_names_the_header(root: Root, monkeypatch, capsys) -> None:
    for name in list(os.environ):
        if name.startswith("GREENARROW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HVMAIL_ROOT", str(root.path))
    message = b"X-GreenArrow-MailClass: news\nX-GreenArrow-Tracker-Format: q\n\nbody\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(message)))
    assert run(["-f", "s@o.example", RCPT], "sendmail") == EXIT_PERMANENT
    assert "sendmail: fatal: invalid X-GreenArrow-Tracker-Format 'q'" in capsys.readouterr().err


def test_missing_secret_constants_is_111(root: Root, monkeypatch, capsys) -> None:
    (root.control / "secret_constants").unlink()
    monkeypatch.setenv("HVMAIL_ROOT", str(root.path))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"X-GreenArrow-MailClass: news\n\nb\n")))
    assert run(["-f", "s@o.example", RCPT], "sendmail") == EXIT_TEMPORARY
    assert "secret_constants" in capsys.readouterr().err


# --------------------------------------------------------------------------- property: bytes preserved

_OWNED = {b"x-mailer-info", b"return-path", b"list-unsubscribe-post", b"content-transfer-encoding"}
_FTEXT = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":")
_VTEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.just("\t"), max_size=30)
_NAME = st.one_of(
    st.text(_FTEXT, min_size=1, max_size=20),
    st.sampled_from(["X-GreenArrow-ListID", "x-greenarrow-instanceid", "X-GREENARROW-FOO",
                     "X-GreenArrow-Click-Tracking-Do", "Subject", "List-Unsubscribe", "X-Job"]),
)


@st.composite
def fields(draw: st.DrawFn) -> bytes:
    name = draw(_NAME)
    conts = draw(st.lists(st.tuples(st.sampled_from([" ", "\t"]), _VTEXT), max_size=2))
    text = f"{name}:{draw(_VTEXT)}\r\n" + "".join(f"{ws}{rest}\r\n" for ws, rest in conts)
    return text.encode("ascii")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(block=st.lists(fields(), max_size=12), body=st.binary(max_size=200))
def test_header_bytes_outside_x_greenarrow_preserved(root: Root, block: list[bytes], body: bytes) -> None:
    """For arbitrary header blocks, every field that is not X-GreenArrow-* (nor one SimpleMH
    owns: X-Mailer-Info, Return-Path, List-Unsubscribe-Post) comes out byte for byte, in order;
    then come only the headers SimpleMH adds; the body follows unchanged (no links in it)."""
    body = body.replace(b"http", b"htp").replace(b"##", b"#")
    message = b"".join(block) + b"\r\n" + body
    try:
        prepared = injection.prepare(message, {"GREENARROW_MAILCLASS": "plain"}, ME, "uid",
                                     1.7e9, b"", str(root.path))
    except InjectionError as e:
        assert e.permanent and ("X-GreenArrow" in e.text or "X-Job" in e.text)  # a bad value
        return
    out = prepared.message_for(RCPT)
    headers, body_start = msglib.split_headers(message)
    kept = [message[h.start:h.end] for h in headers
            if not h.name.startswith(b"x-greenarrow-") and h.name not in _OWNED]
    out_headers, out_body = msglib.split_headers(out)
    got = [out[h.start:h.end] for h in out_headers]
    assert got[:len(kept)] == kept
    assert {h.name for h in out_headers[len(kept):]} <= {
        b"message-id", b"date", b"x-mailer-info", b"list-unsubscribe", b"list-unsubscribe-post"}
    assert out[out_body:] == message[body_start:]


def test_resolve_is_remembered_for_the_same_inputs(root: Root) -> None:
    """A long-lived injector resolves a campaign's headers once: the same inputs give the same
    Job; another header value, day, greenarrow.conf or control/ gives a new one."""
    from greenarrow.lib.simplemh import processing as simplemh

    r = str(root.path)
    classes, settings = mail_class.load(r), simplemh.root_settings(r)
    ids, sources = {"mailclass": "news"}, {"mailclass": "header X-GreenArrow-MailClass"}
    values = {b"x-greenarrow-click-tracking-id": "7"}
    job = simplemh.resolve(values, ids, sources, classes, settings, 1.7e9)
    assert simplemh.resolve(dict(values), dict(ids), dict(sources), classes, settings,
                            1.7e9 + 60) is job
    other = simplemh.resolve({b"x-greenarrow-click-tracking-id": "8"}, ids, sources, classes,
                             settings, 1.7e9)
    assert other is not job and other.click_tracking_id == "8"
    tomorrow = simplemh.resolve(values, ids, sources, classes, settings, 1.7e9 + 86400)
    assert tomorrow is not job and tomorrow.sendid != job.sendid  # no InstanceID: the date
    (root.control / "greenarrow.conf").write_text(CONF.replace("listid t100", "listid t9"))
    again = simplemh.resolve(values, ids, sources, mail_class.load(r), settings, 1.7e9)
    assert again is not job and again.listid == "t9"
    with pytest.raises(simplemh.SimpleMHError):  # errors are not remembered
        simplemh.resolve({b"x-greenarrow-tracker-format": "d"}, ids, sources, classes,
                         settings, 1.7e9)
