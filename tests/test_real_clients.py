"""What the engine meets in the field: real clients, as Debian ships them.

Each test drives the engine with the software applications already run
(msmtp, swaks, bsd-mailx, a sendmail -bs transport) or with a Python client
that does what such software does on the wire. A test that needs a Debian
binary is skipped, with the package named, when it is missing; `.ci/run`
installs them.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from smtp_receivers import self_signed_context
from test_smtpd import MESSAGE, RELAY_RULES, WAIT, ServerThread, free_port, queued

from greenarrow.lib.config import control
from greenarrow.lib.core import users
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import init_root

NAME = "inject.tls.test"


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package})")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "hvmail")
    init_root(r, "smtp.injector.test")
    (r.control / "smtp.tcp").write_text(RELAY_RULES)
    control.write(r.control, "smtp.listen", [f"127.0.0.1:{free_port()}"])
    return r


@pytest.fixture
def tls_root(root: Root) -> Root:
    (root.control / "tls").mkdir()
    self_signed_context(root.control / "tls", NAME)
    control.write(root.control, "smtp.tls.cert", "tls/cert.pem")
    control.write(root.control, "smtp.tls.key", "tls/key.pem")
    return root


def port_of(root: Root) -> int:
    return control.read(root.control, "smtp.listen")[0][1]


# ----------------------------------------------------------------- STARTTLS


def _read_reply(sock: ssl.SSLSocket | socket.socket, pending: bytearray) -> bytes:
    """One whole (possibly multi-line) reply from `sock`; bounded by the socket timeout."""
    while True:
        lines = bytes(pending).split(b"\r\n")
        for i, line in enumerate(lines[:-1]):
            if line[3:4] == b" ":
                reply = b"\r\n".join(lines[:i + 1]) + b"\r\n"
                del pending[:len(reply)]
                return reply
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; had {bytes(pending)!r}"
        pending += chunk


def test_ehlo_in_the_same_packet_as_the_handshake_end(
        tls_root: Root, start: Callable[[], ServerThread]) -> None:
    """A client (GnuTLS, as in msmtp) sends EHLO in the segment that ends its handshake.

    The handshake is driven through memory BIOs, so the client's last handshake
    flight and its encrypted EHLO leave in one sendall: the server must answer it.
    """
    start()
    sock = socket.create_connection(("127.0.0.1", port_of(tls_root)), timeout=WAIT)
    with sock:
        pending = bytearray()
        assert _read_reply(sock, pending).startswith(b"220")
        sock.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        assert b"STARTTLS" in _read_reply(sock, pending)
        assert _read_reply(sock, pending).startswith(b"220")
        context = ssl.create_default_context(cafile=str(tls_root.control / "tls" / "cert.pem"))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=NAME)
        for _ in range(20):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        else:
            pytest.fail("the TLS handshake did not finish")
        tls.write(b"EHLO client.test\r\n")
        sock.sendall(outgoing.read())  # handshake end + EHLO, one segment
        text = bytearray()
        for _ in range(50):
            try:
                text += tls.read(65536)
            except ssl.SSLWantReadError:
                chunk = sock.recv(65536)  # raises TimeoutError if the server sits on it
                assert chunk, "server closed the connection"
                incoming.write(chunk)
                continue
            if b"\r\n250 " in text or text.startswith(b"250 "):
                break
        assert b"250-PIPELINING" in text
        assert b"STARTTLS" not in text


def test_msmtp_starttls(tls_root: Root, start: Callable[[], ServerThread], tmp_path: Path) -> None:
    """msmtp (GnuTLS) over STARTTLS: the message is queued, the trace says ESMTPS."""
    msmtp = need("msmtp", "msmtp")
    start()
    result = subprocess.run(
        [msmtp, "--host=127.0.0.1", f"--port={port_of(tls_root)}", "--auth=off",
         "--tls=on", "--tls-starttls=on",
         f"--tls-trust-file={tls_root.control / 'tls' / 'cert.pem'}",
         f"--tls-host-override={NAME}", "--domain=client.test",
         "--from=s@example.com", "--timeout=10", "r@example.com"],
        input=MESSAGE, capture_output=True, timeout=WAIT * 2, cwd=tmp_path,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr.decode()
    (_, envelope, message), = queued(tls_root)
    assert envelope["recipient"] == "r@example.com"
    assert b"with ESMTPS;" in message


# ----------------------------------------------------------------- addresses without a domain


@pytest.fixture
def inject_root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "hvmail")
    init_root(r, "mx.injector.test")
    return r


def entries_of(root: Root) -> list[tuple[dict, bytes]]:
    from greenarrow.lib.queue import entry as queue_entry

    folder = root.queue("ram") / "entries"
    return [queue_entry.read_entry(path) for path in sorted(folder.iterdir())]


def run_sendmail(root: Root, *args: str, stdin: bytes = b"Subject: hi\n\nbody\n",
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(root.bin / "sendmail"), *args], input=stdin,
                          capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "USER": "cron", **(env or {})})


def test_cron_style_recipient_and_sender_get_the_default_host(inject_root: Root) -> None:
    """`sendmail -f www-data root` (cron, `mail root`): both get @me, as qmail-inject does."""
    result = run_sendmail(inject_root, "-f", "www-data", "root")
    assert result.returncode == 0, result.stderr
    (envelope, message), = entries_of(inject_root)
    assert envelope["recipient"] == "root@mx.injector.test"
    assert envelope["sender"] == "www-data@mx.injector.test"


def test_defaulthost_defaultdomain_and_plusdomain(inject_root: Root) -> None:
    """The three control files, as qmail-inject reads them (default: control/me each)."""
    control.write(inject_root.control, "defaulthost", "box")
    control.write(inject_root.control, "defaultdomain", "example.org")
    control.write(inject_root.control, "plusdomain", "plus.example")
    result = run_sendmail(inject_root, "-f", "alice@web+", "root", "bob@host", "carol@a.b",
                          "dave@[192.0.2.1]")
    assert result.returncode == 0, result.stderr
    got = [(e["sender"], e["recipient"]) for e, _ in entries_of(inject_root)]
    assert sorted(r for _, r in got) == sorted(["root@box.example.org", "bob@host.example.org",
                                                "carol@a.b", "dave@[192.0.2.1]"])
    assert {s for s, _ in got} == {"alice@web.plus.example"}


def test_user_at_nothing_is_still_refused(inject_root: Root) -> None:
    result = run_sendmail(inject_root, "-f", "s@example.com", "root@")
    assert result.returncode == 100 and b"'root@'" in result.stderr


def test_bsd_mailx_to_root(inject_root: Root, tmp_path: Path) -> None:
    """`echo body | mail -s subject root`, as monitoring scripts send alerts."""
    mail = need("bsd-mailx", "bsd-mailx")
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={inject_root.bin / 'sendmail'}\n")
    result = subprocess.run([mail, "-s", "disk full", "root"], input=b"/var is at 99%\n",
                            capture_output=True, timeout=60, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                 "MAILRC": str(rc), "USER": "monitor", "LOGNAME": "monitor"})
    assert result.returncode == 0, result.stderr
    (envelope, message), = entries_of(inject_root)
    assert envelope["recipient"] == "root@mx.injector.test"
    assert envelope["sender"] == "monitor@mx.injector.test"
    assert b"Subject: disk full" in message and b"/var is at 99%" in message


# ----------------------------------------------------------------- sendmail -bs


class PipeSmtp:
    """An SMTP client on a program's pipes, as Symfony Mailer's sendmail transport is."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env)
        self.pending = b""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)

    def readline(self) -> bytes:
        """One line of output, waiting at most WAIT seconds for it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WAIT
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            assert ready, f"no reply within {WAIT} s; had {self.pending!r}"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            self.pending += chunk
        line, sep, self.pending = self.pending.partition(b"\n")
        return line + sep

    def reply(self) -> tuple[int, str]:
        lines = []
        for _ in range(100):
            line = self.readline()
            assert line.endswith(b"\r\n"), f"short reply line {line!r}"
            lines.append(line[4:-2].decode())
            if line[3:4] == b" ":
                return int(line[:3]), "\n".join(lines)
        raise AssertionError("endless reply")

    def command(self, line: bytes) -> tuple[int, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\r\n")
        self.proc.stdin.flush()
        return self.reply()

    def finish(self) -> int:
        return self.proc.wait(timeout=WAIT)


@pytest.fixture
def pipe_smtp() -> Iterator[Callable[..., PipeSmtp]]:
    made: list[PipeSmtp] = []

    def make(argv: list[str], env: dict[str, str]) -> PipeSmtp:
        made.append(PipeSmtp(argv, env))
        return made[-1]

    yield make
    for smtp in made:
        smtp.close()


def bs_env(root: Root, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "USER": "www-data", **extra}


def test_sendmail_bs_as_symfony_mailer_speaks_it(inject_root: Root,
                                                 pipe_smtp: Callable[..., PipeSmtp]) -> None:
    """`sendmail -bs -i`, command by command: queued with the same checks as SMTP."""
    # A listening but silent injectd socket: the compiled client must not hand -bs to it.
    with socket.socket(socket.AF_UNIX) as daemon:
        daemon.bind(str(inject_root.path / "var" / "inject.sock"))
        daemon.listen(1)
        smtp = pipe_smtp([str(inject_root.bin / "sendmail"), "-bs", "-i"],
                        bs_env(inject_root, GREENARROW_LISTID="app_7"))
        assert smtp.reply()[0] == 220
        code, text = smtp.command(b"EHLO [127.0.0.1]")
        assert code == 250 and "PIPELINING" in text and "STARTTLS" not in text
        assert smtp.command(b"MAIL FROM:<app@example.com>")[0] == 250
        assert smtp.command(b"RCPT TO:<user@example.org>")[0] == 250  # relayed: a local user
        assert smtp.command(b"RCPT TO:<root>")[0] == 250  # completed as on the command line
        assert smtp.command(b"RCPT TO:<bad@exa_mple.com>")[0] == 553
        assert smtp.command(b"DATA")[0] == 354
        code, text = smtp.command(MESSAGE.replace(b"body line", b"..dotted") + b".")
        assert code == 250 and text.startswith("ok ")
        assert smtp.command(b"QUIT")[0] == 221
        assert smtp.finish() == 0
    got = entries_of(inject_root)
    assert sorted(e["recipient"] for e, _ in got) == ["root@mx.injector.test", "user@example.org"]
    envelope, message = got[0]
    assert envelope["sender"] == "app@example.com" and envelope["listid"] == "app_7"
    assert message.startswith(b"Received: by mx.injector.test (GreenArrow, from userid ")
    assert b"\r\n.dotted\r\n" in message


def test_sendmail_bs_refuses_what_smtp_refuses(inject_root: Root,
                                               pipe_smtp: Callable[..., PipeSmtp]) -> None:
    control.write(inject_root.control, "databytes", 300)
    smtp = pipe_smtp([str(inject_root.bin / "sendmail"), "-bs"], bs_env(inject_root))
    assert smtp.reply()[0] == 220
    assert smtp.command(b"MAIL FROM:<a@example.com>")[0] == 503  # HELO first
    assert smtp.command(b"HELO app")[0] == 250
    assert smtp.command(b"MAIL FROM:<a@example.com> SIZE=301")[0] == 552
    assert smtp.command(b"MAIL FROM:<a@example.com>")[0] == 250
    assert smtp.command(b"RCPT TO:<b@example.com>")[0] == 250
    assert smtp.command(b"DATA")[0] == 354
    assert smtp.command(b"Subject: x\r\n\r\n" + b"y" * 400 + b"\r\n.")[0] == 552
    assert smtp.proc.stdin is not None
    smtp.proc.stdin.close()  # end of input without QUIT: the session ends
    assert smtp.finish() == 0
    assert entries_of(inject_root) == []


def test_swaks_over_sendmail_bs(inject_root: Root) -> None:
    """swaks --pipe runs the program and speaks SMTP to it, as the PHP frameworks do."""
    swaks = need("swaks", "swaks")
    result = subprocess.run(
        [swaks, "--pipe", f"{inject_root.bin / 'sendmail'} -bs -i", "--from", "app@example.com",
         "--to", "user@example.org", "--helo", "app.test", "--header", "Subject: via swaks",
         "--timeout", "20"],
        capture_output=True, timeout=60, env=bs_env(inject_root))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    (envelope, message), = entries_of(inject_root)
    assert envelope["recipient"] == "user@example.org"
    assert b"Subject: via swaks" in message


def test_help_lists_bs(inject_root: Root) -> None:
    result = run_sendmail(inject_root, "--help")
    assert result.returncode == 0 and b"-bs" in result.stdout


# ----------------------------------------------------------------- long lines


LONG_HTML = b"<html><body>" + b"".join(b"<p class=x>caf\xc3\xa9 %d</p>" % i for i in range(400)) \
    + b"</body></html>"
LONG_MESSAGE = (
    b"From: App <app@origin.test>\r\n"
    b"To: user@dest.test\r\n"
    b"Subject: minified\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n"
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"short text\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + LONG_HTML + b"\r\n"
    b"--b1--\r\n"
)


def _decoded_parts(message: bytes) -> list[bytes]:
    import email
    import email.policy

    parsed = email.message_from_bytes(message, policy=email.policy.SMTP)
    return [part.get_payload(decode=True) for part in parsed.walk()
            if not part.is_multipart()]


def test_shorten_long_lines_keeps_what_the_parts_decode_to() -> None:
    from greenarrow.lib.core.wire_encoding import shorten_long_lines
    from greenarrow.pyx import simplemh as fast

    out = shorten_long_lines(LONG_MESSAGE)
    assert fast.max_line_length(out) <= 998
    assert _decoded_parts(out) == _decoded_parts(LONG_MESSAGE)
    assert out.count(b"Content-Transfer-Encoding: quoted-printable") == 1
    assert out.startswith(LONG_MESSAGE[:LONG_MESSAGE.index(b"--b1\r\nContent-Type: text/html")])
    # not MIME at all: becomes a quoted-printable MIME message
    plain = b"From: a@origin.test\r\nSubject: x\r\n\r\n" + b"y=" * 700 + b"\r\n"
    out = shorten_long_lines(plain)
    assert b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" in out
    assert fast.max_line_length(out) <= 998 and _decoded_parts(out) == [b"y=" * 700 + b"\r\n"]
    # base64 on one line: re-wrapped; quoted-printable with long lines: re-encoded
    import base64

    data = bytes(range(256)) * 10
    b64 = (b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.b64encode(data) + b"\r\n")
    assert _decoded_parts(shorten_long_lines(b64)) == [data]
    assert fast.max_line_length(shorten_long_lines(b64)) <= 76
    short = b"From: a@b.test\r\n\r\nfine\r\n"
    assert shorten_long_lines(short) is short


def test_long_lines_accepted_and_delivered_within_998_octets_and_signed(tmp_path: Path) -> None:
    """Minified HTML over SMTP: 250 at injection; the receiver (aiosmtpd refuses lines over
    1000 octets) gets it re-encoded, DKIM-valid, decoding to the injected bytes."""
    import smtplib

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from engine import Engine, route_conf, wait_until
    from smtp_receivers import Receiver

    from greenarrow.lib.dkim.signing import DkimKeys
    from greenarrow.pyx import simplemh as fast

    key = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}))
        (engine.root.control / "dkim" / "origin.test").mkdir(parents=True)
        (engine.root.control / "dkim" / "origin.test" / "default.pem").write_bytes(key)
        users.restrict(engine.root.control / "dkim" / "origin.test" / "default.pem")
        keys = DkimKeys.from_control(engine.root.control)
        record = keys.get("origin.test", "default")
        assert record is not None
        txt = {f"{record.dns_name()}.".encode().lower(): record.dns_txt().encode()}
        with engine:
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                assert smtp.sendmail("app@origin.test", ["user@dest.test"], LONG_MESSAGE) == {}
            result = engine.sendmail("-f", "app@origin.test", "user2@dest.test",
                                     message=LONG_MESSAGE.replace(b"\r\n", b"\n"))
            assert result.returncode == 0, result.stderr
            wait_until(lambda: len(rx.messages) >= 2, 60, "2 messages at the receiver")
        for got in rx.messages:
            content = got.content
            assert fast.max_line_length(content) <= 998
            assert dkim.verify(content, dnsfunc=lambda name, timeout=5: txt.get(name.lower()))
            assert _decoded_parts(content) == _decoded_parts(LONG_MESSAGE)


# ----------------------------------------------------------------- session log


def smtpd_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name in ("smtpd", "smtpd.session")]


def test_sessions_and_refusals_are_logged(root: Root, start: Callable[[], ServerThread],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A refused relay (swaks from an address without RELAYCLIENT), a bad command, a size
    refusal and a dropped connection each leave their lines; credentials never do."""
    import logging
    import smtplib

    caplog.set_level(logging.INFO, logger="smtpd")
    control.write(root.control, "databytes", 2000)
    server = start()
    port = port_of(root)
    swaks = shutil.which("swaks")
    if swaks is not None:
        result = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{port}", "--local-interface", "127.0.0.2",
             "--from", "app@example.com", "--to", "user@example.org", "--helo", "app.test",
             "--timeout", "20"], capture_output=True, timeout=60)
        assert result.returncode != 0  # the relay refusal
    else:  # the same session from smtplib
        with smtplib.SMTP("127.0.0.1", port, timeout=WAIT, source_address=("127.0.0.2", 0)) as c:
            c.ehlo("app.test")
            c.mail("app@example.com")
            assert c.rcpt("user@example.org")[0] == 553
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as c:
        c.ehlo("client.test")
        assert c.docmd("FROB", "x")[0] == 502
        assert c.docmd("AUTH", "PLAIN c2VjcmV0AHNlY3JldABzZWNyZXQ=")[0] >= 500
        c.sendmail("s@example.com", ["r@example.com"], MESSAGE)
        c.mail("s@example.com")
        c.rcpt("r@example.com")
        assert c.data(MESSAGE + b"x" * 3000 + b"\r\n")[0] == 552
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        raw.recv(1000)
        raw.sendall(b"HELO dropper\r\n")
        raw.recv(1000)
    server.wait_sessions_done()
    lines = smtpd_lines(caplog)
    sessions = [line for line in lines if line.startswith("session ")]
    assert ("session client=127.0.0.2 helo=app.test tls=no accepted=0 refused=1 end=quit"
            " first_refusal=\"RCPT TO:<user@example.org> -> 553 sorry, that domain isn't in my"
            " list of allowed rcpthosts (#5.7.1)\"") in sessions
    second, = [s for s in sessions if "helo=client.test" in s]
    assert second.startswith("session client=127.0.0.1 helo=client.test tls=no accepted=1 "
                             "refused=3 end=quit first_refusal=\"FROB x -> 502 ")
    assert "session client=127.0.0.1 helo=dropper tls=no accepted=0 refused=0 end=disconnect" \
        in sessions
    refusals = [line for line in lines if line.startswith("refused ")]
    assert any("command=\"AUTH PLAIN ...\"" in line for line in refusals)
    assert any("command=\"DATA (end of data)\" reply=\"552 " in line for line in refusals)
    assert not any("c2VjcmV0" in line for line in lines)


