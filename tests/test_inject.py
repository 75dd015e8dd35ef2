"""Command-line injection: `sendmail`, `qmail-inject` and `greenarrow inject`.

Most tests run in-process through `greenarrow.bin.inject.inject(argv, stdin,
environ)` (or `run`, for exit codes and messages) against a fresh install
root; the real `bin/sendmail` and `bin/qmail-inject` scripts written by
`init_root` are run once each as subprocesses. Every wait is bounded.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from greenarrow.bin import inject as inject_mod
from greenarrow.bin.inject import EXIT_OK, EXIT_PERMANENT, EXIT_TEMPORARY, inject, run
from greenarrow.lib.config import control
from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject.accept import InjectionError
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry

ME = "mx.injector.test"
WAIT = 30.0  # bound on a subprocess; never reached when things work


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "hvmail")
    init_root(r, ME)
    return r


@pytest.fixture
def environ(root: Root) -> dict[str, str]:
    """A clean environment: the install root and a known user, nothing else."""
    return {"HVMAIL_ROOT": str(root.path), "USER": "alice"}


def entries(root: Root) -> list[Path]:
    return sorted((root.queue("ram") / "entries").iterdir())


# Command-line injection puts the submitter's trace field first (Postfix's form).
TRACE = re.compile(rb"Received: by [^ ]+ \(GreenArrow, from userid (\d+)\);\r\n\t[^\r\n]+\r\n")


def queued(root: Root) -> list[tuple[str, dict, bytes]]:
    """(file name, envelope, message) of every entry of the ram-queue, by recipient index;
    the message without the command line's Received field (its uid checked here)."""
    out = []
    for path in entries(root):
        env, msg = queue_entry.read_entry(path)
        trace = TRACE.match(msg)
        if trace:
            assert int(trace.group(1)) == os.getuid(), msg[:200]
            msg = msg[trace.end():]
        out.append((path.name, env, msg))
    out.sort(key=lambda t: queue_entry.split_name(t[0])[0])
    return out


def only_entry(root: Root) -> tuple[dict, bytes]:
    items = queued(root)
    assert len(items) == 1, [name for name, _, _ in items]
    return items[0][1], items[0][2]


