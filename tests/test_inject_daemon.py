"""The compiled bin/sendmail client and injectd: the protocol, both ends, and the fallback."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject import daemon as inject_daemon
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.queue import entry as queue_entry


@pytest.fixture
def root(tmp_path):
    root = Root(tmp_path / "hvmail")
    init_root(root, me="client.test")
    return root


class FakeDaemon:
    """A socket at var/inject.sock that records one request and answers `reply`."""

    def __init__(self, root: Root, reply: bytes) -> None:
        self.path = str(root.var / inject_daemon.SOCKET)
        self.reply = reply
        self.request = b""
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.sock.settimeout(20)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.request += chunk
            conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(20)
        self.sock.close()
        os.unlink(self.path)


def run_client(root: Root, name: str, *args: str, env: dict[str, str] | None = None):
    return subprocess.run([str(root.bin / name), *args], input=b"Subject: hi\n\nbody\n",
                          capture_output=True, env={"PATH": "/usr/bin:/bin", **(env or {})},
                          timeout=60)


def test_client_sends_arguments_environment_and_message_and_exits_with_the_answer(root):
    daemon = FakeDaemon(root, b"100\nsendmail: fatal: refused by the test\n")
    result = run_client(root, "sendmail", "-f", "s@origin.test", "r@dest.test",
                        env={"GREENARROW_SENDID": "s1", "SECRET": "not passed", "USER": "alice"})
    daemon.close()
    assert result.returncode == 100
    assert result.stderr == b"sendmail: fatal: refused by the test\n"
    items = inject_daemon.parse_netstrings(daemon.request)
    assert items[0] == b"sendmail" and items[1] == b"3"
    assert items[2:5] == [b"-f", b"s@origin.test", b"r@dest.test"]
    env = items[6:6 + int(items[5])]
    assert sorted(env) == [b"GREENARROW_SENDID=s1", b"USER=alice"]
    assert items[-1] == b"Subject: hi\n\nbody\n"


def test_daemon_handles_a_request_as_the_python_sendmail_would(root):
    daemon = FakeDaemon(root, b"0\n")
    run_client(root, "qmail-inject", "-f", "s@origin.test", "r@dest.test",
               env={"GREENARROW_LISTID": "list1"})
    daemon.close()
    code, text = inject_daemon.handle(root, daemon.request)
    assert (code, text) == (0, "")
    name, = os.listdir(root.queue("ram") / "entries")
    envelope, message = queue_entry.read_entry(root.queue("ram") / "entries" / name)
    assert envelope["listid"] == "list1" and envelope["recipient"] == "r@dest.test"
    assert message.endswith(b"body\r\n")
    bad = inject_daemon.handle(root, b"8:sendmail,1:1,9:no-at-all,1:0,3:x\n\n,")
    assert bad[0] == 100 and "not of the form local@domain" in bad[1]
    with pytest.raises(inject_daemon.RequestError):
        inject_daemon.handle(root, b"8:sendmail,5:x")


def test_without_the_daemon_the_client_runs_the_python_program(root):
    result = run_client(root, "sendmail", "-f", "s@origin.test", "r@dest.test")
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(root.queue("ram") / "entries")) == 1
    refused = run_client(root, "sendmail", "-f", "s@origin.test", "nobody")
    assert refused.returncode == 100 and b"local@domain" in refused.stderr
