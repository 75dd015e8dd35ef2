"""The tracker as it runs: `python -m greenarrow.bin.tracker` on loopback, real HTTP clients.

http.client and curl against every format and kind, exact redirect
targets, tampered DATA answered 404 over the wire, one-click POST, MPP
detection by address and agent (after `greenarrow tracker
refresh-mpp-ranges`), HTTPS with a certificate per name (SNI), the
limits, stateless events on a server that never saw the message, and a
kill -9 under load that loses no answered click.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from greenarrow.lib.config import control, secret_constants
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.simplemh import tracking_url as tu
from greenarrow.lib.tracker import spool
from tests.engine import free_port, wait_until

MPP_UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
SAFARI_UA = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko) Version/17.0 Safari/605.1.15")


class Tracker:
    """One install root and its tracker process."""

    def __init__(self, tmp_path: Path, controls: dict[str, object] | None = None,
                 name: str = "hvmail") -> None:
        self.root = Root(tmp_path / name)
        init_root(self.root, me="tracker.test")
        self.port = free_port()
        self.env = dict(os.environ, HVMAIL_ROOT=str(self.root.path))
        settings: dict[str, object] = {"tracker.listen": [f"127.0.0.1:{self.port}"],
                                       "opt.simplemh_tracking_include_user_agent": 1}
        settings.update(controls or {})
        for key, value in settings.items():
            control.write(self.root.control, key, value)
        self.constants = secret_constants.read(self.root.control)
        self.proc: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []

    def start(self, port: int | None = None, processes: int | None = None) -> None:
        """One tracker run alone, or `processes` numbered ones (as hvmail_init starts
        them: each binds the address with SO_REUSEPORT and has its own spool)."""
        self.log = open(self.root.path / "tracker.log", "ab")  # noqa: SIM115
        numbers = [[]] if processes is None else [[str(n)] for n in range(processes)]
        before = self.log_text().count("listening for HTTP on")
        for started, number in enumerate(numbers, 1):
            proc = subprocess.Popen([sys.executable, "-m", "greenarrow.bin.tracker", *number],
                                    env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            wait_until(lambda p=proc: self._listening(port or self.port) or p.poll() is not None,
                       30, "the tracker to listen")
            if processes is not None:  # this one too, not only an earlier one, listens
                wait_until(lambda p=proc, n=before + started: p.poll() is not None
                           or self.log_text().count("listening for HTTP on") >= n,
                           30, "its log line")
            assert proc.poll() is None, self.log_text()
        self.proc = self.procs[0]

    def _listening(self, port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def log_text(self) -> str:
        return (self.root.path / "tracker.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.proc = None
        self.procs = []
        if getattr(self, "log", None):
            self.log.close()

    def events(self) -> list[dict]:
        return spool.read_all_events(self.root)

    def data(self, kind: str = tu.CLICK, url: str = "https://example.com/", **kw: object) -> str:
        fields = dict(recipient="r@example.com", listid="t100", sendid="news-1",
                      mailclass="news", instanceid="i7", click_tracking_id="42", stateless=True)
        fields.update(kw)
        return tu.encode(self.constants, kind, url=url, **fields)

    def url(self, kind: str, fmt: str = "b", prefix: str = "/t", **kw: object) -> str:
        return tu.tracking_url(f"http://127.0.0.1:{self.port}{prefix}", fmt, kind,
                               self.data(kind, **kw))

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request(method, _path(target), body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


def _path(url: str) -> str:
    if "://" in url:
        rest = url.split("://", 1)[1]
        return rest[rest.index("/"):]
    return url


@pytest.fixture
def tracker(tmp_path: Path):
    t = Tracker(tmp_path)
    t.start()
    yield t
    t.stop()


KIND_URLS = {tu.CLICK: "https://example.com/landing?a=1&b=two%20words#section-2",
             tu.UNSUBSCRIBE: "https://example.com/unsub?list=9#bye", tu.OPEN: "",
             tu.LIST_UNSUBSCRIBE: ""}


@pytest.mark.parametrize("fmt", tu.FORMATS)
def test_every_format_and_kind_over_http(tracker: Tracker, fmt: str) -> None:
    answers = {}
    for kind, target in KIND_URLS.items():
        url = tracker.url(kind, fmt, url=target)
        answers[kind] = tracker.request("GET", url, headers={"User-Agent": "pytest/1"})
    status, headers, body = answers[tu.CLICK]
    assert status == 302 and headers["Location"] == KIND_URLS[tu.CLICK] and body == b""
    status, headers, body = answers[tu.UNSUBSCRIBE]
    assert status == 302
    assert headers["Location"] == ("https://example.com/unsub?list=9&email=r%40example.com"
                                   "&sendid=news-1&listid=t100#bye")
    status, headers, body = answers[tu.OPEN]
    assert status == 200 and headers["Content-Type"] == "image/gif" and body[:6] == b"GIF89a"
    assert "no-store" in headers["Cache-Control"]
    status, headers, body = answers[tu.LIST_UNSUBSCRIBE]
    assert status == 200 and b"One-Click" in body and "Location" not in headers
    events = tracker.events()
    assert [e["event_type"] for e in events] == ["engine_click", "engine_unsub", "engine_open"]
    click, unsub, opened = events
    assert click["click_url"] == KIND_URLS[tu.CLICK]
    assert click["user_agent"] == "pytest/1" and click["engine_ip"] == "127.0.0.1"
    assert click["server_id"] == "tracker.test"
    assert unsub["click_url"] == KIND_URLS[tu.UNSUBSCRIBE]
    assert opened["is_privacy_open"] is False
    for event in events:
        assert (event["email"], event["listid"], event["sendid"], event["mailclass"],
                event["instanceid"], event["click_tracking_id"]) == (
            "r@example.com", "t100", "news-1", "news", "i7", "42")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("fmt", tu.FORMATS)
def test_curl_sees_the_exact_redirect(tracker: Tracker, fmt: str) -> None:
    target = "https://example.com/p/a.html?q=caf%C3%A9&x=1&x=2#frag/ment?x"
    url = tracker.url(tu.CLICK, fmt, url=target)
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                          url], capture_output=True, text=True, timeout=30)
    code, _, location = out.stdout.partition(" ")
    assert code == "302"
    assert location == target
    head = subprocess.run(["curl", "-s", "-D", "-", "-o", "/dev/null", url],
                          capture_output=True, text=True, timeout=30).stdout
    header = [line for line in head.splitlines() if line.lower().startswith("location:")]
    assert header == [f"Location: {target}"]


def test_tampered_data_never_redirects_over_the_wire(tracker: Tracker) -> None:
    d = tracker.data(url="https://example.com/")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    conn = http.client.HTTPConnection("127.0.0.1", tracker.port, timeout=20)
    try:
        targets = [f"/t/click?{d[:i]}{alphabet[(alphabet.index(c) + 7) % 64]}{d[i + 1:]}"
                   for i, c in enumerate(d)]
        targets += [f"/t/click?{d[:n]}" for n in range(len(d))]
        for target in targets:
            conn.request("GET", target)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 404 and resp.getheader("Location") is None, target
            assert body == b"Not Found\n"
    finally:
        conn.close()
    assert tracker.events() == []


def test_one_click_post_and_repeats_are_one_unsubscribe(tracker: Tracker) -> None:
    url = tracker.url(tu.LIST_UNSUBSCRIBE)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for _ in range(3):
        status, headers, body = tracker.request("POST", url, b"List-Unsubscribe=One-Click", form)
        assert status == 200 and "Location" not in headers and b"Unsubscribed" in body
    # the confirmation page's button posts the same body to the same URL
    status, _, page = tracker.request("GET", url)
    assert b'action=""' in page and b'name="List-Unsubscribe" value="One-Click"' in page
    events = tracker.events()
    assert {e["event_type"] for e in events} == {"engine_unsub"}
    assert {e["click_url"] for e in events} == {""}
    assert len({e["event_unique_id"] for e in events}) == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_one_click_as_a_mail_provider_sends_it(tracker: Tracker) -> None:
    url = tracker.url(tu.LIST_UNSUBSCRIBE, "c")
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                          "-F", "List-Unsubscribe=One-Click", url],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "200"
    assert [e["event_type"] for e in tracker.events()] == ["engine_unsub"]


def test_methods_other_than_get_head_post_are_refused(tracker: Tracker) -> None:
    url = tracker.url(tu.CLICK)
    for method in ("PUT", "DELETE", "OPTIONS", "PATCH"):
        status, headers, _ = tracker.request(method, url, b"")
        assert status == 405 and headers["Allow"] == "GET, HEAD, POST"
    status, headers, body = tracker.request("HEAD", url)
    assert status == 302 and body == b""
    assert tracker.events() == []


def test_oversized_and_slow_requests_are_cut_off(tmp_path: Path) -> None:
    t = Tracker(tmp_path, {"tracker.timeout": 1})
    t.start()
    try:
        status, _, _ = t.request("GET", "/t/click?x", headers={"X-Big": "a" * 9000})
        assert status == 431
        url = t.url(tu.LIST_UNSUBSCRIBE)
        status, _, _ = t.request("POST", url, b"List-Unsubscribe=One-Click&" + b"a" * 9000,
                                 {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 413
        # a client that stops half way through its request is answered 408 and cut off
        with socket.create_connection(("127.0.0.1", t.port), timeout=20) as s:
            s.sendall(b"GET /t/click?abc HTTP/1.1\r\nHost: x\r\n")
            received = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                received += chunk
        assert received.startswith(b"HTTP/1.1 408 ")
        # an idle keep-alive connection is closed too
        with socket.create_connection(("127.0.0.1", t.port), timeout=20) as s:
            assert s.recv(4096) == b""
        assert t.events() == []
    finally:
        t.stop()


def test_pipelined_requests_are_answered_in_order(tracker: Tracker) -> None:
    urls = [_path(tracker.url(tu.CLICK, url=f"https://example.com/{n}")) for n in range(20)]
    wire = b"".join(f"GET {u} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for u in urls)
    with socket.create_connection(("127.0.0.1", tracker.port), timeout=20) as s:
        s.sendall(wire + b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    locations = [line.split(b": ", 1)[1].decode() for line in received.split(b"\r\n")
                 if line.startswith(b"Location: ")]
    assert locations == [f"https://example.com/{n}" for n in range(20)]
    assert received.count(b"HTTP/1.1 404 ") == 1
    assert [e["click_url"] for e in tracker.events()] == locations


def test_mpp_detection_by_address_and_agent(tracker: Tracker, tmp_path: Path) -> None:
    url = tracker.url(tu.OPEN)

    def is_privacy_open(ua: str) -> bool:
        before = len(tracker.events())
        status, _, _ = tracker.request("GET", url, headers={"User-Agent": ua})
        assert status == 200
        events = tracker.events()
        assert len(events) == before + 1  # recorded either way, never dropped
        return events[-1]["is_privacy_open"]

    assert is_privacy_open(MPP_UA) is False  # 127.0.0.1 is no Apple proxy yet
    csv = tmp_path / "egress-ip-ranges.csv"
    csv.write_text("127.0.0.0/8,ZZ,ZZ-LO,Loopback\n172.224.0.0/16,US,US-CA,Cupertino\n")
    out = subprocess.run([sys.executable, "-m", "greenarrow.bin.greenarrow", "tracker",
                          "refresh-mpp-ranges", str(csv)], env=tracker.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "installed 2 ranges" in out.stdout
    tracker.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded: 2 Apple egress ranges" in tracker.log_text(), 30, "reload")
    assert is_privacy_open(MPP_UA) is True
    assert is_privacy_open(SAFARI_UA) is False
    assert is_privacy_open("curl/8") is False


def test_stateless_event_server_records_from_the_url_alone(tmp_path: Path) -> None:
    """A sending server made the link; an event server with the same secret constants,
    which never saw the message, records the click; other constants: 404."""
    sender = Root(tmp_path / "sender")
    init_root(sender, me="sender.test")
    constants = secret_constants.read(sender.control)
    event_server = Tracker(tmp_path, name="events")
    secret_constants.write(event_server.root.control, *constants)
    stranger = Tracker(tmp_path, name="stranger")
    event_server.start()
    stranger.start()
    try:
        for stateless in (True, False):
            d = tu.encode(constants, tu.CLICK, "who@example.com", "l1", "s1", "mc", "i1", "",
                          "https://example.com/x", stateless=stateless)
            status, headers, _ = event_server.request("GET", f"/click?{d}")
            assert status == 302 and headers["Location"] == "https://example.com/x"
            status, headers, _ = stranger.request("GET", f"/click?{d}")
            assert status == 404 and "Location" not in headers
        events = event_server.events()
        assert [(e["email"], e["server_id"]) for e in events] == [
            ("who@example.com", "tracker.test")] * 2
        assert stranger.events() == []
    finally:
        event_server.stop()
        stranger.stop()


def _certificate(folder: Path, filename: str, names: list[str]) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


def test_https_with_a_certificate_per_url_domain(tmp_path: Path) -> None:
    tls_port = free_port()
    t = Tracker(tmp_path, {"tracker.tls.listen": [f"127.0.0.1:{tls_port}"]})
    folder = t.root.control / "tracker.tls"
    a = _certificate(folder, "links-a.pem", ["links.a.test"])
    b = _certificate(folder, "links-b.pem", ["*.b.test"])
    t.start(tls_port)
    try:
        for host, cafile in (("links.a.test", a), ("click.b.test", b)):
            context = ssl.create_default_context(cafile=str(cafile))
            conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=20,
                                               context=context)
            conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", tls_port),
                                                                     timeout=20),
                                            server_hostname=host)
            d = t.data(url=f"https://{host}/landing")
            conn.request("GET", f"/prefix/click/{d}", headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 302 and resp.getheader("Location") == f"https://{host}/landing"
            conn.close()
        # a name no certificate has gets the first file's certificate (not b's)
        context = ssl.create_default_context(cafile=str(b))
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", tls_port), timeout=20) as raw:
                context.wrap_socket(raw, server_hostname="other.b.test.example")
        assert [e["click_url"] for e in t.events()] == ["https://links.a.test/landing",
                                                        "https://click.b.test/landing"]
    finally:
        t.stop()


def test_kill_9_under_load_loses_no_answered_click(tmp_path: Path) -> None:
    t = Tracker(tmp_path)
    t.start()
    answered: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    targets = [_path(t.url(tu.CLICK, url=f"https://example.com/n/{n}")) for n in range(20000)]

    def client(first: int, step: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
        try:
            for n in range(first, len(targets), step):
                if stop.is_set():
                    return
                conn.request("GET", targets[n])
                resp = conn.getresponse()
                resp.read()
                if resp.status == 302:
                    with lock:
                        answered.add(n)
        except (OSError, http.client.HTTPException):
            return  # the tracker was killed
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i, 8)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 1500, 120, "1500 answered clicks")
        os.kill(t.proc.pid, signal.SIGKILL)
        t.proc.wait(20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        t.stop()
    recorded = [e["click_url"] for e in t.events()]
    recorded_n = {int(url.rsplit("/", 1)[1]) for url in recorded}
    assert answered and answered <= recorded_n, sorted(answered - recorded_n)[:10]
    assert len(recorded) == len(recorded_n)  # each recorded once
    assert len({e["event_unique_id"] for e in t.events()}) == len(recorded)
    # and a restarted tracker appends after what the killed one wrote
    t.start()
    try:
        status, _, _ = t.request("GET", targets[-1])
        assert status == 302
        assert len(t.events()) == len(recorded) + 1
        json.dumps(t.events()[-1])
    finally:
        t.stop()


def test_two_processes_killed_under_load_lose_no_answered_click(tmp_path: Path) -> None:
    """Two numbered trackers on one address (SO_REUSEPORT), each with its own spool:
    kill -9 one under load, the other keeps answering, then kill -9 it too; every
    answered click is in one of the two spools, once."""
    t = Tracker(tmp_path)
    t.start(processes=2)
    answered: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    targets = [_path(t.url(tu.CLICK, url=f"https://example.com/n/{n}")) for n in range(40000)]

    def client(first: int, step: int) -> None:
        pending = list(range(first, len(targets), step))
        for _ in range(2000):  # connections; a new one every 20 requests or after an error
            if stop.is_set() or not pending:
                return
            conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
            try:
                for _ in range(20):
                    if stop.is_set() or not pending:
                        return
                    n = pending.pop(0)
                    conn.request("GET", targets[n])
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 302:
                        with lock:
                            answered.add(n)
            except (OSError, http.client.HTTPException):
                pass  # that process was killed: connect again (the other one answers)
            finally:
                conn.close()

    threads = [threading.Thread(target=client, args=(i, 8)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 1500, 120, "1500 answered clicks")
        first, second = t.procs
        os.kill(first.pid, signal.SIGKILL)
        first.wait(20)
        with lock:
            at_first_kill = len(answered)
        wait_until(lambda: len(answered) >= at_first_kill + 1000, 120,
                   "1000 clicks answered by the survivor")
        os.kill(second.pid, signal.SIGKILL)
        second.wait(20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        t.stop()
    folders = spool.spool_dirs(t.root)
    assert [f.name for f in folders] == ["tracker-0", "tracker-1"]
    assert all(spool.read_events(folder) for folder in folders)  # both answered clicks
    events = t.events()
    recorded = [e["click_url"] for e in events]
    recorded_n = {int(url.rsplit("/", 1)[1]) for url in recorded}
    assert answered and answered <= recorded_n, sorted(answered - recorded_n)[:10]
    assert len(recorded) == len(recorded_n)  # each recorded once
    assert len({e["event_unique_id"] for e in events}) == len(recorded)


def test_unwritable_spool_answers_503_and_never_redirects() -> None:
    """When the event cannot be written, the click is not answered with its redirect."""
    import asyncio
    import ipaddress

    from greenarrow.lib.tracker.http_server import TrackerServer
    from greenarrow.lib.tracker.privacy_open import EgressRanges
    from greenarrow.lib.tracker.settings import TrackerSettings

    constants = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")

    class FullDisk:
        """A spool on a full disk: every write fails, as write(2) with ENOSPC."""

        tries = 0
        opened = 0

        def __init__(self) -> None:
            FullDisk.opened += 1

        def write_bytes(self, data: bytes) -> None:
            FullDisk.tries += 1
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    async def scenario() -> tuple[bytes, bytes, int]:
        settings = TrackerSettings(constants, "s", False,
                                   EgressRanges([ipaddress.ip_network("192.0.2.0/24")]))
        server = TrackerServer(settings, FullDisk)
        port = free_port()
        await server.listen("127.0.0.1", port)
        try:
            d = tu.encode(constants, tu.CLICK, "r@example.com", url="https://example.com/")
            answers = []
            for _ in range(2):  # the second time the spool is opened again, and fails again
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"
                             + f"GET /click?{d} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answers.append(await asyncio.wait_for(reader.read(), 20))  # closed after 503
                writer.close()
            return answers[0].split(b"\r\n\r\n", 1)[0], answers[1], FullDisk.tries
        finally:
            await server.close()

    first_head, answer, tries = asyncio.run(scenario())
    assert first_head.startswith(b"HTTP/1.1 404 ")
    assert b"HTTP/1.1 503 " in answer and b"Location" not in answer
    assert tries == 2 and FullDisk.opened == 2
