"""The compiled bin/sendmail client and injectd: the protocol, both ends, and the fallback."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from greenarrow.lib.config import control
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject import command_line
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


def parse_request(data: bytes) -> tuple[inject_daemon.Request, bytes]:
    """A whole request as the daemon reads it: the head, and the message."""

    async def read() -> tuple[inject_daemon.Request, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        items = inject_daemon._Netstrings(reader)
        head = await inject_daemon.read_head(items)
        return head, await items.body(head.message_length)

    return asyncio.run(read())


def test_client_sends_arguments_environment_and_message_and_exits_with_the_answer(root):
    daemon = FakeDaemon(root, b"100\nsendmail: fatal: refused by the test\n")
    identity = {name: f"{name.lower()}-value" for name in command_line.IDENTITY_VARIABLES}
    result = run_client(root, "sendmail", "-f", "s@origin.test", "r@dest.test",
                        env={"GREENARROW_SENDID": "s1", "SECRET": "not passed", **identity,
                             "HVMAIL_ROOT": "/elsewhere", "GREENARROWX": "not passed"})
    daemon.close()
    assert result.returncode == 100
    assert result.stderr == b"sendmail: fatal: refused by the test\n"
    items = []
    data = daemon.request
    while data:  # the raw netstrings, before the daemon's filter
        head, _, data = data.partition(b":")
        items.append(data[:int(head)])
        data = data[int(head) + 1:]
    assert items[0] == b"sendmail" and items[1] == b"3"
    assert items[2:5] == [b"-f", b"s@origin.test", b"r@dest.test"]
    env = items[6:6 + int(items[5])]
    # exactly the variables command-line injection reads: the C list is command_line's
    assert sorted(env) == sorted([b"GREENARROW_SENDID=s1",
                                  *(f"{k}={v}".encode() for k, v in identity.items())])
    assert all(command_line.client_variable(e.decode().partition("=")[0]) for e in env)
    assert not command_line.client_variable("HVMAIL_ROOT")
    assert not command_line.client_variable("GREENARROWX")
    assert items[-1] == b"Subject: hi\n\nbody\n"
    request, message = parse_request(daemon.request)
    assert request.argv == ["-f", "s@origin.test", "r@dest.test"]
    assert message == b"Subject: hi\n\nbody\n"


def test_daemon_handles_a_request_as_the_python_sendmail_would(root):
    daemon = FakeDaemon(root, b"0\n")
    run_client(root, "qmail-inject", "-f", "s@origin.test", "r@dest.test",
               env={"GREENARROW_LISTID": "list1"})
    daemon.close()
    request, message = parse_request(daemon.request)
    assert inject_daemon.handle(root, request, message, 1234) == (0, "")
    name, = os.listdir(root.queue("ram") / "entries")
    envelope, message = queue_entry.read_entry(root.queue("ram") / "entries" / name)
    assert envelope["listid"] == "list1" and envelope["recipient"] == "r@dest.test"
    assert message.startswith(b"Received: by client.test (GreenArrow, from userid 1234);\r\n\t")
    assert message.endswith(b"body\r\n")
    bad = inject_daemon.handle(root, *parse_request(b"8:sendmail,1:1,7:no-dom@,1:0,3:x\n\n,"), 0)
    assert bad[0] == 100 and "not of the form local@domain" in bad[1]
    for broken in (b"8:sendmail,5:x", b"8:sendmail,1:1,1:x,1:0,1:x-", b"x:sendmail,",
                   b"8:sendmail,10:1000000000,", b"8:sendmail,1:2,0:,"):
        with pytest.raises(inject_daemon.RequestError):
            parse_request(broken)


def test_without_the_daemon_the_client_runs_the_python_program(root):
    result = run_client(root, "sendmail", "-f", "s@origin.test", "r@dest.test")
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(root.queue("ram") / "entries")) == 1
    refused = run_client(root, "sendmail", "-f", "s@origin.test", "nobody@")
    assert refused.returncode == 100 and b"local@domain" in refused.stderr


# --------------------------------------------------------------------------- the real daemon
# Issue 10: a client chooses nothing but its message, arguments and the documented
# variables; the daemon records who it is (SO_PEERCRED) and bounds what a client costs.

NOBODY = pwd.getpwnam("nobody")
RECEIVED = re.compile(rb"^Received: by daemon\.test \(GreenArrow, from userid (\d+)\);\r\n\t[^\r\n]+\r\n")


@pytest.fixture
def shared_root():
    """An install root that user `nobody` can reach (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="ga-injectd-"))
    os.chmod(folder, 0o755)
    root = Root(folder / "hvmail")
    init_root(root, me="daemon.test")
    yield root
    shutil.rmtree(folder)