# ----------------------------------------------------------------- smaller ones


def raw_session(root: Root, source: str = "127.0.0.1") -> tuple[socket.socket, bytearray]:
    sock = socket.create_connection(("127.0.0.1", port_of(root)), timeout=WAIT,
                                    source_address=(source, 0))
    pending = bytearray()
    assert _read_reply(sock, pending).startswith(b"220")
    return sock, pending


def test_rcpt_postmaster_without_a_domain(root: Root, start: Callable[[], ServerThread]) -> None:
    """RFC 5321 4.5.1: <postmaster> is accepted, even from a client that may not relay."""
    import smtplib

    start()
    with smtplib.SMTP("127.0.0.1", port_of(root), timeout=WAIT,
                      source_address=("127.0.0.2", 0)) as c:  # no RELAYCLIENT
        c.ehlo("client.test")
        c.mail("s@example.com")
        assert c.rcpt("<Postmaster>")[0] == 250
        assert c.rcpt("r@example.com")[0] == 553
        assert c.data(MESSAGE)[0] == 250
    (_, envelope, _), = queued(root)
    assert envelope["recipient"] == "postmaster@smtp.injector.test"


@pytest.mark.parametrize(("command", "key"), [
    (b"MAIL FROM:<s@example.com> RET=HDRS", "RET"),
    (b"MAIL FROM:<s@example.com> ENVID=abc", "ENVID"),
    (b"RCPT TO:<r@example.com> NOTIFY=FAILURE", "NOTIFY"),
    (b"RCPT TO:<r@example.com> ORCPT=rfc822;r@example.com", "ORCPT"),
])
def test_dsn_parameters_refused_not_ignored(root: Root, start: Callable[[], ServerThread],
                                            command: bytes, key: str) -> None:
    """DSN is not advertised, so its parameters get 555 rather than a silent 250."""
    start()
    sock, pending = raw_session(root)
    with sock:
        sock.sendall(b"EHLO client.test\r\n")
        assert b"DSN" not in _read_reply(sock, pending)
        if command.startswith(b"RCPT"):
            sock.sendall(b"MAIL FROM:<s@example.com>\r\n")
            assert _read_reply(sock, pending).startswith(b"250")
        sock.sendall(command + b"\r\n")
        reply = _read_reply(sock, pending)
        assert reply.startswith(b"555 ") and key.encode() in reply


