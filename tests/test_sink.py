"""The counting SMTP sink: `greenarrow.lib.devtools.sink` and the `greenarrow sink` program.

Every wait is bounded; nothing asserts on elapsed time.
"""

from __future__ import annotations

import os
import random
import select
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from greenarrow.bin.sink import sink_command
from greenarrow.lib.devtools.sink import Counters, SinkOptions, SinkThread

REPO = Path(__file__).resolve().parent.parent
WAIT = 15.0  # upper bound on any wait; never reached when things work


@pytest.fixture
def run_sink(tmp_path: Path) -> Iterator[Callable[..., SinkThread]]:
    started: list[SinkThread] = []

    def start(**options: object) -> SinkThread:
        sink = SinkThread(SinkOptions(**options)).start()  # type: ignore[arg-type]
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


def poll(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """True as soon as predicate() is; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Raw:
    """A bare SMTP client socket: send bytes as we like, read replies one by one."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=WAIT)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        """The next complete (possibly multi-line) reply: (code, last line)."""
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("sink closed the connection")
            if line[3:4] != b"-":
                return int(line[:3]), line.rstrip(b"\r\n")

    def codes(self, count: int) -> list[int]:
        return [self.reply()[0] for _ in range(count)]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def maildir_messages(maildir: Path) -> list[bytes]:
    assert list((maildir / "tmp").iterdir()) == []
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


BODY = (
    b"From: a@example.test\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"x.\r\n"
    b"last line\r\n"
)


def test_smtplib_message_is_counted_and_filed_byte_for_byte(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(maildir=maildir)
    with smtplib.SMTP(*sink.address, timeout=WAIT) as client:
        code, features = client.ehlo()
        assert code == 250
        assert client.has_extn("pipelining")
        # smtplib dot-stuffs the body; the sink must undo exactly that.
        assert client.sendmail("sender@example.test", ["r1@example.test", "r2@example.test"], BODY) == {}
        assert client.sendmail("", ["r3@example.test"], b"Subject: 2\r\n\r\nbody\r\n") == {}
    c = sink.counters
    assert (c.messages, c.recipients, c.deferred, c.failed, c.sessions) == (2, 3, 0, 0, 1)
    stuffed = BODY.replace(b"\r\n.", b"\r\n..")  # bytes counts DATA as sent on the wire
    assert c.bytes == len(stuffed) + len(b"Subject: 2\r\n\r\nbody\r\n")
    assert maildir_messages(maildir) == [
        b"Return-Path: <sender@example.test>\r\n"
        b"X-Sink-Rcpt: r1@example.test\r\n"
        b"X-Sink-Rcpt: r2@example.test\r\n" + BODY,
        b"Return-Path: <>\r\nX-Sink-Rcpt: r3@example.test\r\nSubject: 2\r\n\r\nbody\r\n",
    ]


def test_body_starting_with_a_dot_and_empty_body(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(maildir=maildir)
    raw = Raw(sink.address)
    assert raw.reply()[0] == 220
    raw.send(b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    assert raw.codes(4) == [250, 250, 250, 354]
    raw.send(b"..leading\r\n.\r\n")
    assert raw.codes(1) == [250]
    raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n.\r\nQUIT\r\n")
    assert raw.codes(5) == [250, 250, 354, 250, 221]
    raw.close()
    assert sink.counters.messages == 2
    assert sink.counters.bytes == len(b"..leading\r\n")
    assert maildir_messages(maildir) == [
        b"Return-Path: <a@x>\r\nX-Sink-Rcpt: b@x\r\n.leading\r\n",
        b"Return-Path: <a@x>\r\nX-Sink-Rcpt: c@x\r\n",
    ]


def test_pipelining_everything_in_one_packet(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(maildir=maildir)
    raw = Raw(sink.address)
    txn = b"MAIL FROM:<s@x> SIZE=20 BODY=8BITMIME\r\nRCPT TO:<r1@x>\r\nRCPT TO:<r2@x>\r\nDATA\r\nSubject: p\r\n\r\nhi\r\n.\r\n"
    raw.send(b"EHLO client\r\n" + txn * 3 + b"NOOP\r\nQUIT\r\n")
    codes = raw.codes(1 + 1 + 5 * 3 + 2)
    assert codes == [220, 250] + [250, 250, 250, 354, 250] * 3 + [250, 221]
    assert raw.file.read() == b""  # closed after QUIT
    raw.close()
    c = sink.counters
    assert (c.messages, c.recipients, c.sessions) == (3, 6, 1)
    assert maildir_messages(maildir) == [
        b"Return-Path: <s@x>\r\nX-Sink-Rcpt: r1@x\r\nX-Sink-Rcpt: r2@x\r\nSubject: p\r\n\r\nhi\r\n"
    ] * 3


def test_input_split_into_single_bytes(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(maildir=maildir)
    raw = Raw(sink.address)
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert raw.reply()[0] == 220
    stuffed = b"a\r\n..b\r\n.\r\n"
    for byte in b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n" + stuffed + b"QUIT\r\n":
        raw.send(bytes([byte]))
    assert raw.codes(6) == [250, 250, 250, 354, 250, 221]
    raw.close()
    assert sink.counters.messages == 1
    assert maildir_messages(maildir) == [b"Return-Path: <a@x>\r\nX-Sink-Rcpt: b@x\r\na\r\n.b\r\n"]


def test_bare_lf_lines_are_accepted(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(maildir=maildir)
    raw = Raw(sink.address)
    raw.send(b"HELO c\nMAIL FROM:<a@x>\nRCPT TO:<b@x>\nDATA\nline\n.\nQUIT\n")
    assert raw.codes(7) == [220, 250, 250, 250, 354, 250, 221]
    raw.close()
    assert maildir_messages(maildir) == [b"Return-Path: <a@x>\r\nX-Sink-Rcpt: b@x\r\nline\n"]


def test_rset_in_the_middle_discards_the_transaction(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(maildir=maildir)
    with smtplib.SMTP(*sink.address, timeout=WAIT) as client:
        client.ehlo()
        assert client.mail("old@x")[0] == 250
        assert client.rcpt("gone@x")[0] == 250
        assert client.rset()[0] == 250
        assert client.mail("new@x")[0] == 250
        assert client.rcpt("kept@x")[0] == 250
        assert client.data(b"Subject: r\r\n\r\nx\r\n")[0] == 250
    c = sink.counters
    assert (c.messages, c.recipients) == (1, 1)
    assert maildir_messages(maildir) == [b"Return-Path: <new@x>\r\nX-Sink-Rcpt: kept@x\r\nSubject: r\r\n\r\nx\r\n"]


def test_sequence_and_syntax_errors(run_sink) -> None:
    sink = run_sink()
    raw = Raw(sink.address)
    raw.send(
        b"EHLO c\r\n"
        b"RCPT TO:<a@x>\r\n"  # 503 MAIL first
        b"DATA\r\n"  # 503 MAIL first
        b"MAIL TO:<a@x>\r\n"  # 501
        b"MAIL FROM:<a@x>\r\n"
        b"MAIL FROM:<b@x>\r\n"  # 503 nested
        b"RCPT TO:<>\r\n"  # 501
        b"RCPT FROM:<a@x>\r\n"  # 501
        b"DATA\r\n"  # 503 RCPT first
        b"VRFY a\r\n"
        b"HELP\r\n"
        b"STARTTLS\r\n"  # not offered
        b"NOOP\r\n"
        b"QUIT\r\n"
    )
    assert raw.codes(15) == [220, 250, 503, 503, 501, 250, 503, 501, 501, 503, 252, 214, 502, 250, 221]
    raw.close()
    assert sink.counters.messages == 0


def test_defer_rate_one_answers_451(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(defer_rate=1.0, maildir=maildir)
    with smtplib.SMTP(*sink.address, timeout=WAIT) as client:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail("a@x", ["b@x", "c@x"], b"Subject: d\r\n\r\nx\r\n")
        assert caught.value.smtp_code == 451
    c = sink.counters
    assert (c.messages, c.recipients, c.bytes, c.deferred, c.failed) == (0, 0, 0, 1, 0)
    assert maildir_messages(maildir) == []


def test_fail_rate_one_answers_554(run_sink) -> None:
    sink = run_sink(fail_rate=1.0)
    with smtplib.SMTP(*sink.address, timeout=WAIT) as client:
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError) as caught:
                client.sendmail("a@x", ["b@x"], b"Subject: f\r\n\r\nx\r\n")
            assert caught.value.smtp_code == 554
    c = sink.counters
    assert (c.messages, c.deferred, c.failed) == (0, 0, 2)


def _outcomes(sink: SinkThread, count: int) -> list[int]:
    raw = Raw(sink.address)
    raw.send(b"EHLO c\r\n" + b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nx\r\n.\r\n" * count + b"QUIT\r\n")
    codes = raw.codes(2 + 4 * count + 1)
    raw.close()
    return codes[2:-1][3::4]


def test_seeded_rates_are_deterministic(run_sink) -> None:
    options = {"defer_rate": 0.25, "fail_rate": 0.25, "seed": 7}
    first = _outcomes(run_sink(**options), 40)
    again = _outcomes(run_sink(**options), 40)
    rng = random.Random(7)
    expected = []
    for _ in range(40):
        draw = rng.random()
        expected.append(451 if draw < 0.25 else 554 if draw < 0.5 else 250)
    assert first == again == expected
    assert {451, 554, 250} <= set(first)


def test_delay_keeps_pipelined_replies_in_order(run_sink) -> None:
    sink = run_sink(delay=0.05)
    raw = Raw(sink.address)
    raw.send(
        b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nx\r\n.\r\n"
        b"NOOP\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\ny\r\n.\r\nQUIT\r\n"
    )
    assert raw.codes(12) == [220, 250, 250, 250, 354, 250, 250, 250, 250, 354, 250, 221]
    raw.close()
    assert sink.counters.messages == 2


def test_client_dropping_mid_data_is_not_counted(run_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    sink = run_sink(maildir=maildir)
    raw = Raw(sink.address)
    raw.send(b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    assert raw.codes(5) == [220, 250, 250, 250, 354]
    raw.send(b"Subject: half\r\n\r\nno end\r\n.")  # "." without its CRLF is not the end
    raw.close()
    assert sink.wait_idle(WAIT)
    c = sink.counters
    assert (c.messages, c.recipients, c.bytes, c.sessions) == (0, 0, 0, 1)
    assert maildir_messages(maildir) == []


def test_client_dropping_during_delay_is_not_counted(run_sink) -> None:
    sink = run_sink(delay=0.2)
    raw = Raw(sink.address)
    raw.send(b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nx\r\n.\r\n")
    assert raw.codes(5) == [220, 250, 250, 250, 354]
    raw.sock.shutdown(socket.SHUT_RDWR)
    raw.close()
    assert sink.wait_idle(WAIT)
    assert sink.counters.messages == 0


def test_count_file_is_kept_current(run_sink, tmp_path: Path) -> None:
    count_file = tmp_path / "count"
    sink = run_sink(count_file=count_file)
    # Written as soon as the sink listens: a harness can wait for it.
    assert count_file.read_text() == "messages=0 recipients=0 deferred=0 failed=0 sessions=0 bytes=0\n"
    message = b"Subject: n\r\n\r\nx\r\n"
    with smtplib.SMTP(*sink.address, timeout=WAIT) as client:
        for _ in range(5):
            client.sendmail("a@x", ["b@x", "c@x"], message)
    expected = f"messages=5 recipients=10 deferred=0 failed=0 sessions=1 bytes={5 * len(message)}\n"
    assert poll(lambda: count_file.read_text() == expected), count_file.read_text()
    assert Counters.parse(expected) == Counters(5, 10, 0, 0, 1, 5 * len(message))
    assert [p.name for p in tmp_path.iterdir()] == ["count"]  # no temporary file left behind
    sink.stop()
    assert count_file.read_text() == expected


def test_wait_for_and_many_sessions(run_sink) -> None:
    sink = run_sink()
    for n in range(20):
        with smtplib.SMTP(*sink.address, timeout=WAIT) as client:
            client.sendmail("a@x", ["b@x"], f"Subject: {n}\r\n\r\nx\r\n".encode())
    assert sink.wait_for(20, WAIT)
    assert not sink.wait_for(21, 0.05)
    assert (sink.counters.messages, sink.counters.sessions) == (20, 20)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="defer_rate"):
        SinkOptions(defer_rate=1.5)
    with pytest.raises(ValueError, match="must not exceed 1"):
        SinkOptions(defer_rate=0.6, fail_rate=0.6)
    with pytest.raises(ValueError, match="delay"):
        SinkOptions(delay=-1)


# -- the program --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_program(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start `python -m greenarrow.bin.sink`; return once its count file says it listens."""
    port = free_port()
    count_file = tmp_path / "count"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "greenarrow.bin.sink", "--listen", f"127.0.0.1:{port}", "--count-file", str(count_file), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    if not poll(lambda: count_file.exists() or proc.poll() is not None):
        proc.kill()
    if proc.poll() is not None:
        out, err = proc.communicate(timeout=WAIT)
        pytest.fail(f"sink did not start: {err.decode()}")
    return proc, port, count_file


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, out.decode(), err.decode()


def test_program_exit_after(tmp_path: Path) -> None:
    maildir = tmp_path / "md"
    proc, port, count_file = start_program(tmp_path, "--maildir", str(maildir), "--exit-after", "2")
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    if cmdline.exists():
        assert f"greenarrow sink 127.0.0.1:{port}" in cmdline.read_bytes().decode(errors="replace")
    one, two = b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.sendmail("a@x", ["b@x"], one)
        client.sendmail("a@x", ["c@x", "d@x"], two)
    code, out, err = finish(proc)
    line = f"messages=2 recipients=3 deferred=0 failed=0 sessions=1 bytes={len(one) + len(two)}"
    assert code == 0, err
    assert out.splitlines() == [line]
    assert f"listening on 127.0.0.1:{port}" in err
    assert count_file.read_text() == line + "\n"
    assert len(maildir_messages(maildir)) == 2


def test_program_sigusr1_and_sigterm(tmp_path: Path) -> None:
    proc, port, count_file = start_program(tmp_path, "--defer-rate", "1", "--seed", "1")
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        with pytest.raises(smtplib.SMTPDataError):
            client.sendmail("a@x", ["b@x"], b"x\r\n")
    line = "messages=0 recipients=0 deferred=1 failed=0 sessions=1 bytes=0"
    assert poll(lambda: count_file.read_text() == line + "\n")
    proc.send_signal(signal.SIGUSR1)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], WAIT)
    assert ready
    assert proc.stdout.readline().decode() == line + "\n"
    assert proc.poll() is None  # SIGUSR1 reports, it does not stop
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 0, err
    assert out.splitlines() == [line]


def test_program_rejects_bad_arguments() -> None:
    runner = CliRunner()
    result = runner.invoke(sink_command, ["--listen", "nonsense"])
    assert result.exit_code == 2
    assert "not ip:port" in result.output
    result = runner.invoke(sink_command, ["--defer-rate", "0.7", "--fail-rate", "0.7"])
    assert result.exit_code == 2
    assert "must not exceed 1" in result.output


def test_program_reports_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run(
            [sys.executable, "-m", "greenarrow.bin.sink", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            env=env,
            timeout=WAIT,
        )
    assert result.returncode == 1
    assert b"cannot listen on 127.0.0.1:" in result.stderr
