"""An asyncio SMTP load generator: the injector when `smtp-source` is missing, and always
for the latency scenario.

It does what `smtp-source -s S -m N` does (S concurrent sessions, N messages
in all, one message per connection unless `reuse`), and two things
smtp-source cannot: each message gets its own Message-ID
(`<TOKEN.INDEX@bench.test>`), and the moment its 250 reply to DATA came back
is recorded (CLOCK_MONOTONIC, comparable across processes), so the latency
scenario can match it to the moment the sink saw the same Message-ID. With
`rate`, messages are paced: message i is sent no earlier than start + i/rate.

It runs in its own process (`python -m bench.loadgen`), like smtp-source,
so that its CPU use is not mixed with the harness's polling. With
`--wait-go` it loads everything, prints `ready` and waits for a line on
stdin, so interpreter start-up is not in the timed interval. It prints one
JSON line: sent, failed, elapsed, the first errors. No retries: a message
that is not answered 250 is a failure of the run, as with smtp-source.
Every loop is bounded by the message count and by `timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.genmsg import RCPT, SENDER

MAX_ERRORS_KEPT = 5


class ReplyError(Exception):
    """The server answered something other than the code the transaction needs."""


@dataclass
class LoadResult:
    """What a load run did. `acks` holds (message index, monotonic ns of its 250)."""

    sent: int = 0
    failed: int = 0
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    acks: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "elapsed": round(self.elapsed, 6),
            "errors": self.errors,
        }


def message_id(token: str, index: int) -> str:
    """The Message-ID the generator gives message `index` of a run named `token`."""
    return f"<{token}.{index}@bench.test>"


class MessageFactory:
    """Message number i: the template with its Message-ID replaced, CRLF, dot-stuffed.

    Built once per run from the template's bytes, so producing a message is
    two concatenations: the generator must not be the bottleneck.
    """

    def __init__(self, template: bytes, token: str) -> None:
        data = template.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        data = data.replace(b"\r\n.", b"\r\n..")
        if data.startswith(b"."):
            data = b"." + data
        marker = b"\r\nMessage-ID: "
        at = data.find(marker)
        if at < 0:
            data = data.replace(b"\r\n", marker + b"<x>\r\n", 1)  # after the first header
            at = data.find(marker)
        start = at + len(marker)
        end = data.find(b"\r\n", start)
        self.prefix = data[:start]
        self.suffix = data[end:] + b".\r\n"
        self.token = token

    def __call__(self, index: int) -> bytes:
        return self.prefix + message_id(self.token, index).encode() + self.suffix


async def _reply(reader: asyncio.StreamReader, want: int) -> None:
    """Read one (possibly multi-line) reply; ReplyError unless its code is `want`."""
    while True:
        line = await reader.readline()
        if not line:
            raise ReplyError(f"connection closed while waiting for {want}")
        if line[3:4] != b"-":
            break
    if not line[:3].isdigit() or int(line[:3]) != want:
        raise ReplyError(f"expected {want}, got {line.decode(errors='replace').strip()!r}")


class _Run:
    """Shared state of the sessions of one run."""

    def __init__(
        self,
        host: str,
        port: int,
        n: int,
        factory: MessageFactory,
        sender: str,
        rcpt: str,
        reuse: bool,
        rate: float | None,
    ) -> None:
        self.host, self.port, self.n = host, port, n
        self.factory = factory
        self.mail = f"MAIL FROM:<{sender}>\r\n".encode()
        self.rcpt = f"RCPT TO:<{rcpt}>\r\n".encode()
        self.reuse = reuse
        self.rate = rate
        self.next = 0
        self.start = 0.0
        self.result = LoadResult()

    def take(self) -> int | None:
        if self.next >= self.n:
            return None
        self.next += 1
        return self.next - 1

    def error(self, text: str) -> None:
        self.result.failed += 1
        if len(self.result.errors) < MAX_ERRORS_KEPT:
            self.result.errors.append(text)

    async def session(self) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while (index := self.take()) is not None:
            if self.rate:
                delay = self.start + index / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    await _reply(reader, 220)
                    writer.write(b"EHLO bench.test\r\n")
                    await _reply(reader, 250)
                assert reader is not None
                writer.write(self.mail)
                await _reply(reader, 250)
                writer.write(self.rcpt)
                await _reply(reader, 250)
                writer.write(b"DATA\r\n")
                await _reply(reader, 354)
                writer.write(self.factory(index))
                await _reply(reader, 250)
                self.result.acks.append((index, time.monotonic_ns()))
                self.result.sent += 1
                if not self.reuse:
                    writer.write(b"QUIT\r\n")
                    await _reply(reader, 221)
                    writer.close()
                    writer = reader = None
            except (OSError, ReplyError, asyncio.IncompleteReadError) as e:
                self.error(f"message {index}: {e}")
                if writer is not None:
                    writer.close()
                writer = reader = None
        if writer is not None and reader is not None:
            try:
                writer.write(b"QUIT\r\n")
                await asyncio.wait_for(_reply(reader, 221), 5)
            except (OSError, ReplyError, asyncio.IncompleteReadError, TimeoutError):
                pass
            writer.close()


async def run_load(
    host: str,
    port: int,
    n: int,
    template: bytes,
    sessions: int = 10,
    sender: str = SENDER,
    rcpt: str = RCPT,
    reuse: bool = False,
    rate: float | None = None,
    token: str = "bench",
    timeout: float = 600.0,
) -> LoadResult:
    """Send `n` messages over `sessions` concurrent sessions; bounded by `timeout` seconds.

    Messages not sent when the timeout strikes count as failed.
    """
    run = _Run(host, port, n, MessageFactory(template, token), sender, rcpt, reuse, rate)
    run.start = time.monotonic()
    tasks = [asyncio.create_task(run.session()) for _ in range(max(1, min(sessions, n)))]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    result = run.result
    result.elapsed = time.monotonic() - run.start
    if pending:
        missing = n - result.sent - result.failed
        result.failed += missing
        result.errors.append(f"timed out after {timeout:.0f}s with {missing} messages unsent")
    for task in done:
        if task.exception() is not None:
            result.errors.append(f"session crashed: {task.exception()!r}")
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.loadgen`: one load run; exit 0 when every message got its 250."""
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, required=True, help="messages to send in all")
    ap.add_argument("--sessions", type=int, default=10, help="concurrent sessions")
    ap.add_argument("--message", type=Path, required=True, help="template message file")
    ap.add_argument("--sender", default=SENDER)
    ap.add_argument("--rcpt", default=RCPT)
    ap.add_argument("--reuse", action="store_true", help="many messages per connection")
    ap.add_argument("--rate", type=float, default=None, help="messages per second (paced)")
    ap.add_argument("--token", default="bench", help="Message-IDs are <TOKEN.INDEX@bench.test>")
    ap.add_argument("--acks", type=Path, help="write 'INDEX MONOTONIC_NS' per 250 here")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--wait-go", action="store_true", help="print 'ready', wait for a stdin line")
    a = ap.parse_args(argv)
    if a.host not in ("localhost", "::1") and not a.host.startswith("127."):
        ap.error("the load generator only talks to loopback addresses")
    template = a.message.read_bytes()
    if a.wait_go:
        print("ready", flush=True)
        sys.stdin.readline()
    result = asyncio.run(
        run_load(
            a.host,
            a.port,
            a.n,
            template,
            a.sessions,
            a.sender,
            a.rcpt,
            a.reuse,
            a.rate,
            a.token,
            a.timeout,
        )
    )
    if a.acks:
        a.acks.write_text("".join(f"{i} {ns}\n" for i, ns in result.acks))
    print(json.dumps(result.summary()), flush=True)
    return 0 if result.failed == 0 and result.sent == a.n else 1


if __name__ == "__main__":
    sys.exit(main())