def test_dot_after_a_bare_lf_is_unstuffed(root: Root, start: Callable[[], ServerThread]) -> None:
    """A client that stuffs the dot after a bare LF: `.x` is queued, as Postfix delivers it."""
    start()
    sock, pending = raw_session(root)
    with sock:
        sock.sendall(b"EHLO c\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n")
        for _ in range(4):
            _read_reply(sock, pending)
        sock.sendall(b"Subject: x\r\n\r\nline one\n..x\r\n..y\r\n.\r\n")
        assert _read_reply(sock, pending).startswith(b"250")
    (_, _, message), = queued(root)
    assert message.endswith(b"\r\n\r\nline one\r\n.x\r\n.y\r\n")


# ----------------------------------------------------------------- SMTP AUTH


def add_user(root: Root, name: str, password: str, *extra: str) -> None:
    from greenarrow.lib.config.smtp_users import hash_password

    with open(root.control / "smtp.users", "a") as f:
        f.write(":".join([name, hash_password(password), *extra]) + "\n")


def test_msmtp_auth_after_starttls(tls_root: Root, start: Callable[[], ServerThread],
                                   tmp_path: Path) -> None:
    """msmtp with a user and password, from an address with no relay rule: STARTTLS, AUTH
    PLAIN, relayed; the Mail Class comes from the user."""
    msmtp = need("msmtp", "msmtp")
    add_user(tls_root, "app", "s3cret pass", "newsletters")
    start()
    base = [msmtp, "--host=127.0.0.1", f"--port={port_of(tls_root)}", "--tls=on",
            "--tls-starttls=on", f"--tls-trust-file={tls_root.control / 'tls' / 'cert.pem'}",
            f"--tls-host-override={NAME}", "--domain=client.test", "--from=s@example.com",
            "--timeout=10", "--auth=plain", "--user=app", "--source-ip=127.0.0.2"]

    def send(password: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, f"--passwordeval=echo '{password}'", "r@example.org"],
                              input=MESSAGE, capture_output=True, timeout=WAIT * 2, cwd=tmp_path,
                              env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})

    result = send("s3cret pass")
    assert result.returncode == 0, result.stderr.decode()
    (_, envelope, message), = queued(tls_root)
    assert envelope["recipient"] == "r@example.org"
    assert envelope.get("mailclass") == "newsletters"
    assert b"with ESMTPS;" in message
    assert send("wrong").returncode != 0
    assert len(queued(tls_root)) == 1


