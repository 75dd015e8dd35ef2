"""SMTP smuggling through the headers the engine writes (CVE-2023-51764 class).

A "lax receiver" on loopback takes a bare LF or a bare CR for a line end,
as the vulnerable servers do, so `\\n.\\n` or `\\r.\\r` inside a header would
end the DATA there and what follows would be read as new commands: one
submitted message would arrive as two. The real engine (tests/engine.py)
delivers to it; every value the engine copies into a header it writes (the
`-F` full name into From, the `-f` sender and QMAILUSER/QMAILHOST, the
GREENARROW_* identifiers, the HELO/EHLO argument into Received) is sent
carrying the smuggling patterns. Each submission must be refused with the
right code or arrive as exactly one message.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest
from engine import Engine, route_conf, wait_until

from greenarrow.lib.inject import command_line

WAIT = 20.0

# What follows the fake end of data: a whole second transaction.
SMUGGLED = "MAIL FROM:<evil@attacker.test>{e}RCPT TO:<victim@dest.test>{e}DATA{e}Subject: smuggled{e}"
PATTERNS = {
    "lf": "\n.\n" + SMUGGLED.format(e="\n"),
    "cr": "\r.\r" + SMUGGLED.format(e="\r"),
    "crlf": "\r\n.\r\n" + SMUGGLED.format(e="\r\n"),
    "lf-cr": "\n.\r" + SMUGGLED.format(e="\r\n"),
    "nul": "x\x00y",
}

BODY = b"Subject: hello\n\nbody\n"
# SimpleMH writes X-Mailer-Info, List-Unsubscribe and the tracking links from the
# identifiers and X-GreenArrow-* values (docs/simplemh.md).
CLASS = """
mail_class news {
    listid t100
    track_clicks_and_opens yes
    url_domain https://links.example.com
    bounce_address bounce@bounces.example.com
}
"""


class LaxReceiver:
    """A raw SMTP server that ends a line at CRLF, a bare CR or a bare LF.

    `transactions` counts MAIL commands, `messages` counts ends of DATA:
    a smuggled message shows as more of either than was submitted.
    """

    def __init__(self) -> None:
        self.transactions = 0
        self.messages: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    def start(self) -> LaxReceiver:
        self.thread.start()

        async def serve() -> asyncio.AbstractServer:
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(WAIT)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shut() -> None:
            assert self.server is not None
            self.server.close()
            for w in self.writers:
                w.transport.abort()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(WAIT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)

    @staticmethod
    def _next_line(buf: bytearray) -> bytes | None:
        """The first line of `buf` ended by CRLF, CR or LF (removed from buf), or None."""
        for i, c in enumerate(buf):
            if c == 0x0A or c == 0x0D:
                if c == 0x0D and i + 1 == len(buf):
                    return None  # a CR at the end may be the start of a CRLF
                size = 2 if c == 0x0D and buf[i + 1] == 0x0A else 1
                line = bytes(buf[:i])
                del buf[:i + size]
                return line
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        buf = bytearray()
        in_data = False
        data: list[bytes] = []
        writer.write(b"220 lax.test ESMTP\r\n")
        try:
            while True:
                line = self._next_line(buf)
                if line is None:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    buf += chunk
                    continue
                if in_data:
                    if line == b".":
                        in_data = False
                        self.messages.append(b"\n".join(data))
                        data = []
                        writer.write(b"250 ok\r\n")
                    else:
                        data.append(line)
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-lax.test\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    self.transactions += 1
                    writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    in_data = True
                    writer.write(b"354 go\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
        except (OSError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@pytest.fixture(scope="module")
def lax() -> LaxReceiver:
    rx = LaxReceiver().start()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, lax: LaxReceiver) -> Engine:
    tmp_path: Path = tmp_path_factory.mktemp("smuggling")
    eng = Engine(tmp_path, conf=route_conf({"dest.test": lax.port}) + CLASS)
    (eng.root.control / "smtp.tcp").write_text('127.0.0.1:allow,RELAYCLIENT=""\n:deny\n')
    eng.start()
    yield eng
    eng.stop()


def delivered(engine: Engine, count: int) -> None:
    wait_until(lambda: sum(1 for r in engine.records() if r.get("status") == "success") >= count,
               WAIT, f"{count} deliveries")


def settle(engine: Engine, lax: LaxReceiver, accepted: int) -> None:
    """Wait for the accepted messages to be delivered, then check nothing more arrived."""
    delivered(engine, accepted)
    time.sleep(0.5)  # a smuggled second message would arrive on the same connection, at once
    assert lax.transactions == accepted, lax.messages
    assert len(lax.messages) == accepted, lax.messages


def test_lax_receiver_is_lax() -> None:
    """The receiver does split at bare line ends: a raw `\\r.\\r` ends its DATA, so the
    tests below would see a smuggled message if the engine let one through."""
    rx = LaxReceiver().start()
    try:
        payload = ("Subject: x" + PATTERNS["cr"] + "\r\nbody\r\n.\r\n").encode()
        replies = smtp_exchange(rx.port, [b"EHLO t\r\n", b"MAIL FROM:<a@b.test>\r\n",
                                          b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n", payload])
        assert replies[-1].startswith(b"250"), replies
        wait_until(lambda: len(rx.messages) == 2, WAIT, "the smuggled second message")
        assert rx.transactions == 2
    finally:
        rx.stop()


def test_sendmail_values(engine: Engine, lax: LaxReceiver) -> None:
    """-F, -f, QMAILUSER, QMAILHOST and GREENARROW_* with CR/LF are refused (exit 100,
    naming the option or variable); bare line ends in the message itself arrive as one."""
    accepted = len(lax.messages)
    for name, pattern in PATTERNS.items():
        if "\x00" in pattern:
            continue  # argv and environ cannot hold NUL: see test_nul_in_command_line_values
        cases = [
            (["-F", f"Eve{pattern}", "-f", "s@example.com"], {}, "-F"),
            (["-f", f"s{pattern}@example.com"], {}, "-f"),
            ([], {"QMAILUSER": f"u{pattern}"}, "QMAILUSER"),
            ([], {"QMAILHOST": f"h{pattern}.example"}, "QMAILHOST"),
            (["-f", "s@example.com"], {"GREENARROW_SENDID": f"s{pattern}"}, "GREENARROW_SENDID"),
            (["-f", "s@example.com"], {"GREENARROW_MTAID": f"m{pattern}"}, "GREENARROW_MTAID"),
            (["-f", "s@example.com"], {"GREENARROW_LISTID": f"l{pattern}"}, "GREENARROW_LISTID"),
            (["-f", "s@example.com"], {"GREENARROW_MAILCLASS": f"news{pattern}"},
             "GREENARROW_MAILCLASS"),
        ]
        for args, env, what in cases:
            result = engine.sendmail(*args, "r@dest.test", message=BODY, env=env)
            err = result.stderr.decode()
            assert result.returncode == command_line.EXIT_PERMANENT, (name, what, err)
            assert what in err, (name, what, err)
        # The same patterns in the message's own headers and body are line ends of the
        # message: normalised to CRLF and dot-stuffed, never raw.
        raw = f"Subject: a{pattern}\n\nline{pattern}\n".encode()
        result = engine.sendmail("-i", "-F", "Plain Name", "-f", "s@example.com", "r@dest.test",
                                 message=raw)
        assert result.returncode == 0, result.stderr
        accepted += 1
    settle(engine, lax, accepted)


def test_simplemh_values(engine: Engine, lax: LaxReceiver) -> None:
    """SimpleMH mail (X-Mailer-Info, List-Unsubscribe, links written by the engine): an
    X-GreenArrow-* value holding NUL is refused naming its header; the bare line ends a
    header value may hold become line ends of the message; each copy arrives as one."""
    before = accepted = len(lax.messages)
    for header in ("X-GreenArrow-InstanceID", "X-GreenArrow-Click-Tracking-ID",
                   "X-GreenArrow-Obscured-Email", "X-GreenArrow-URL-Domain",
                   "X-GreenArrow-List-Unsubscribe-HTTP-URL", "X-GreenArrow-SendID"):
        value = f"https://a{PATTERNS['nul']}.example" if "URL" in header else PATTERNS["nul"]
        raw = f"{header}: {value}\nSubject: s\n\nbody\n".encode()
        result = engine.sendmail("-f", "s@example.com", "r@dest.test", message=raw,
                                 env={"GREENARROW_MAILCLASS": "news"})
        assert result.returncode == command_line.EXIT_PERMANENT, (header, result.stderr)
        assert header.encode() in result.stderr, (header, result.stderr)
    for name, pattern in PATTERNS.items():
        if "\x00" in pattern:
            continue
        raw = (f"X-GreenArrow-InstanceID: i{pattern}\nX-GreenArrow-Click-Tracking-ID: c{pattern}"
               f"\nSubject: s{pattern}\n\n<a href=\"https://shop.example/{name}\">x</a>\n").encode()
        result = engine.sendmail("-i", "-f", "s@example.com", "r@dest.test", message=raw,
                                 env={"GREENARROW_MAILCLASS": "news"})
        assert result.returncode == 0, (name, result.stderr)
        accepted += 1
    settle(engine, lax, accepted)
    assert all(b"X-Mailer-Info: " in m for m in lax.messages[before:])


def smtp_exchange(port: int, lines: list[bytes]) -> list[bytes]:
    """Send each command (its line end included) and read one reply for each."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        for line in lines:
            s.sendall(line)
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            replies.append(reply)
    return replies