def run_inproc(
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    stdin: bytes,
    environ: dict[str, str],
    program: str = "sendmail",
    qmail_inject: bool = False,
) -> int:
    """`run` as the scripts call it: stdin and the environment are the process's."""
    for name in list(os.environ):
        if name.startswith("GREENARROW_") or name in ("QMAILUSER", "QMAILHOST", "LOGNAME"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return run(argv, program, qmail_inject)


NOFROM = b"Subject: hello\nMessage-ID: <fixed@example.com>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nbody\n"
SIMPLE = b"From: s@example.com\n" + NOFROM  # nothing to add: queued exactly as given (in CRLF)
SIMPLE_CRLF = msglib.to_crlf(SIMPLE)


# --------------------------------------------------------------------------- senders and recipients


def test_recipients_from_arguments(root: Root, environ: dict[str, str]) -> None:
    """Every argument that is not an option is a recipient; each gets its own entry."""
    msguid = inject(["-f", "from@example.com", "a@example.com", "b@example.net"], SIMPLE, environ)
    items = queued(root)
    assert [env["recipient"] for _, env, _ in items] == ["a@example.com", "b@example.net"]
    assert all(env["sender"] == "from@example.com" for _, env, _ in items)
    assert all(env["msguid"] == msguid for _, env, _ in items)


def test_double_dash_ends_options(root: Root, environ: dict[str, str]) -> None:
    """After `--` an argument starting with a dash is a recipient, completed with @me."""
    inject(["-f", "from@example.com", "--", "-t"], SIMPLE, environ)
    (_, envelope, _), = queued(root)
    assert envelope["recipient"] == f"-t@{ME}"


@pytest.mark.parametrize(
    "argv",
    [["-f", "s@example.com"], ["-fs@example.com"], ["-r", "s@example.com"], ["-f", "<s@example.com>"]],
)
def test_sender_option(root: Root, environ: dict[str, str], argv: list[str]) -> None:
    """-f and -r set the envelope sender, attached or separate, with or without angle brackets."""
    inject([*argv, "rcpt@example.com"], SIMPLE, environ)
    env, _ = only_entry(root)
    assert env["sender"] == "s@example.com"


@pytest.mark.parametrize("value", ["", "<>"])
def test_empty_sender(root: Root, environ: dict[str, str], value: str) -> None:
    """-f '' and -f '<>' give the null sender; no From header is invented for it."""
    inject(["-f", value, "rcpt@example.com"], b"Subject: bounce\n\nbody\n", environ)
    env, msg = only_entry(root)
    assert env["sender"] == ""
    headers, _ = msglib.split_headers(msg)
    assert msglib.find(headers, b"from") is None


def test_default_sender(root: Root, environ: dict[str, str]) -> None:
    """Without -f the sender is the user at control/me (QMAILUSER/QMAILHOST override)."""
    inject(["rcpt@example.com"], NOFROM, environ)
    env, msg = only_entry(root)
    assert env["sender"] == f"alice@{ME}"
    assert b"\r\nFrom: alice@" + ME.encode() + b"\r\n" in msg

    (root.queue("ram") / "entries" / queued(root)[0][0]).unlink()
    inject(["rcpt@example.com"], SIMPLE, {**environ, "QMAILUSER": "bob", "QMAILHOST": "h.example"})
    env, _ = only_entry(root)
    assert env["sender"] == "bob@h.example"


def test_t_reads_to_cc_bcc_and_removes_bcc(root: Root, environ: dict[str, str]) -> None:
    """-t takes recipients from To, Cc and Bcc (plus the arguments) and drops the Bcc field."""
    message = (
        b"From: s@example.com\n"
        b"To: One <one@example.com>, two@example.com\n"
        b"Cc: three@example.org\n"
        b"Bcc: hidden@example.net,\n"
        b" hidden2@example.net\n"
        b"Subject: t\n"
        b"Message-ID: <m@example.com>\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\n"
        b"\n"
        b"Bcc: not a header, body text\n"
    )
    inject(["-t", "-f", "s@example.com", "arg@example.com"], message, environ)
    items = queued(root)
    assert sorted(env["recipient"] for _, env, _ in items) == sorted(
        [
            "arg@example.com",
            "one@example.com",
            "two@example.com",
            "three@example.org",
            "hidden@example.net",
            "hidden2@example.net",
        ]
    )
    expected = msglib.to_crlf(message).replace(
        b"Bcc: hidden@example.net,\r\n hidden2@example.net\r\n", b""
    )
    assert {msg for _, _, msg in items} == {expected}
    assert b"hidden" not in expected.split(b"\r\n\r\n")[0]


# --------------------------------------------------------------------------- the lone dot


DOTTED = b"Subject: d\nMessage-ID: <d@example.com>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nfirst\n.\nsecond\n"


def test_lone_dot_ends_message_without_i(root: Root, environ: dict[str, str]) -> None:
    """Without -i, a line holding a single dot ends the message (sendmail's rule)."""
    inject(["-f", "s@example.com", "r@example.com"], DOTTED, environ)
    _, msg = only_entry(root)
    assert msg.endswith(b"\r\n\r\nfirst\r\n")
    assert b"second" not in msg


@pytest.mark.parametrize("flag", [["-i"], ["-oi"], ["-o", "i"]])
def test_i_keeps_lone_dot(root: Root, environ: dict[str, str], flag: list[str]) -> None:
    """-i, -oi (and getopt's `-o i`) make the lone dot ordinary text: the message is kept whole."""
    inject([*flag, "-f", "s@example.com", "r@example.com"], DOTTED, environ)
    _, msg = only_entry(root)
    assert msg.endswith(b"first\r\n.\r\nsecond\r\n")


def test_qmail_inject_ignores_lone_dot(root: Root, environ: dict[str, str]) -> None:
    """qmail-inject never treats a lone dot as the end of the message."""
    inject(["-f", "s@example.com", "r@example.com"], DOTTED, environ, qmail_inject=True)
    _, msg = only_entry(root)
    assert msg.endswith(b"first\r\n.\r\nsecond\r\n")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b".\nrest\n", b""),
        (b".", b""),
        (b"a\n.\r\nb\n", b"a\n"),
        (b"a\n.", b"a\n"),
        (b"a\n..\nb\n", b"a\n..\nb\n"),
        (b"a\n. \nb\n", b"a\n. \nb\n"),
    ],
)
def test_cut_at_dot(data: bytes, expected: bytes) -> None:
    """cut_at_dot stops at the first line that is exactly one dot, and nowhere else."""
    assert inject_mod.cut_at_dot(data) == expected


# --------------------------------------------------------------------------- -F and options