def test_auth_rules(root: Root, start: Callable[[], ServerThread],
                    caplog: pytest.LogCaptureFixture) -> None:
    """No TLS and not 127.0.0.1: 538; LOGIN works on loopback; a failed login is logged
    (without the password) and its reply waits; a forced Mail Class beats the header."""
    import base64
    import logging
    import smtplib

    caplog.set_level(logging.INFO, logger="smtpd")
    add_user(root, "app", "pw1", "transactional", "force")
    server = start()
    with smtplib.SMTP("127.0.0.1", port_of(root), timeout=WAIT,
                      source_address=("127.0.0.2", 0)) as c:
        c.ehlo("client.test")
        assert not c.has_extn("auth")
        assert c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0app\0pw1").decode())[0] == 538
    server.in_loop(lambda: setattr(server.server.policy, "auth_fail_delay", 0.2))
    with smtplib.SMTP("127.0.0.1", port_of(root), timeout=WAIT) as c:
        c.ehlo("client.test")
        assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("app", "guess-1")
        c.user, c.password = "app", "pw1"
        assert c.auth("LOGIN", c.auth_login)[0] == 235
        c.sendmail("s@example.com", ["r@example.org"],
                   MESSAGE.replace(b"Subject:", b"X-GreenArrow-MailClass: other\r\nSubject:"))
    (_, envelope, message), = queued(root)
    assert envelope.get("mailclass") == "transactional"
    assert b"X-GreenArrow-MailClass" not in message
    server.wait_sessions_done()
    lines = smtpd_lines(caplog)
    assert any(line.startswith("failed login client=127.0.0.1 user=app") for line in lines)
    assert not any("guess-1" in line or "Z3Vlc3" in line for line in lines)


