"""`greenarrow demo`: the main job on an embedded default, start to finish.

Creates (or reuses) a local install root, routes every domain to the
project's own counting sink, starts the services with `hvmail_init`, injects
messages from the command line (`$HVMAIL_ROOT/bin/sendmail`, one process per
message) and over SMTP, waits until the sink has counted every one, prints
the `hvmail_report` summary, waits until every delivery attempt is an event
in the bundled PostgreSQL (`greenarrow events status`), and stops the
services. Nothing leaves loopback.
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from greenarrow.lib.config import control
from greenarrow.lib.core import users
from greenarrow.lib.core.paths import Root
from greenarrow.lib.devtools.sink import SinkThread
from greenarrow.lib.ops.install_root import init_root

ROUTE_ALL = """# Written by `greenarrow demo`: every domain goes to the demo's sink, and
# every delivery attempt is recorded as an event in the bundled PostgreSQL.
general {{
  server_id demo
  record_events delivery_attempt
}}
ip_address * {{
  domain * {{
    smtp_route 127.0.0.1:{port}
  }}
}}
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def demo_message(number: int, channel: str) -> bytes:
    body = "\n".join(f"Line {i} of demo message {number}: the quick brown fox." for i in range(20))
    return (
        f"From: Demo Sender <demo@sender.example>\n"
        f"To: <user{number}@demo.example>\n"
        f"Subject: Demo message {number} via {channel}\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=utf-8\n\n{body}\n"
    ).encode()


def recorded_attempts(root: Root) -> int:
    """How many delivery_attempt events the events table holds (0 while unreachable)."""
    import psycopg

    from greenarrow.lib.events import database

    conn = database.connect(database.configured(root), connect_timeout=5)
    if conn is None:
        return 0
    with conn:
        try:
            row = conn.execute(
                "SELECT count(*) FROM events WHERE event_type = 'delivery_attempt'").fetchone()
        except psycopg.Error:  # the recorder has not made the table yet
            return 0
    return int(row[0])


def wait_for_events(root: Root, expected: int, timeout: float) -> int:
    """Wait until `expected` delivery attempts are events (bounded); how many there are."""
    deadline = time.monotonic() + timeout
    count = recorded_attempts(root)
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        count = recorded_attempts(root)
    return count


def _program(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", f"greenarrow.bin.{name}", *args],
        env=env,
        capture_output=True,
        text=True,
    )


FALLBACK_ROOT = Path("/var/tmp/greenarrow-demo-root")


def reachable_root(root_path: Path, say: Callable[[str], None]) -> Path:
    """`root_path`, or, when started as root and the engine's users could not reach it
    (a folder under /root, say), FALLBACK_ROOT."""
    if not users.separated():
        return root_path
    users.ensure_accounts()
    queue_owner = users.service_accounts()[users.QUEUE_USER]
    parent = root_path.absolute().parent
    problem = users.unreachable(str(parent), queue_owner)
    if problem is None:
        return root_path
    say(f"{problem}: using {FALLBACK_ROOT} as the demo's install root instead")
    return FALLBACK_ROOT


def run_demo(
    root_path: Path, messages: int = 300, say: Callable[[str], None] = print, timeout: float = 300.0
) -> bool:
    """Run the demo; True when every message reached the sink exactly once."""
    root = Root(reachable_root(root_path, say).absolute())
    env = dict(os.environ, HVMAIL_ROOT=str(root.path))
    init_root(root)
    smtp_port = free_port()
    control.write(root.control, "smtp.listen", [f"127.0.0.1:{smtp_port}"])
    cli_count = messages // 2
    smtp_count = messages - cli_count
    with SinkThread() as sink:
        (root.control / "greenarrow.conf").write_text(ROUTE_ALL.format(port=sink.address[1]))
        say(f"install root: {root.path}")
        say(f"sink: {sink.address[0]}:{sink.address[1]}; SMTP injection: 127.0.0.1:{smtp_port}")
        started = _program("hvmail_init", "start", env=env)
        say(started.stdout.rstrip())
        if started.returncode != 0:
            say(started.stderr)
            return False
        t0 = time.time()
        recorded = 0
        try:
            sendmail = str(root.bin / "sendmail")
            for n in range(cli_count):
                proc = subprocess.run(
                    [sendmail, "-f", "demo@sender.example", f"user{n}@demo.example"],
                    input=demo_message(n, "sendmail"),
                    env=dict(env, GREENARROW_SENDID="demo-cli"),
                )
                if proc.returncode != 0:
                    say(f"sendmail exited {proc.returncode}")
                    return False
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
                for n in range(cli_count, messages):
                    msg = (
                        demo_message(n, "smtp")
                        .replace(
                            b"MIME-Version", b"X-GreenArrow-SendID: demo-smtp\nMIME-Version", 1
                        )
                        .replace(b"\n", b"\r\n")
                    )  # SMTP lines end in CRLF
                    smtp.sendmail("demo@sender.example", [f"user{n}@demo.example"], msg)
            injected = time.time() - t0
            say(
                f"injected {cli_count} messages with sendmail and {smtp_count} over SMTP "
                f"in {injected:.1f}s"
            )
            arrived = sink.wait_for(messages, timeout=timeout)
            elapsed = time.time() - t0
            count = sink.counters.messages
            say(
                f"sink counted {count} of {messages} messages in {elapsed:.1f}s "
                f"({count / elapsed:.0f} messages/s end to end)"
            )
            report = _program("hvmail_report", "-q", "all", "-s", f"{t0 - 1:.0f}", env=env)
            say(report.stdout.rstrip())
            recorded = wait_for_events(root, messages, timeout)
            say(f"events: {recorded} of {messages} delivery attempts recorded as "
                f"delivery_attempt events")
            status = _program("greenarrow", "events", "status", env=env)
            say(status.stdout.rstrip() or status.stderr.rstrip())
        finally:
            stopped = _program("hvmail_init", "stop", env=env)
            say(stopped.stdout.rstrip())
        time.sleep(0.2)
        return arrived and sink.counters.messages == messages and recorded >= messages
