"""SMTP injection: `greenarrow.lib.inject.smtp_injection.SmtpServer` on loopback.

The server runs in a background thread with its own asyncio loop; the tests
talk to it with smtplib, or with a raw socket where smtplib cannot say what
we need (pipelining, 8-bit bytes, a connection dropped mid-DATA). Clients
connect from 127.0.0.1, 127.0.0.2 or 127.0.0.3 (all loopback on Linux) to be
matched by different `control/smtp.tcp` rules. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import select
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_inject import entries, queued

from greenarrow.lib.config import control
from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject.smtp_injection import SmtpServer
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry

ME = "smtp.injector.test"
WAIT = 15.0  # upper bound on any wait; never reached when things work

RELAY_RULES = '127.0.0.1:allow,RELAYCLIENT=""\n127.0.0.2:allow\n:deny\n'

MESSAGE = (
    b"From: s@example.com\r\n"
    b"To: r@example.com\r\n"
    b"Subject: test\r\n"
    b"Message-ID: <fixed@example.com>\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"\r\n"
    b"body line\r\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """An SmtpServer on its own event loop in a daemon thread; records each session."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.server = SmtpServer(root)
        self.sessions: list = []
        factory = self.server._factory

        def recording_factory():
            proto = factory()
            self.sessions.append(proto)
            return proto

        self.server._factory = recording_factory  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        self.call(self.server.start())
        return self

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def in_loop(self, fn: Callable[[], object]) -> object:
        async def wrapper():
            return fn()

        return self.call(wrapper())

    def reload(self) -> None:
        self.in_loop(self.server.reload)

    def wait_sessions_done(self) -> None:
        """Until every session's handler task has finished (its connection processed as closed)."""

        def all_done() -> bool:
            return all(p.closed for p in self.sessions)

        deadline = time.monotonic() + WAIT
        while not self.in_loop(all_done):
            assert time.monotonic() < deadline, "the server did not finish a closed session"
            time.sleep(0.01)

    def stop(self) -> None:
        def drop_clients() -> None:
            for p in self.sessions:
                if p.transport is not None:
                    p.transport.close()

        try:
            self.in_loop(drop_clients)
            self.call(self.server.close())
            self.call(asyncio.sleep(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            if not self.thread.is_alive():
                self.loop.close()


@pytest.fixture
def root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "hvmail")
    init_root(r, ME)
    control.write(r.control, "databytes", 10000)
    (r.control / "smtp.tcp").write_text(RELAY_RULES)
    return r


@pytest.fixture
def start_server(root: Root) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(rules: str | None = None) -> ServerThread:
        if rules is not None:
            (root.control / "smtp.tcp").write_text(rules)
        control.write(root.control, "smtp.listen", [f"127.0.0.1:{free_port()}"])
        server = ServerThread(root).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server()


def port_of(root: Root) -> int:
    return control.read(root.control, "smtp.listen")[0][1]


def client(root: Root, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port_of(root), timeout=WAIT, source_address=(source, 0))




def nothing_queued(root: Root) -> bool:
    return entries(root) == [] and list((root.queue("ram") / "tmp").iterdir()) == []


class RawClient:
    """A line-oriented SMTP client on a plain socket, for what smtplib will not send."""

    def __init__(self, root: Root, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port_of(root)), timeout=WAIT, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its text lines joined by newlines."""
        lines = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), f"connection closed or short line: {line!r}"
            lines.append(line[4:-2].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- EHLO


def test_ehlo_advertises_extensions(root: Root, server: ServerThread) -> None:
    """EHLO advertises PIPELINING, 8BITMIME and SIZE with control/databytes (and not SMTPUTF8)."""
    with client(root) as c:
        code, _ = c.ehlo("client.example")
        assert code == 250
        assert c.has_extn("pipelining")
        assert c.has_extn("8bitmime")
        assert c.esmtp_features["size"] == "10000"
        assert not c.has_extn("smtputf8")
        assert c.ehlo_resp.split(b"\n")[0] == ME.encode()


# --------------------------------------------------------------------------- accepted mail


def test_relayed_message_committed_before_250(root: Root, server: ServerThread) -> None:
    """A relay client's message is in entries/ by the time the 250 arrives, and the reply
    carries the msguid the entry file is named after."""
    with client(root) as c:
        c.ehlo("client.example")
        assert c.mail("s@example.com")[0] == 250
        assert c.rcpt("r@example.com")[0] == 250
        code, text = c.data(MESSAGE)
        names = [p.name for p in entries(root)]  # read at once, before anything else
    assert code == 250
    assert text.startswith(b"ok ")
    msguid = text.split()[1].decode()
    assert names == [f"{msguid}-0.0.0"]
    env, msg = queue_entry.read_entry(entries(root)[0])
    assert env["msguid"] == msguid
    assert (env["sender"], env["recipient"], env["source_ip"]) == (
        "s@example.com",
        "r@example.com",
        "127.0.0.1",
    )
    assert msg.endswith(MESSAGE)


def test_two_recipients_two_entries(root: Root, server: ServerThread) -> None:
    """Two recipients give two entries with one msguid and the same message bytes."""
    with client(root) as c:
        refused = c.sendmail("s@example.com", ["a@example.com", "b@example.org"], MESSAGE)
    assert refused == {}
    items = queued(root)
    assert sorted(env["recipient"] for _, env, _ in items) == ["a@example.com", "b@example.org"]
    assert len({env["msguid"] for _, env, _ in items}) == 1
    assert len({msg for _, _, msg in items}) == 1


def test_null_sender_accepted(root: Root, server: ServerThread) -> None:
    """MAIL FROM:<> (a bounce) is accepted and queued with an empty envelope sender."""
    with client(root) as c:
        c.ehlo("client.example")
        assert c.docmd("MAIL FROM:<>")[0] == 250
        assert c.rcpt("r@example.com")[0] == 250
        assert c.data(MESSAGE)[0] == 250
    [(_, env, _)] = queued(root)
    assert env["sender"] == ""


def test_received_header_added(root: Root, server: ServerThread) -> None:
    """A Received field naming the EHLO name, the client IP and control/me goes first;
    the rest of the message is as sent (it has its own Message-ID and Date)."""
    with client(root) as c:
        c.ehlo("helo.client.example")
        c.sendmail("s@example.com", ["r@example.com"], MESSAGE)
    [(_, _, msg)] = queued(root)
    headers, _ = msglib.split_headers(msg)
    assert headers[0].name == b"received"
    received = " ".join(msglib.header_value(msg, headers[0]).split())
    assert received.startswith(f"from helo.client.example ([127.0.0.1]) by {ME} with ESMTP; ")
    assert msg[headers[0].end :] == MESSAGE


def test_received_header_hidden_by_rule(root: Root, start_server) -> None:
    """GREENARROW_SMTP_RECEIVED_HIDE in the client's rule: no Received field is added."""
    start_server('127.0.0.1:allow,RELAYCLIENT="",GREENARROW_SMTP_RECEIVED_HIDE=""\n:deny\n')
    with client(root) as c:
        c.sendmail("s@example.com", ["r@example.com"], MESSAGE)
    [(_, _, msg)] = queued(root)
    assert msg == MESSAGE


def test_rule_identifiers_in_envelope(root: Root, start_server) -> None:
    """GREENARROW_MAILCLASS and GREENARROW_SENDID set by the smtp.tcp rule land in the
    envelope; other variables of the rule do not matter."""
    start_server(
        '127.0.0.1:allow,RELAYCLIENT="",GREENARROW_MAILCLASS="newsletter",'
        'GREENARROW_SENDID="campaign-7",OTHER="x"\n:deny\n'
    )
    with client(root) as c:
        c.sendmail("s@example.com", ["r@example.com"], MESSAGE)
    [(_, env, _)] = queued(root)
    assert env["mailclass"] == "newsletter"
    assert env["sendid"] == "campaign-7"
    assert env["listid"] == "" and env["mtaid"] == ""


def test_header_identifiers_win_and_are_stripped(root: Root, start_server) -> None:
    """An X-GreenArrow-* header wins over the rule's variable and is stripped from the message."""
    start_server('127.0.0.1:allow,RELAYCLIENT="",GREENARROW_SMTP_RECEIVED_HIDE="",GREENARROW_SENDID="rule"\n')
    message = b"X-GreenArrow-SendID: header\r\nX-GreenArrow-ListID: list1\r\n" + MESSAGE
    with client(root) as c:
        c.sendmail("s@example.com", ["r@example.com"], message)
    [(_, env, msg)] = queued(root)
    assert (env["sendid"], env["listid"]) == ("header", "list1")
    assert msg == MESSAGE


def test_pipelined_commands(root: Root, server: ServerThread) -> None:
    """MAIL, RCPT, RCPT and DATA sent in one write get their replies in order; the message
    sent after 354 is queued for both recipients."""
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO pipe.example\r\n")
        assert "PIPELINING" in c.reply()[1]
        c.send(
            b"MAIL FROM:<s@example.com>\r\n"
            b"RCPT TO:<a@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"DATA\r\n"
        )
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(MESSAGE + b".\r\n")
        code, text = c.reply()
        assert code == 250 and text.startswith("ok ")
        c.send(b"QUIT\r\n")
        assert c.reply()[0] == 221
    assert sorted(env["recipient"] for _, env, _ in queued(root)) == ["a@example.com", "b@example.com"]


def test_pipelined_whole_transaction(root: Root, server: ServerThread) -> None:
    """Even a client that sends the whole transaction, message included, in one write is served."""
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        c.send(
            b"EHLO pipe.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
            + MESSAGE
            + b".\r\nQUIT\r\n"
        )
        assert [c.reply()[0] for _ in range(6)] == [250, 250, 250, 354, 250, 221]
    assert len(entries(root)) == 1


# --------------------------------------------------------------------------- relay refused


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.3"])
def test_relay_refused_without_relayclient(root: Root, server: ServerThread, source: str) -> None:
    """A client whose rule allows it but does not set RELAYCLIENT (127.0.0.2), or that falls
    to `:deny` (127.0.0.3), gets 553 at RCPT, and nothing is queued."""
    with client(root, source) as c:
        c.ehlo("client.example")
        assert c.mail("s@example.com")[0] == 250
        code, text = c.rcpt("r@example.com")
        assert code == 553
        assert b"allowed rcpthosts" in text
        c.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("s@example.com", ["r@example.com"], MESSAGE)
    assert nothing_queued(root)


def test_client_with_no_rule_refused(root: Root, start_server) -> None:
    """A client that no rule matches at all (no default rule) is refused at RCPT too."""
    start_server('127.0.0.1:allow,RELAYCLIENT=""\n127.0.0.2:allow\n')
    with client(root, "127.0.0.3") as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        assert c.rcpt("r@example.com")[0] == 553
        c.docmd("DATA")  # no valid recipient: DATA is refused
    assert nothing_queued(root)


# --------------------------------------------------------------------------- refused messages


def test_over_databytes_refused(root: Root, server: ServerThread) -> None:
    """A message over control/databytes gets 552 (at MAIL when SIZE is declared, after DATA
    otherwise) and nothing is queued; the session goes on."""
    big = MESSAGE + b"x" * 100 + b"\r\n" + (b"y" * 998 + b"\r\n") * 10
    assert len(big) > 10000
    with client(root) as c:
        c.ehlo("client.example")
        code, _ = c.mail("s@example.com", [f"SIZE={len(big)}"])
        assert code == 552
        c.rset()
        assert c.mail("s@example.com")[0] == 250
        assert c.rcpt("r@example.com")[0] == 250
        code, _ = c.data(big)
        assert code == 552
        assert c.noop()[0] == 250
    assert nothing_queued(root)


def test_long_line_accepted(root: Root, server: ServerThread) -> None:
    """A line over 1000 octets in DATA (minified HTML) is accepted as it is, up to databytes;
    the remote worker re-encodes it on the way out (test_real_clients)."""
    long_line = b"<p>" + b"z" * 5000 + b"</p>"
    with client(root) as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        c.rcpt("r@example.com")
        code, _ = c.data(MESSAGE + long_line + b"\r\n")
        assert code == 250
    (_, _, message), = queued(root)
    assert message.endswith(long_line + b"\r\n")


def test_disconnect_mid_data_queues_nothing(root: Root, server: ServerThread) -> None:
    """A client that drops the connection in the middle of DATA leaves nothing in the queue,
    checked once the server has finished with the closed session."""
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO drop.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(MESSAGE + b"more text without the final dot\r\n")
    server.wait_sessions_done()
    assert nothing_queued(root)


def test_invalid_listid_header_refused(root: Root, server: ServerThread) -> None:
    """An invalid X-GreenArrow-ListID header gets 554 naming ListID and the header; nothing queued."""
    message = b"X-GreenArrow-ListID: not-valid\r\n" + MESSAGE
    with client(root) as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        c.rcpt("r@example.com")
        code, text = c.data(message)
    assert code == 554
    assert b"invalid ListID 'not-valid'" in text
    assert b"header" in text.lower()
    assert nothing_queued(root)


def test_invalid_identifier_from_rule_refused(root: Root, start_server) -> None:
    """An invalid GREENARROW_LISTID set by the rule is refused (554) and named with its variable."""
    start_server('127.0.0.1:allow,RELAYCLIENT="",GREENARROW_LISTID="has-dash"\n')
    with client(root) as c:
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("s@example.com", ["r@example.com"], MESSAGE)
    assert e.value.smtp_code == 554
    assert b"ListID" in e.value.smtp_error and b"GREENARROW_LISTID" in e.value.smtp_error
    assert nothing_queued(root)


@pytest.mark.parametrize(
    "address", [b"us\xe9r@example.com", "us\u00e9r@example.com".encode(), b"user@exa\xffmple.com"]
)
def test_8bit_recipient_refused(root: Root, server: ServerThread, address: bytes) -> None:
    """An 8-bit address at RCPT (Latin-1 or UTF-8 bytes) gets 553 saying it is not ASCII;
    the session goes on and nothing is queued."""
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO client.example\r\n")
        assert c.reply()[0] == 250
        c.send(b"MAIL FROM:<s@example.com>\r\n")
        assert c.reply()[0] == 250
        c.send(b"RCPT TO:<" + address + b">\r\n")
        code, text = c.reply()
        assert code == 553
        assert "non-ASCII" in text
        c.send(b"DATA\r\n")
        assert c.reply()[0] == 503  # no valid recipient
        c.send(b"QUIT\r\n")
        assert c.reply()[0] == 221
    assert nothing_queued(root)


def test_8bit_sender_refused(root: Root, server: ServerThread) -> None:
    """An 8-bit address at MAIL gets 553 too."""
    with RawClient(root) as c:
        c.reply()
        c.send(b"EHLO client.example\r\n")
        c.reply()
        c.send(b"MAIL FROM:<s\xe9@example.com>\r\n")
        code, text = c.reply()
        assert code == 553 and "non-ASCII" in text


def test_bad_recipient_syntax_refused(root: Root, server: ServerThread) -> None:
    """A recipient with a bad domain label is refused at RCPT with what is wrong."""
    with client(root) as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        code, text = c.rcpt("r@bad_label.example.com")
        assert code == 553 and b"invalid domain" in text
    assert nothing_queued(root)


def test_queue_write_failure_is_451(root: Root, server: ServerThread) -> None:
    """When the queue cannot be written, DATA gets a temporary 451 and entries/ stays empty."""
    (root.queue("ram") / "tmp").rmdir()
    with client(root) as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        c.rcpt("r@example.com")
        code, _ = c.data(MESSAGE)
    assert code == 451
    assert entries(root) == []


# --------------------------------------------------------------------------- reload


def test_reload_picks_up_new_rules(root: Root, server: ServerThread) -> None:
    """SmtpServer.reload() re-reads smtp.tcp: a client refused before may relay after."""
    with client(root, "127.0.0.2") as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        assert c.rcpt("r@example.com")[0] == 553
    (root.control / "smtp.tcp").write_text('127.0.0.2:allow,RELAYCLIENT=""\n:deny\n')
    server.reload()
    with client(root, "127.0.0.2") as c:
        assert c.sendmail("s@example.com", ["r@example.com"], MESSAGE) == {}
    with client(root, "127.0.0.1") as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        assert c.rcpt("r@example.com")[0] == 553  # 127.0.0.1 now falls to :deny
    assert len(entries(root)) == 1


def test_reload_picks_up_databytes(root: Root, server: ServerThread) -> None:
    """reload() re-reads control/databytes for the limit applied to DATA."""
    control.write(root.control, "databytes", 100)
    server.reload()
    with client(root) as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        c.rcpt("r@example.com")
        assert c.data(MESSAGE + b"x" * 200 + b"\r\n")[0] == 552
    assert nothing_queued(root)


@pytest.mark.parametrize("broken", ["1.2.3.256:allow\n", "=host.example:allow\n", "127.0.0.1:maybe\n"])
def test_broken_rules_keep_old_ones(root: Root, server: ServerThread, broken: str) -> None:
    """A broken smtp.tcp at reload keeps the rules in force: relaying still works as before."""
    before = server.server.policy.settings
    (root.control / "smtp.tcp").write_text(broken)
    server.reload()
    assert server.server.policy.settings is before
    with client(root) as c:
        assert c.sendmail("s@example.com", ["r@example.com"], MESSAGE) == {}
    with client(root, "127.0.0.2") as c:
        c.ehlo("client.example")
        c.mail("s@example.com")
        assert c.rcpt("r@example.com")[0] == 553
    assert len(entries(root)) == 1


def test_idle_session_is_closed_with_421_but_activity_keeps_it_open() -> None:
    """The idle timeout counts from the last input, not from the connection."""
    from greenarrow.lib.smtp.server import SessionPolicy, SmtpSession

    timeout = 0.6

    async def scenario() -> tuple[list[bytes], float, float]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SmtpSession(SessionPolicy(), idle_timeout=timeout), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        replies = [await reader.readline()]
        start = loop.time()
        for _ in range(4):  # 4 x 0.3 s of activity: twice the timeout in all
            await asyncio.sleep(timeout / 2)
            writer.write(b"NOOP\r\n")
            replies.append(await reader.readline())
        active_until = loop.time()
        replies.append(await asyncio.wait_for(reader.readline(), WAIT))
        closed_at = loop.time()
        writer.close()
        server.close()
        return replies, active_until - start, closed_at - active_until

    replies, active, idle = asyncio.run(scenario())
    assert replies[0].startswith(b"220")
    assert all(r.startswith(b"250") for r in replies[1:5])
    assert active > timeout  # still open after more than one timeout of activity
    assert replies[5].startswith(b"421 4.4.2")
    assert idle >= timeout * 0.9


# --------------------------------------------------------------------------- bounds (issue 10)


def test_default_size_limit_advertised_and_enforced(root: Root, start_server) -> None:
    """Without control/databytes the limit is 10 MB (Postfix's message_size_limit): EHLO
    advertises it, a larger SIZE= is refused at MAIL and a larger DATA after its end."""
    (root.control / "databytes").unlink()
    start_server()
    limit = 10 * 1024 * 1024
    with client(root) as c:
        c.ehlo("client.example")
        assert c.esmtp_features["size"] == str(limit)
        assert c.mail("s@example.com", [f"SIZE={limit + 1}"])[0] == 552
        c.rset()
        assert c.mail("s@example.com", [f"SIZE={limit}"])[0] == 250
        assert c.rcpt("r@example.com")[0] == 250
        code, _ = c.data(MESSAGE + (b"y" * 998 + b"\r\n") * (limit // 1000 + 10))
        assert code == 552
        assert c.noop()[0] == 250
    assert nothing_queued(root)


def test_data_over_limit_is_not_kept(root: Root, server: ServerThread) -> None:
    """Once a DATA is over databytes its bytes are dropped as they arrive (a few kept for the
    final dot): the session's buffer stays tiny however much more comes, then 552."""
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO big.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        sent = 0
        for _ in range(50):  # 50 x 10 KB, fifty times databytes
            c.send((b"z" * 998 + b"\r\n") * 10)
            sent += 10000
        session = server.sessions[-1]
        deadline = time.monotonic() + WAIT
        while server.in_loop(lambda: session._received) < sent:
            assert time.monotonic() < deadline, "smtpd did not read what was sent"
            time.sleep(0.01)
        assert server.in_loop(lambda: len(session.buffer)) < 64
        c.send(b".\r\n")
        assert c.reply()[0] == 552
    assert nothing_queued(root)


def test_sessions_capped_in_total_and_per_address(root: Root, start_server) -> None:
    """smtp.sessions.per_ip and smtp.sessions.max: the session over either gets 421 and is
    closed; a freed place is taken again."""
    control.write(root.control, "smtp.sessions.per_ip", 2)
    control.write(root.control, "smtp.sessions.max", 3)
    server = start_server()
    opened = [RawClient(root, "127.0.0.1"), RawClient(root, "127.0.0.1")]
    try:
        assert [c.reply()[0] for c in opened] == [220, 220]
        with RawClient(root, "127.0.0.1") as third:
            code, text = third.reply()
            assert code == 421 and "smtp.sessions.per_ip" in text
            assert third.file.readline() == b""  # closed
        opened.append(RawClient(root, "127.0.0.2"))
        assert opened[-1].reply()[0] == 220
        with RawClient(root, "127.0.0.3") as fourth:
            code, text = fourth.reply()
            assert code == 421 and "smtp.sessions.max" in text
        opened.pop(0).close()
        deadline = time.monotonic() + WAIT
        while server.in_loop(lambda: server.server.sessions.by_address.get("127.0.0.1")) != 1:
            assert time.monotonic() < deadline, "the closed session was not counted out"
            time.sleep(0.01)
        opened.append(RawClient(root, "127.0.0.1"))
        assert opened[-1].reply()[0] == 220
        server.reload()  # the count outlives a reload
        with RawClient(root, "127.0.0.3") as fifth:
            assert fifth.reply()[0] == 421
    finally:
        for c in opened:
            c.close()
    server.wait_sessions_done()
    assert server.in_loop(lambda: (server.server.sessions.total,
                                   server.server.sessions.by_address)) == (0, {})


def trickle(c: RawClient, data: bytes, pause: float) -> tuple[int, str] | None:
    """Send `data` a byte every `pause` seconds; the reply that came before the last byte
    was sent, if any (None: all of it went out with no reply)."""
    for i in range(len(data)):
        try:
            c.sock.sendall(data[i:i + 1])
        except OSError:
            break
        readable, _, _ = select.select([c.sock], [], [], pause)
        if readable and i < len(data) - 1:
            return c.reply()
    return None


def test_trickled_command_is_cut(root: Root, start_server) -> None:
    """A command line sent a byte at a time is cut with 421 once smtp.timeout has passed since
    the last reply: a byte does not reset the timer."""
    control.write(root.control, "smtp.timeout", 1.0)
    start_server()
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        got = trickle(c, b"HELO " + b"a" * 60 + b"\r\n", 0.1)  # 6.7 s in all
        assert got is not None and got[0] == 421, got


def test_trickled_data_is_cut_but_a_steady_one_is_not(root: Root, start_server) -> None:
    """After smtp.timeout, a DATA must average smtp.data.minrate bytes a second: one that
    trickles is cut with 421, one that keeps up is accepted however long it takes."""
    control.write(root.control, "smtp.timeout", 1.0)
    control.write(root.control, "smtp.data.minrate", 1024)
    control.write(root.control, "databytes", 0)
    start_server()
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO slow.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        got = trickle(c, MESSAGE + b"x" * 60 + b"\r\n.\r\n", 0.1)
        assert got is not None and got[0] == 421, got
    with RawClient(root) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO steady.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(MESSAGE)
        for _ in range(6):  # 3 s, three times the timeout, at about 8 KB a second
            time.sleep(0.5)
            c.send((b"y" * 398 + b"\r\n") * 10)
        c.send(b".\r\n")
        assert c.reply()[0] == 250
    assert len(entries(root)) == 1


def test_client_without_address_is_unknown(root: Root, start_server) -> None:
    """A client with no peer address (here a Unix socket) is not 127.0.0.1: only the default
    rule of smtp.tcp applies, so the loopback rule's RELAYCLIENT does not."""
    import tempfile

    server = start_server(RELAY_RULES)  # 127.0.0.1 relays, the default denies
    folder = tempfile.mkdtemp(prefix="smtpd-")
    path = f"{folder}/smtp.sock"

    async def listen() -> asyncio.AbstractServer:
        return await asyncio.get_running_loop().create_unix_server(server.server._factory, path)

    unix = server.call(listen())
    try:
        def talk() -> tuple[int, int]:
            with smtplib.SMTP(timeout=WAIT) as c:
                c.sock = socket.socket(socket.AF_UNIX)
                c.sock.settimeout(WAIT)
                c.sock.connect(path)
                c.file = None
                assert c.getreply()[0] == 220
                c.ehlo("unix.example")
                assert c.mail("s@example.com")[0] == 250
                rcpt = c.rcpt("r@example.com")[0]
                data = c.data(MESSAGE)[0] if rcpt == 250 else 0
                return rcpt, data

        assert talk()[0] == 553
        assert nothing_queued(root)
        (root.control / "smtp.tcp").write_text(':allow,RELAYCLIENT=""\n')
        server.reload()
        assert talk() == (250, 250)
        [(_, env, msg)] = queued(root)
        assert env["source_ip"] == ""
        assert msg.startswith(b"Received: from unix.example (unknown)\r\n")
    finally:
        unix.close()
        server.call(unix.wait_closed())
        os.unlink(path)
        os.rmdir(folder)