# ----------------------------------------------------------------- 8BITMIME


def test_8bit_to_a_receiver_without_8bitmime_becomes_quoted_printable() -> None:
    """RFC 6152: no 8-bit data to a receiver that does not offer 8BITMIME."""
    import asyncio

    from smtp_receivers import ScriptedServer

    from greenarrow.lib.smtp.client import Attempt, Timeouts, deliver
    from greenarrow.lib.smtp.mx import MxHost

    message = (b"From: a@origin.test\r\nTo: r@dest.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
               b"\r\ncaf\xc3\xa9 = cr\xc3\xa8me\r\n.dot\r\n")

    def send(extensions: list[str]) -> bytes:
        with ScriptedServer(extensions=extensions) as server:
            attempt = Attempt(message=message, sender="a@origin.test", recipient="r@dest.test",
                              helo="out.test")
            result = asyncio.run(asyncio.wait_for(deliver(
                attempt, [MxHost("mx.dest.test", 10, [server.host])], port=server.port,
                timeouts=Timeouts(cap=10.0)), 60))
            assert result.status == "success", result.text
            raw, = server.raw_messages
            return raw.replace(b"\r\n..", b"\r\n.")

    plain = send(["PIPELINING", "SIZE 1000000"])
    assert plain.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in plain
    assert _decoded_parts(plain) == _decoded_parts(message)
    assert send(["PIPELINING", "8BITMIME"]) == message  # offered: sent as it is


