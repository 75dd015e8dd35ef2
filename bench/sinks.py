"""The counting sinks every MTA relays to, and the exact wait on their count.

`smtp-sink` (from the Postfix package) is preferred: it is independent of
the engine under test, and C, so it is never the bottleneck. With `-c` it
appends `sess=S quit=Q mesg=M\\r` to its stdout every time the final `.` of a
message arrives, so `mesg` is an exact count. When it is not installed, the
engine's own `greenarrow sink --count-file` stands in (it rewrites
`messages=N ...` at most every 50 ms, so its "reached" moment can be up to
50 ms late; negligible against runs of several seconds). The latency
scenario uses bench.stampsink, which also keeps a `messages=N` count file.

Each sink is a process started here and stopped here by its pid, nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import port_listening, wait_port

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"


def smtp_sink_path() -> str | None:
    return SMTP_SINK if os.access(SMTP_SINK, os.X_OK) else shutil.which("smtp-sink")


def smtp_source_path() -> str | None:
    return SMTP_SOURCE if os.access(SMTP_SOURCE, os.X_OK) else shutil.which("smtp-source")


def read_smtp_sink_count(path: Path) -> int:
    """The last `mesg=N` of an smtp-sink -c output file (0 when there is none yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256))
            tail = f.read()
    except FileNotFoundError:
        return 0
    records = tail.split(b"\r")
    for record in reversed(records[:-1]):  # the last piece may be a half-written record
        at = record.rfind(b"mesg=")
        if at >= 0:
            try:
                return int(record[at + 5 :].split()[0])
            except (ValueError, IndexError):
                continue
    return 0


def read_messages_count(path: Path) -> int:
    """`messages=N` from a count file written by greenarrow sink or bench.stampsink."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    for part in text.split():
        if part.startswith("messages="):
            return int(part[9:])
    return 0


class Sink:
    """A sink process on 127.0.0.1:port with an exact message count."""

    kind = "sink"
    writes_stdout = False  # True: the process's stdout is the count file

    def __init__(self, port: int, work: Path) -> None:
        self.port = port
        self.work = work
        self.count_file = work / f"sink.{port}.count"
        self.proc: subprocess.Popen[bytes] | None = None
        self._err = work / f"sink.{port}.err"

    def argv(self) -> list[str]:
        """The command line of the sink process."""
        raise NotImplementedError

    def count(self) -> int:
        """Messages accepted so far (exact), read from the sink's count file."""
        raise NotImplementedError

    def start(self) -> Sink:
        """Start with a fresh count; return once it listens (RuntimeError if it does not)."""
        if port_listening(self.port):
            raise RuntimeError(f"port 127.0.0.1:{self.port} is already in use")
        self.work.mkdir(parents=True, exist_ok=True)
        self.count_file.unlink(missing_ok=True)
        with open(self.count_file if self.writes_stdout else os.devnull, "wb") as out, open(
            self._err, "wb"
        ) as err:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )
        if not wait_port(self.port, True, 15):
            self.stop()
            raise RuntimeError(f"{self.kind} did not listen on {self.port}: {self.errors()}")
        return self

    def errors(self) -> str:
        try:
            return self._err.read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process we started, wait (bounded), SIGKILL if it lingers."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.proc = None
        wait_port(self.port, False, 5)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PostfixSmtpSink(Sink):
    """`smtp-sink -c -u nobody -m 512 127.0.0.1:PORT 1024`, as the shared harness runs it."""

    kind = "smtp-sink"
    writes_stdout = True

    def argv(self) -> list[str]:
        binary = smtp_sink_path()
        assert binary is not None
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        return [binary, "-c", *user, "-m", "512", f"127.0.0.1:{self.port}", "1024"]

    def count(self) -> int:
        return read_smtp_sink_count(self.count_file)


class EngineSink(Sink):
    """The engine's `greenarrow sink --count-file` (when smtp-sink is not installed)."""

    kind = "greenarrow sink"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "greenarrow.bin.sink",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--count-file",
            str(self.count_file),
        ]

    def count(self) -> int:
        return read_messages_count(self.count_file)


class StampingSink(Sink):
    """bench.stampsink: arrival time of every Message-ID (latency scenario)."""

    kind = "stampsink"

    def __init__(self, port: int, work: Path) -> None:
        super().__init__(port, work)
        self.stamps_file = work / f"stamps.{port}.txt"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.stampsink",
            "--port",
            str(self.port),
            "--count-file",
            str(self.count_file),
            "--out",
            str(self.stamps_file),
        ]

    def start(self) -> Sink:
        self.stamps_file.unlink(missing_ok=True)
        return super().start()

    def count(self) -> int:
        return read_messages_count(self.count_file)

    def stamps(self) -> list[tuple[int, str]]:
        """(monotonic ns, Message-ID) of every arrival; read after `stop`."""
        out = []
        for line in self.stamps_file.read_text().splitlines():
            ns, _, mid = line.partition(" ")
            out.append((int(ns), mid))
        return out


def counting_sink(port: int, work: Path, prefer: str = "auto") -> Sink:
    """smtp-sink when installed (and not refused by `prefer="python"`), else greenarrow sink."""
    if prefer != "python" and smtp_sink_path():
        return PostfixSmtpSink(port, work)
    return EngineSink(port, work)


@dataclass
class Arrival:
    """How a wait on a sink ended. Times are time.monotonic() values."""

    first: float | None  # first message seen (None if never)
    reached: float | None  # count first >= n (None on timeout)
    final: int  # count after the settle period

    def ok(self, n: int) -> bool:
        return self.reached is not None and self.final == n


def wait_count(
    sink: Sink,
    n: int,
    timeout: float,
    settle: float = 2.0,
    interval: float = 0.005,
    stop_early: Callable[[], bool] | None = None,
) -> Arrival:
    """Poll the sink until it counted `n` (bounded by `timeout`), then keep counting for
    `settle` seconds so that a late duplicate shows up in `final`.

    `stop_early`, if given, is a callable polled too: when it returns True the
    wait gives up (e.g. the injector failed, nothing more will come).
    """
    deadline = time.monotonic() + timeout
    first = reached = None
    count = sink.count()
    while True:
        now = time.monotonic()
        if count >= 1 and first is None:
            first = now
        if count >= n:
            reached = now
            break
        if now > deadline or (stop_early is not None and stop_early()):
            break
        if sink.proc is not None and sink.proc.poll() is not None:
            break
        time.sleep(interval)
        count = sink.count()
    if reached is not None:
        time.sleep(settle)
    return Arrival(first, reached, sink.count())

