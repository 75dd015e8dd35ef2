"""What the engine meets in the field: real clients, as Debian ships them.

Each test drives the engine with the software applications already run
(msmtp, swaks, bsd-mailx, a sendmail -bs transport) or with a Python client
that does what such software does on the wire. A test that needs a Debian
binary is skipped, with the package named, when it is missing; `.ci/run`
installs them.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from smtp_receivers import self_signed_context
from test_smtpd import MESSAGE, RELAY_RULES, WAIT, ServerThread, free_port, queued

from greenarrow.lib import control
from greenarrow.lib.install_root import init_root
from greenarrow.lib.paths import Root

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


@pytest.fixture
def start(root: Root) -> Iterator[Callable[[], ServerThread]]:
    started: list[ServerThread] = []

    def run() -> ServerThread:
        server = ServerThread(root).start()
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


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