def test_F_adds_from_when_missing(root: Root, environ: dict[str, str]) -> None:
    """-F NAME adds `From: "NAME" <sender>` when the message has no From; quotes and
    backslashes in the name are kept, escaped (RFC 5322 quoted-string)."""
    inject(["-F", 'Ann "Q" Sm\\ith', "-f", "ann@example.com", "r@example.com"], NOFROM, environ)
    _, msg = only_entry(root)
    headers, _ = msglib.split_headers(msg)
    h = msglib.find(headers, b"from")
    assert h is not None
    assert msglib.header_value(msg, h) == '"Ann \\"Q\\" Sm\\\\ith" <ann@example.com>'
    from email.parser import BytesParser
    from email.policy import default

    parsed = BytesParser(policy=default).parsebytes(msg)
    assert parsed["From"].addresses[0].display_name == 'Ann "Q" Sm\\ith'


@pytest.mark.parametrize("name", ["José Ñandú", "名前" * 30, 'Zoë "Q" \\ x'])
def test_F_non_ascii_name_is_encoded(root: Root, environ: dict[str, str], name: str) -> None:
    """A non-ASCII -F name goes out as RFC 2047 encoded words: a 7-bit header that reads
    back as the name (RFC 2047 6.2: the space between two encoded words is not shown)."""
    from email.header import decode_header, make_header

    inject(["-F", name, "-f", "ann@example.com", "r@example.com"], NOFROM, environ)
    _, msg = only_entry(root)
    headers, _ = msglib.split_headers(msg)
    h = msglib.find(headers, b"from")
    assert h is not None and msg[h.start:h.end].isascii()
    value = msglib.header_value(msg, h)
    words, _, address = value.rpartition(" ")
    assert address == "<ann@example.com>"
    assert all(len(w) <= 75 and w.startswith("=?utf-8?b?") for w in words.split())
    assert str(make_header(decode_header(words))) == name


def test_F_keeps_existing_from(root: Root, environ: dict[str, str]) -> None:
    """An existing From is never replaced, -F or not: the message is queued unchanged."""
    message = b"From: Real <real@example.com>\n" + NOFROM
    inject(["-F", "Other", "-f", "ann@example.com", "r@example.com"], message, environ)
    _, msg = only_entry(root)
    assert msg == msglib.to_crlf(message)


def test_bm_accepted(root: Root, environ: dict[str, str]) -> None:
    """-bm (deliver mail) is the default mode and is accepted."""
    inject(["-bm", "-f", "s@example.com", "r@example.com"], SIMPLE, environ)
    assert len(entries(root)) == 1