def test_tls_failure_is_logged(tls_root: Root, start: Callable[[], ServerThread],
                               caplog: pytest.LogCaptureFixture) -> None:
    """A client that answers 220 to STARTTLS with bytes that are not TLS: session line
    says so (end=tls-failed, and the handshake error)."""
    import logging

    caplog.set_level(logging.INFO, logger="smtpd")
    server = start()
    sock, pending = raw_session(tls_root)
    with sock:
        sock.sendall(b"EHLO broken.test\r\nSTARTTLS\r\n")
        _read_reply(sock, pending)
        assert _read_reply(sock, pending).startswith(b"220")
        sock.sendall(b"this is not a TLS client hello\r\n" * 4)
        for _ in range(10):  # the server closes; bounded by the socket timeout
            try:
                if not sock.recv(4096):
                    break
            except ConnectionResetError:
                break
    server.wait_sessions_done()
    line, = [x for x in smtpd_lines(caplog) if x.startswith("session ")]
    assert line.startswith("session client=127.0.0.1 helo=broken.test tls=no accepted=0 "
                           "refused=0 end=tls-failed tls_error=")


def test_config_check_names_a_bad_smtp_users_line(inject_root: Root) -> None:
    """A password stored in clear is refused by `greenarrow_config check`, naming the line."""
    from click.testing import CliRunner

    from greenarrow.bin.greenarrow_config import main

    (inject_root.control / "smtp.users").write_text("# apps\napp:plaintext\n")
    result = CliRunner().invoke(main, ["check"], env={"HVMAIL_ROOT": str(inject_root.path)})
    assert result.exit_code == 1
    assert "smtp.users line 2" in result.output and "not a scrypt hash" in result.output