class Injectd:
    """The real service, `python -m greenarrow.bin.injectd`, on `root`."""

    def __init__(self, root: Root) -> None:
        self.path = str(root.var / inject_daemon.SOCKET)
        self.log = open(root.path / "injectd.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "greenarrow.bin.injectd"],
                                     env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            assert self.proc.poll() is None, "injectd exited at start"
            assert time.monotonic() < deadline, "injectd did not open its socket"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0
        self.log.close()


class InProcessDaemon:
    """InjectDaemon in a thread of the test, for the limits a test sets small."""

    def __init__(self, root: Root, **limits) -> None:
        self.daemon = inject_daemon.InjectDaemon(root, **limits)
        self.path = self.daemon.path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.daemon.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def netstrings(*items: bytes) -> bytes:
    return b"".join(b"%d:%s," % (len(item), item) for item in items)


def request(argv: list[bytes], env: list[bytes], message: bytes, program: bytes = b"sendmail") -> bytes:
    return netstrings(program, b"%d" % len(argv), *argv, b"%d" % len(env), *env, message)


def talk(path: str, data: bytes, finish: bool = True, timeout: float = 30) -> bytes:
    """Send `data` (and, with `finish`, end the sending side); the whole answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        if finish:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def as_user(uid: int, gid: int, work) -> bytes:
    """Run `work()` in a child process with that uid and gid; what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, work())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return out


def attacker_root() -> Path:
    """A root a local user made: its own `me` and a 1-byte `databytes`, owned by nobody."""
    folder = Path(tempfile.mkdtemp(prefix="ga-attacker-"))
    init_root(Root(folder), me="attacker.test")
    control.write(folder / "control", "databytes", 1)
    for path in [folder, *folder.rglob("*")]:
        os.lchown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return folder


def snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in [folder, *folder.rglob("*")]}


def queued(root: Root) -> list[bytes]:
    folder = root.queue("ram") / "entries"
    return [queue_entry.read_entry(folder / name)[1] for name in sorted(os.listdir(folder))]


@pytest.mark.parametrize("user", ["self", "nobody"])
def test_a_client_cannot_choose_the_install_root(shared_root, user):
    """Issue 10 item 1: HVMAIL_ROOT (or any other variable) from a client is ignored: the
    message goes into the daemon's own root and nothing under the client's folder is
    read or written; the Received header records the client's real uid."""
    if user == "nobody" and os.getuid() != 0:
        pytest.skip("running the client as user nobody needs root")
    folder = attacker_root()
    before = snapshot(folder)
    daemon = Injectd(shared_root)
    try:
        data = request([b"-f", b"s@origin.test", b"r@dest.test"],
                       [b"HVMAIL_ROOT=" + str(folder).encode(), b"USER=root",
                        b"GREENARROW_SENDID=s1", b"PATH=" + str(folder).encode()],
                       b"Subject: x\n\nbody\n")
        if user == "nobody":
            answer = as_user(NOBODY.pw_uid, NOBODY.pw_gid, lambda: talk(daemon.path, data))
            uid = NOBODY.pw_uid
        else:
            answer, uid = talk(daemon.path, data), os.getuid()
    finally:
        daemon.stop()
    try:
        assert answer == b"0\n"
        assert snapshot(folder) == before
        assert os.listdir(folder / "queue" / "ram" / "entries") == []
        message, = queued(shared_root)
        assert b"@daemon.test>" in message and b"attacker.test" not in message
        assert int(RECEIVED.match(message).group(1)) == uid
    finally:
        shutil.rmtree(folder)