def test_smtp_helo_values(engine: Engine, lax: LaxReceiver) -> None:
    """A HELO/EHLO argument holding CR or NUL is refused with 501; a relayed message
    whose Received header carries the HELO of a clean session arrives as one."""
    accepted = len(lax.messages)
    for verb in (b"HELO", b"EHLO"):
        for name, pattern in PATTERNS.items():
            if "\n" in pattern:
                continue  # a LF ends smtpd's command line: what follows is another command
            helo = f"client{pattern}".encode("latin-1")
            replies = smtp_exchange(engine.smtp_port, [
                verb + b" " + helo + b"\r\n",
                b"MAIL FROM:<s@example.com>\r\n",
                b"QUIT\r\n",
            ])
            assert replies[0].startswith(b"501 "), (verb, name, replies)
            assert replies[1].startswith(b"503 "), (verb, name, replies)
    replies = smtp_exchange(engine.smtp_port, [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<s@example.com>\r\n",
        b"RCPT TO:<r@dest.test>\r\n",
        b"DATA\r\n",
        b"Subject: bare\rX: a\r.\rMAIL FROM:<evil@attacker.test>\r\n\r\nbody\n.\nRCPT\r\n.\r\n",
        b"QUIT\r\n",
    ])
    assert replies[4].startswith(b"250 "), replies
    settle(engine, lax, accepted + 1)
    assert b"Received: from client.test " in lax.messages[-1]


def test_nul_in_command_line_values(tmp_path: Path) -> None:
    """NUL (which only the injectd socket can carry) in -F, -f or QMAILUSER: exit 100."""
    from greenarrow.lib.core.paths import Root
    from greenarrow.lib.ops.install_root import init_root

    root = Root(tmp_path / "hvmail")
    init_root(root, me="engine.test")
    environ = {"HVMAIL_ROOT": str(root.path), "USER": "u"}
    for args, env, what in (
        (["-F", "Eve\x00x", "-f", "s@example.com"], {}, "-F"),
        (["-f", "s\x00@example.com"], {}, "-f"),
        ([], {"QMAILUSER": "u\x00x"}, "QMAILUSER"),
    ):
        code, err = command_line.outcome([*args, "r@dest.test"], BODY, {**environ, **env},
                                         "sendmail")
        assert code == command_line.EXIT_PERMANENT, (what, err)
        assert what in err, (what, err)
    assert not list((root.queue("ram") / "entries").iterdir())