def test_bp_refused(
    root: Root, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """-bp (list the queue) is not offered: exit 100 with a message naming the mode."""
    code = run_inproc(monkeypatch, ["-bp"], SIMPLE, environ)
    assert code == EXIT_PERMANENT
    err = capsys.readouterr().err
    assert "sendmail: fatal:" in err and "-bp" in err
    assert entries(root) == []


@pytest.mark.parametrize(
    "options",
    [
        ["-oem"],
        ["-odb"],
        ["-o", "em"],
        ["-O", "DeliveryMode=b"],
        ["-N", "dsn"],
        ["-Nnever"],
        ["-R", "hdrs"],
        ["-B", "8BITMIME"],
        ["-v"],
        ["-v", "-N", "success,failure", "-R", "full", "-B", "7BIT", "-oem"],
    ],
)
def test_ignored_options(root: Root, environ: dict[str, str], options: list[str]) -> None:
    """sendmail options we do not implement are accepted and ignored, values included:
    the value is not taken for a recipient."""
    inject([*options, "-f", "s@example.com", "r@example.com"], SIMPLE, environ)
    env, msg = only_entry(root)
    assert env["recipient"] == "r@example.com"
    assert msg == SIMPLE_CRLF


def test_unknown_option_is_a_usage_error(
    root: Root, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An option we do not know at all is refused with the usage text (exit 100)."""
    assert run_inproc(monkeypatch, ["-Z", "r@example.com"], SIMPLE, environ) == EXIT_PERMANENT
    err = capsys.readouterr().err
    assert "unknown option -Z" in err and "usage:" in err
    assert entries(root) == []


@pytest.mark.parametrize("flag", ["--help", "-help"])
def test_help(
    root: Root, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, flag: str
) -> None:
    """--help prints the usage on stdout, exits 0 and queues nothing."""
    assert run_inproc(monkeypatch, [flag], b"", environ) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("usage: sendmail") and "-f ADDR" in out
    assert entries(root) == []


def test_run_success_exit_zero(
    root: Root, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """run reads stdin and the process environment, queues, exits 0 silently."""
    assert run_inproc(monkeypatch, ["-f", "s@example.com", "r@example.com"], SIMPLE, environ) == EXIT_OK
    assert capsys.readouterr() == ("", "")
    assert only_entry(root)[1] == SIMPLE_CRLF


# --------------------------------------------------------------------------- identifiers


IDS_ENV = {
    "GREENARROW_SENDID": "send-2024.01",
    "GREENARROW_LISTID": "list_1+a",
    "GREENARROW_MTAID": "mta pool 1",
    "GREENARROW_MAILCLASS": "news_letter",
}


def test_identifiers_from_environment(root: Root, environ: dict[str, str]) -> None:
    """GREENARROW_SENDID/LISTID/MTAID/MAILCLASS from the environment land in the envelope."""
    inject(["-f", "s@example.com", "r@example.com"], SIMPLE, {**environ, **IDS_ENV})
    env, msg = only_entry(root)
    assert (env["sendid"], env["listid"], env["mtaid"], env["mailclass"]) == (
        "send-2024.01",
        "list_1+a",
        "mta pool 1",
        "news_letter",
    )
    assert msg == SIMPLE_CRLF


def test_identifier_headers_go_to_envelope_and_are_stripped(
    root: Root, environ: dict[str, str]
) -> None:
    """X-GreenArrow-SendID/-ListID/-MtaID land in the envelope; every X-GreenArrow-* field
    (any case, folded or not, known or not) is stripped and every other byte is unchanged."""
    kept_head = (
        b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: s@example.com\r\n"
        b"Subject:  spaced   subject \r\n"
    )
    message = (
        b"X-GreenArrow-SendID: sid-42\r\n"
        + kept_head
        + b"x-greenarrow-listid: newsletter\r\n"
        + b"To: r@example.com\r\n"
        + b"X-GREENARROW-MTAID:\r\n  pool\r\n 1\r\n"
        + b"X-GreenArrow-Something-Else: drop me too\r\n"
        + b"Message-ID: <keep@example.com>\r\n"
        + b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        + b"X-GreenArrowNot: kept (no dash after the prefix)\r\n"
        + b"\r\n"
        + b"X-GreenArrow-SendID: in the body, kept\r\n"
        + b"\x80\xff binary body\r\n"
    )
    inject(["-i", "-f", "s@example.com", "r@example.com"], message, environ)
    env, msg = only_entry(root)
    assert (env["sendid"], env["listid"], env["mtaid"]) == ("sid-42", "newsletter", "pool 1")
    assert env["mailclass"] == ""
    expected = (
        kept_head
        + b"To: r@example.com\r\n"
        + b"Message-ID: <keep@example.com>\r\n"
        + b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        + b"X-GreenArrowNot: kept (no dash after the prefix)\r\n"
        + b"\r\n"
        + b"X-GreenArrow-SendID: in the body, kept\r\n"
        + b"\x80\xff binary body\r\n"
    )
    assert msg == expected


def test_mailclass_header(root: Root, environ: dict[str, str]) -> None:
    """X-GreenArrow-MailClass sets the envelope's mail class and is stripped too."""
    inject(["-f", "s@example.com", "r@example.com"], b"X-GreenArrow-MailClass: promo\n" + SIMPLE, environ)
    env, msg = only_entry(root)
    assert env["mailclass"] == "promo"
    assert msg == SIMPLE_CRLF


def test_header_wins_over_environment(root: Root, environ: dict[str, str]) -> None:
    """Where both give an identifier, the header wins (it is the more specific)."""
    message = b"X-GreenArrow-ListID: fromheader\nX-GreenArrow-SendID: hdr\n" + SIMPLE
    inject(["-f", "s@example.com", "r@example.com"], message, {**environ, **IDS_ENV})
    env, msg = only_entry(root)
    assert env["listid"] == "fromheader"
    assert env["sendid"] == "hdr"
    assert env["mtaid"] == "mta pool 1"  # no header: the variable applies
    assert msg == SIMPLE_CRLF


@pytest.mark.parametrize(
    ("name", "header", "variable", "value"),
    [
        ("ListID", "X-GreenArrow-ListID", "GREENARROW_LISTID", "a" * 21),
        ("ListID", "X-GreenArrow-ListID", "GREENARROW_LISTID", "news-letter"),
        ("SendID", "X-GreenArrow-SendID", "GREENARROW_SENDID", "send id"),
        ("MtaID", "X-GreenArrow-MtaID", "GREENARROW_MTAID", "pool@1"),
        ("Mail Class", "X-GreenArrow-MailClass", "GREENARROW_MAILCLASS", "1st"),
    ],
)
@pytest.mark.parametrize("via", ["header", "variable"])
def test_invalid_identifier_refused(
    root: Root,
    environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    name: str,
    header: str,
    variable: str,
    value: str,
    via: str,
) -> None:
    """An invalid identifier is a permanent error (exit 100); stderr names the identifier,
    the bad value and where it came from; nothing is queued."""
    env = dict(environ)
    message = SIMPLE
    if via == "header":
        message = f"{header}: {value}\n".encode() + SIMPLE
    else:
        env[variable] = value
    code = run_inproc(monkeypatch, ["-f", "s@example.com", "r@example.com"], message, env)
    assert code == EXIT_PERMANENT
    err = capsys.readouterr().err
    assert f"invalid {name} {value!r}" in err
    if via == "header":
        assert f"(from header {header})".lower() in err.lower()
    else:
        assert f"(from environment variable {variable})" in err
    assert entries(root) == []
    assert list((root.queue("ram") / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- Message-ID, Date, CRLF


def test_received_names_the_uid_that_injected(root: Root, environ: dict[str, str]) -> None:
    """Command-line injection puts first a Received field with the uid that ran it
    (Postfix's `from userid`), whatever USER says; injectd passes its client's uid."""
    inject(["-f", "s@example.com", "r@example.com"], b"Subject: x\n\nb\n", environ)
    inject_mod.inject(["r@example.com"], b"Subject: y\n\nb\n", environ, uid=4321)
    raw = sorted((queue_entry.read_entry(path)[1] for path in entries(root)), key=len)
    uids = sorted(int(TRACE.match(msg).group(1)) for msg in raw)
    assert uids == sorted([os.getuid(), 4321])
    assert all(msg.startswith(f"Received: by {ME} (GreenArrow, from userid ".encode())
               for msg in raw)


def test_message_id_and_date_added(root: Root, environ: dict[str, str]) -> None:
    """A message without Message-ID and Date gets both: `<msguid@me>` and a valid date,
    appended after the last header; the rest is unchanged."""
    message = b"From: s@example.com\nSubject: x\n\nbody\n"
    msguid = inject(["-f", "s@example.com", "r@example.com"], message, environ)
    _, msg = only_entry(root)
    headers, body_at = msglib.split_headers(msg)
    assert [h.name for h in headers] == [b"from", b"subject", b"message-id", b"date"]
    assert msglib.header_value(msg, headers[2]) == f"<{msguid}@{ME}>"
    parsedate_to_datetime(msglib.header_value(msg, headers[3]))  # raises if malformed
    assert msg[body_at:] == b"body\r\n"
    assert msg.startswith(b"From: s@example.com\r\nSubject: x\r\n")


def test_message_id_uses_control_me(root: Root, environ: dict[str, str]) -> None:
    """The Message-ID domain follows control/me."""
    control.write(root.control, "me", "other.example")
    msguid = inject(["-f", "s@example.com", "r@example.com"], b"Subject: x\n\nb\n", environ)
    _, msg = only_entry(root)
    assert f"Message-ID: <{msguid}@other.example>".encode() in msg


def test_message_id_and_date_kept(root: Root, environ: dict[str, str]) -> None:
    """Existing Message-ID and Date (any case) are kept and not duplicated."""
    message = b"From: s@example.com\nmessage-id: <mine@example.com>\nDATE: Tue, 2 Jan 2024 10:00:00 +0100\n\nb\n"
    inject(["-f", "s@example.com", "r@example.com"], message, environ)
    _, msg = only_entry(root)
    assert msg == msglib.to_crlf(message)


def test_lf_becomes_crlf(root: Root, environ: dict[str, str]) -> None:
    """LF (and lone CR) line endings become CRLF in the queue; a last line gets its CRLF."""
    message = b"Subject: x\nMessage-ID: <a@b.example>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nFrom: s@example.com\n\nl1\nl2\rl3\r\nl4"
    inject(["-f", "s@example.com", "r@example.com"], message, environ)
    _, msg = only_entry(root)
    assert msg == (
        b"Subject: x\r\nMessage-ID: <a@b.example>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: s@example.com\r\n\r\nl1\r\nl2\r\nl3\r\nl4\r\n"
    )
    assert b"\n" not in msg.replace(b"\r\n", b"")


# --------------------------------------------------------------------------- refused input


def _refused(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    root: Root,
    argv: list[str],
    environ: dict[str, str],
    message: bytes = SIMPLE,
) -> str:
    code = run_inproc(monkeypatch, argv, message, environ)
    err = capsys.readouterr().err
    assert code == EXIT_PERMANENT, err
    assert err.startswith("sendmail: fatal: ")
    assert entries(root) == []
    assert list((root.queue("ram") / "tmp").iterdir()) == []
    return err


def test_no_recipients(root: Root, environ: dict[str, str], monkeypatch, capsys) -> None:
    """No recipient at all (no arguments, no -t) is a permanent error; nothing is queued."""
    err = _refused(monkeypatch, capsys, root, ["-f", "s@example.com"], environ)
    assert "no recipients" in err


def test_t_without_recipient_headers(root: Root, environ: dict[str, str], monkeypatch, capsys) -> None:
    """-t on a message with no To/Cc/Bcc and no argument recipients is refused."""
    err = _refused(monkeypatch, capsys, root, ["-t", "-f", "s@example.com"], environ)
    assert "no recipients" in err


def test_over_databytes(root: Root, environ: dict[str, str], monkeypatch, capsys) -> None:
    """A message over control/databytes is refused with the sizes; one at the limit is queued."""
    control.write(root.control, "databytes", 200)
    big = SIMPLE_CRLF + b"x" * (201 - len(SIMPLE_CRLF) - 2) + b"\r\n"
    assert len(big) == 201
    err = _refused(monkeypatch, capsys, root, ["-i", "-f", "s@example.com", "r@example.com"], environ, big)
    assert "201 bytes" in err and "200" in err and "databytes" in err
    at_limit = big[:-3] + b"\r\n"
    assert len(at_limit) == 200
    inject(["-i", "-f", "s@example.com", "r@example.com"], at_limit, environ)
    assert len(entries(root)) == 1


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("us\xe9r@example.com", "non-ASCII"),
        (os.fsdecode(b"us\xe9r@example.com"), "non-ASCII"),  # a raw byte from argv
        (os.fsdecode(b"user@ex\xffample.com"), "non-ASCII"),
        ("user@", "not of the form local@domain"),
        ("@example.com", "not of the form local@domain"),
        ("user@exa_mple.com", "invalid domain"),
        ("user@-example.com", "invalid domain"),
        ("user@example-.com", "invalid domain"),
        ("user@example..com", "invalid domain"),
        ("user@" + "a" * 64 + ".com", "invalid domain"),
        ("us er@example.com", "invalid local part"),
        ("a\tb@example.com", "control characters"),
    ],
)
@pytest.mark.parametrize("role", ["recipient", "sender"])
def test_bad_address_refused(
    root: Root,
    environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    address: str,
    problem: str,
    role: str,
) -> None:
    """A malformed or 8-bit sender or recipient is a permanent error naming the address
    and what is wrong with it; nothing is queued."""
    if role == "recipient":
        argv = ["-f", "s@example.com", "ok@example.com", address]
    else:
        argv = ["-f", address, "ok@example.com"]
    err = _refused(monkeypatch, capsys, root, argv, environ)
    assert f"{role} address {address!r}" in err
    assert problem in err


def test_bad_header_recipient_refused(root: Root, environ: dict[str, str], monkeypatch, capsys) -> None:
    """With -t, an 8-bit address in a header is refused just like one in the arguments."""
    message = b"To: good@example.com, us\xe9r@example.com\n" + SIMPLE
    err = _refused(monkeypatch, capsys, root, ["-t", "-f", "s@example.com"], environ, message)
    assert "non-ASCII" in err


def test_unreadable_control_is_temporary(root: Root, environ: dict[str, str], monkeypatch, capsys) -> None:
    """A broken control file (databytes) is a temporary failure (111): the operator fixes it."""
    (root.control / "databytes").write_text("lots\n")
    code = run_inproc(monkeypatch, ["-f", "s@example.com", "r@example.com"], SIMPLE, environ)
    assert code == EXIT_TEMPORARY
    assert "databytes" in capsys.readouterr().err
    assert entries(root) == []


# --------------------------------------------------------------------------- temporary failure


def test_queue_write_failure_is_temporary(
    root: Root, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """When the queue cannot be written (tmp/ is gone) the exit is 111 and entries/ stays empty."""
    (root.queue("ram") / "tmp").rmdir()
    argv = ["-f", "s@example.com", "a@example.com", "b@example.com", "c@example.com"]
    code = run_inproc(monkeypatch, argv, SIMPLE, environ)
    assert code == EXIT_TEMPORARY
    assert "cannot write to the queue" in capsys.readouterr().err
    assert entries(root) == []


def test_failure_midway_leaves_nothing(
    root: Root, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """All or nothing: if the second rename into entries/ fails, the first entry is removed
    and so are the files under tmp/; the error is temporary."""
    real_rename = os.rename
    calls = []

    def failing_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(queue_entry.os, "rename", failing_rename)
    with pytest.raises(InjectionError) as e:
        inject(["-f", "s@example.com", "a@example.com", "b@example.com", "c@example.com"], SIMPLE, environ)
    assert not e.value.permanent
    assert len(calls) == 2
    assert entries(root) == []
    assert list((root.queue("ram") / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- many recipients


def test_n_recipients_n_entries(root: Root, environ: dict[str, str]) -> None:
    """N recipients give N entry files `<msguid>-<i>.0.0` with one msguid and the same bytes."""
    rcpts = [f"user{i}@example{i % 3}.com" for i in range(25)]
    msguid = inject(["-f", "s@example.com", *rcpts], SIMPLE, environ)
    items = queued(root)
    assert [name for name, _, _ in items] == sorted(
        (f"{msguid}-{i}.0.0" for i in range(25)), key=lambda n: queue_entry.split_name(n)[0]
    )
    by_index = {int(queue_entry.split_name(name)[0].rsplit("-", 1)[1]): env for name, env, _ in items}
    assert [by_index[i]["recipient"] for i in range(25)] == rcpts
    assert {env["msguid"] for _, env, _ in items} == {msguid}
    assert {msg for _, _, msg in items} == {SIMPLE_CRLF}
    injected = {env["injected_time"] for _, env, _ in items}
    assert len(injected) == 1 and isinstance(injected.pop(), int)


def test_each_injection_has_its_own_msguid(root: Root, environ: dict[str, str]) -> None:
    """Two injections never share a msguid."""
    a = inject(["-f", "s@example.com", "r@example.com"], SIMPLE, environ)
    b = inject(["-f", "s@example.com", "r@example.com"], SIMPLE, environ)
    assert a != b
    assert len(entries(root)) == 2


# --------------------------------------------------------------------------- the real scripts


def _script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENARROW_", "PYTHON", "HVMAIL"))}
    env["USER"] = "scriptuser"
    env.pop("QMAILUSER", None)
    env.pop("QMAILHOST", None)
    env.pop("LOGNAME", None)
    return env


def test_bin_sendmail_script(root: Root) -> None:
    """bin/sendmail (the compiled client; with no injection daemon running it runs
    bin/sendmail.py, written by init_root, `#!python -S`) queues a message into its own
    root: with site.py skipped and no PYTHONPATH, the package is found through the path
    the script puts on sys.path."""
    script = root.bin / "sendmail"
    assert (root.bin / "sendmail.py").read_text().splitlines()[0] == f"#!{sys.executable} -S"
    proc = subprocess.run(
        [str(script), "-f", "s@example.com", "r@example.com"],
        input=DOTTED,
        capture_output=True,
        env=_script_env(),
        cwd="/",
        timeout=WAIT,
    )
    assert proc.returncode == 0, proc.stderr
    env, msg = only_entry(root)
    assert env["recipient"] == "r@example.com"
    assert msg.endswith(b"first\r\n")  # sendmail: the lone dot ends the message

    proc = subprocess.run(
        [str(script), b"us\xe9r@example.com"],
        input=SIMPLE,
        capture_output=True,
        env=_script_env(),
        timeout=WAIT,
    )
    assert proc.returncode == 100
    assert b"sendmail: fatal: recipient address" in proc.stderr
    assert b"non-ASCII" in proc.stderr
    assert len(entries(root)) == 1


def test_bin_qmail_inject_script(root: Root) -> None:
    """bin/qmail-inject queues too, and keeps a lone dot as text; -h means recipients from headers."""
    script = root.bin / "qmail-inject"
    proc = subprocess.run(
        [str(script), "-h", "-f", "s@example.com"],
        input=b"To: q@example.com\n" + DOTTED,
        capture_output=True,
        env=_script_env(),
        timeout=WAIT,
    )
    assert proc.returncode == 0, proc.stderr
    env, msg = only_entry(root)
    assert env["recipient"] == "q@example.com"
    assert env["sender"] == "s@example.com"
    assert msg.endswith(b"first\r\n.\r\nsecond\r\n")


def test_bin_sendmail_temporary_failure(root: Root) -> None:
    """The script exits 111 when the queue cannot be written."""
    (root.queue("ram") / "tmp").rmdir()
    proc = subprocess.run(
        [str(root.bin / "sendmail"), "-f", "s@example.com", "r@example.com"],
        input=SIMPLE,
        capture_output=True,
        env=_script_env(),
        timeout=WAIT,
    )
    assert proc.returncode == 111, proc.stderr
    assert entries(root) == []


# --------------------------------------------------------------------------- properties


_FTEXT = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":")
_VTEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.just("\t"), max_size=30)
_NAME = st.one_of(
    st.text(_FTEXT, min_size=1, max_size=20),
    st.sampled_from(
        ["X-GreenArrow-SendID", "x-greenarrow-listid", "X-GREENARROW-MTAID", "X-GreenArrow-Foo"]
    ),
)


@st.composite
def header_fields(draw: st.DrawFn) -> tuple[str, bytes]:
    """One header field as (name, its bytes), possibly folded over several lines."""
    name = draw(_NAME)
    first = draw(_VTEXT)
    continuations = draw(
        st.lists(
            st.tuples(st.sampled_from([" ", "\t"]), _VTEXT),
            max_size=3,
        )
    )
    text = f"{name}:{first}\r\n" + "".join(f"{ws}{rest}\r\n" for ws, rest in continuations)
    return name, text.encode("ascii")


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(header_fields(), max_size=12),
    body=st.none() | st.binary(max_size=200),
)
def test_split_and_rebuild_properties(fields: list[tuple[str, bytes]], body: bytes | None) -> None:
    """For any header block (folded values, CRLF) plus a body: split_headers finds every field,
    rebuild with nothing dropped returns the message unchanged, and dropping the
    X-GreenArrow-* fields removes exactly their bytes and leaves every other byte as it was."""
    head = b"".join(raw for _, raw in fields)
    msg = head if body is None else head + b"\r\n" + body
    headers, body_at = msglib.split_headers(msg)
    assert [h.name for h in headers] == [name.lower().encode() for name, _ in fields]
    assert [msg[h.start : h.end] for h in headers] == [raw for _, raw in fields]
    assert body_at == (len(head) if body is None else len(head) + 2)
    assert msglib.rebuild(msg, headers, drop=set()) == msg

    drop = {i for i, h in enumerate(headers) if h.name.startswith(b"x-greenarrow-")}
    kept = b"".join(raw for name, raw in fields if not name.lower().startswith("x-greenarrow-"))
    expected = kept if body is None else kept + b"\r\n" + body
    assert msglib.rebuild(msg, headers, drop) == expected
    # prepend/append go before the first and after the last header
    assert msglib.rebuild(msg, headers, set(), prepend=b"P: 1\r\n", append=b"A: 2\r\n") == (
        b"P: 1\r\n" + head + b"A: 2\r\n" + msg[len(head) :]
    )


_ENVELOPE_KEY = st.sampled_from(queue_entry.ENVELOPE_KEYS) | st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)


@settings(max_examples=300, deadline=None)
@example({"sender": "\ud800 lone \udfff", "recipient": "\U0001f600\x00\"\\\x7f\u2028", "attempts": -(2**70)})
@given(st.dictionaries(_ENVELOPE_KEY, _ANY_TEXT | st.integers(), max_size=14))
def test_envelope_line_round_trips(envelope: dict) -> None:
    """envelope_line writes one line of ASCII that json.loads reads back to the same dict,
    for any text (controls, quotes, backslashes, non-BMP, lone surrogates) and any integer."""
    line = queue_entry.envelope_line(envelope)
    assert line.isascii()
    assert b"\n" not in line and b"\r" not in line
    assert json.loads(line) == envelope


@pytest.mark.parametrize("value", [True, 1.5, None, b"x", ["a"]])
def test_envelope_line_refuses_other_types(value: object) -> None:
    """Envelope values are strings and integers only; anything else (bool too) is a TypeError."""
    with pytest.raises(TypeError):
        queue_entry.envelope_line({"sender": value})


def test_header_field_refuses_line_breaks_and_nul() -> None:
    """message.header_field, which makes every header the engine writes: CR, LF or NUL in
    any part is HeaderValueError naming the header; parts after the first are folded."""
    assert msglib.header_field("Received", "from a ([1.2.3.4])", "by b; date") == (
        b"Received: from a ([1.2.3.4])\r\n\tby b; date\r\n")
    for bad in ("a\rb", "a\nb", "a\r\nb", "a\0b", "\n.\nMAIL FROM:<x@y>"):
        with pytest.raises(msglib.HeaderValueError, match="Received"):
            msglib.header_field("Received", "from ok", bad)
        with pytest.raises(msglib.HeaderValueError, match="From"):
            msglib.header_field("From", bad)