def test_the_compiled_client_as_another_user(shared_root):
    """End to end: bin/sendmail (compiled by init) run by user nobody, with the real
    service; the uid recorded is nobody's, whatever USER and LOGNAME claim."""
    if os.getuid() != 0:
        pytest.skip("running the client as user nobody needs root")
    if (shared_root.bin / "sendmail").read_bytes()[:4] != b"\x7fELF":
        pytest.skip("no C compiler: bin/sendmail is the Python program")
    daemon = Injectd(shared_root)
    try:
        result = subprocess.run(
            [str(shared_root.bin / "sendmail"), "-f", "s@origin.test", "r@dest.test"],
            input=b"Subject: hi\n\nbody\n", capture_output=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "USER": "root", "LOGNAME": "root",
                 "HVMAIL_ROOT": "/nonexistent"},
            user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[])
    finally:
        daemon.stop()
    assert result.returncode == 0, result.stderr
    message, = queued(shared_root)
    assert int(RECEIVED.match(message).group(1)) == NOBODY.pw_uid


def test_the_python_program_records_its_uid_the_same_way(shared_root):
    """With no daemon, bin/sendmail runs bin/sendmail.py, which records os.getuid()."""
    result = run_client(shared_root, "sendmail", "-f", "s@origin.test", "r@dest.test")
    assert result.returncode == 0, result.stderr
    message, = queued(shared_root)
    assert int(RECEIVED.match(message).group(1)) == os.getuid()


def test_an_over_size_message_is_refused_from_its_length(shared_root):
    """Issue 10 item 5: the message's netstring length is checked against databytes
    before its bytes are read: a client that announces a huge message and sends a
    few bytes (and keeps its side open) is answered at once."""
    control.write(shared_root.control, "databytes", 1000)
    daemon = Injectd(shared_root)
    try:
        head = request([b"r@dest.test"], [], b"")[:-3]  # up to the message's netstring
        answer = talk(daemon.path, head + b"200000000000:Subject: x\n\n", finish=False)
        assert answer.startswith(b"100\n")
        assert b"200000000000 bytes, over the limit of 1000 (control/databytes)" in answer
        small = talk(daemon.path, request([b"-f", b"s@o.test", b"r@dest.test"], [], b"x" * 500))
        assert small == b"0\n"
        control.write(shared_root.control, "databytes", 0)  # no limit: the daemon's ceiling
        answer = talk(daemon.path, head + b"%d:" % (inject_daemon.MAX_MESSAGE + 1), finish=False)
        assert answer.startswith(b"100\n") and b"injection daemon" in answer
        too_many = talk(daemon.path, netstrings(b"sendmail", b"99999999999"), finish=False)
        assert too_many.startswith(b"111\n")
    finally:
        daemon.stop()
    assert len(queued(shared_root)) == 1


def test_concurrent_clients_are_bounded_and_the_others_wait(shared_root):
    """With two clients in service, a third is not served (it waits, nothing refused)
    until one of the two is done."""
    daemon = InProcessDaemon(shared_root, max_clients=2, timeout=120)
    holders = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(daemon.path)
            s.sendall(b"8:sendmail,")
            holders.append(s)
        third = socket.socket(socket.AF_UNIX)
        third.settimeout(1)
        third.connect(daemon.path)
        third.sendall(request([b"-f", b"s@o.test", b"r@dest.test"], [], b"Subject: x\n\nb\n"))
        third.shutdown(socket.SHUT_WR)
        with pytest.raises(TimeoutError):
            third.recv(100)
        holders.pop().close()
        third.settimeout(30)
        assert third.recv(100) == b"0\n"
        third.close()
    finally:
        for s in holders:
            s.close()
        daemon.stop()
    assert len(queued(shared_root)) == 1


@pytest.mark.parametrize("trickle", [False, True])
def test_a_stalled_or_trickling_client_is_cut(shared_root, trickle):
    """A request not complete within the timeout is answered 111 and closed, also when
    the client keeps sending a byte now and then."""
    daemon = InProcessDaemon(shared_root, timeout=1)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(daemon.path)
            s.sendall(request([b"r@dest.test"], [], b"")[:-3] + b"100:")
            answer = b""
            for _ in range(200):  # 20 s at most
                ready, _, _ = select.select([s], [], [], 0.1)
                if ready:
                    try:
                        chunk = s.recv(1000)
                    except ConnectionResetError:
                        # the daemon closed with our trickled bytes unread: Linux then
                        # reports a reset instead of end of file, after the answer
                        break
                    answer += chunk
                    if not chunk:
                        break
                elif trickle:
                    try:
                        s.sendall(b"x")
                    except OSError:  # cut between select and send: the answer is waiting
                        pass
    finally:
        daemon.stop()
    assert answer.startswith(b"111\n") and b"timed out" in answer
    assert queued(shared_root) == []


def test_message_bytes_being_read_stay_within_the_budget(shared_root):
    """While one client's message holds the whole budget, another's waits to be read."""
    daemon = InProcessDaemon(shared_root, budget=100, timeout=120)
    try:
        holder = socket.socket(socket.AF_UNIX)
        holder.connect(daemon.path)
        whole = request([b"-f", b"s@o.test", b"r@dest.test"], [], b"Subject: a\n\n" + b"a" * 88)
        holder.sendall(whole[:-50])
        other = socket.socket(socket.AF_UNIX)
        other.settimeout(1)
        other.connect(daemon.path)
        other.sendall(request([b"-f", b"s@o.test", b"r@dest.test"], [], b"Subject: b\n\nb\n"))
        other.shutdown(socket.SHUT_WR)
        with pytest.raises(TimeoutError):
            other.recv(100)
        holder.sendall(whole[-50:])
        holder.shutdown(socket.SHUT_WR)
        holder.settimeout(30)
        other.settimeout(30)
        assert holder.recv(100) == b"0\n"
        assert other.recv(100) == b"0\n"
        holder.close()
        other.close()
    finally:
        daemon.stop()
    assert len(queued(shared_root)) == 2


def compiled(root: Root) -> None:
    if (root.bin / "sendmail").read_bytes()[:4] != b"\x7fELF":
        pytest.skip("no C compiler: bin/sendmail is the Python program")


def test_the_client_reads_an_answer_given_before_it_finished_sending(shared_root):
    """A message far over databytes is refused from its length while the client is still
    sending: the client stops (no SIGPIPE) and prints the daemon's answer."""
    compiled(shared_root)
    control.write(shared_root.control, "databytes", 1000)
    daemon = Injectd(shared_root)
    try:
        result = subprocess.run([str(shared_root.bin / "sendmail"), "r@dest.test"],
                                input=b"Subject: big\n\n" + b"x" * (8 * 1024 * 1024),
                                capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    finally:
        daemon.stop()
    assert result.returncode == 100, result
    assert b"over the limit of 1000 (control/databytes)" in result.stderr
    assert queued(shared_root) == []


def test_a_socket_nobody_listens_on_sends_the_message_to_the_python_program(shared_root):
    """The client reads the message before it connects; when the connection is refused
    (a socket left by a stopped daemon), the Python program gets the message in full."""
    compiled(shared_root)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(shared_root.var / inject_daemon.SOCKET))
    body = b"".join(b"line %d\n" % i for i in range(20000))
    result = subprocess.run([str(shared_root.bin / "sendmail"), "-i", "-f", "s@o.test", "r@dest.test"],
                            input=b"Subject: x\n\n" + body, capture_output=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 0, result.stderr
    message, = queued(shared_root)
    assert message.endswith(body.replace(b"\n", b"\r\n"))
    assert int(RECEIVED.match(message).group(1)) == os.getuid()
