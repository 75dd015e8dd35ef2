"""The link between `queue-send` and the `remote` workers: JSON lines on a Unix socket.

Each remote worker listens on `var/remote.<n>.sock`. A queue-send connects to
every worker and sends jobs; a worker answers each job with one result, in
any order. One line of JSON each way:

    job     {"id": NAME, "path": PATH, "route": [HOST, PORT] | null,
             "starttls": "never"|"opportunistic"|"required",
             "source_ip": IP | null, "helo": NAME | null,          the sending VirtualMTA
             "relay": [HOST, PORT], "auth": [USER, PASSWORD],      a relay server (optional)
             "throttle": {"key", "max_conn", "max_hour", "program"} (optional)
             "reuse": {"max_messages", "idle_timeout"}             (optional)
             "worker_key": KEY, "system_max": N}
    result  {"id": NAME, "status": "success"|"failure"|"deferral"|"connmaxout"|"missing"|"bad",
             "text": TEXT, "mx_hostname": H, "mx_ip": IP, "smtp_code": N | null,
             "outmtaid_hostname": NAME}

`missing` means the entry file was gone when the worker opened it (deleted by
an operator): nothing was attempted. `bad`: its envelope failed
greenarrow.lib.queue.entry.check_envelope (`text` says why); nothing was
attempted, and queue-send moves it to the queue's `bad/` folder. `connmaxout`: a throttle held the
attempt back (greenarrow.lib.deliver.throttle); nothing was attempted either. The worker reads the message from
`path` itself, so message bytes never cross the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

# The one table of delivery statuses. A worker answers one of the first five;
# queue-send turns a deferral or connmaxout past the queue lifetime into
# failure_toolong. All but `missing` and `bad` are logged (the delivery log's column 3,
# GreenArrow's documented values).
SUCCESS = "success"
FAILURE = "failure"
DEFERRAL = "deferral"
CONNMAXOUT = "connmaxout"  # a throttle held the attempt back: nothing was sent
MISSING = "missing"  # the entry file was gone: nothing was attempted, nothing is logged
BAD = "bad"  # the entry failed check_envelope: nothing was attempted; moved to bad/
FAILURE_TOOLONG = "failure_toolong"
LOGGED_STATUSES: tuple[str, ...] = (SUCCESS, FAILURE, FAILURE_TOOLONG, DEFERRAL, CONNMAXOUT)
RETRIED: tuple[str, ...] = (DEFERRAL, CONNMAXOUT)  # tried again later, unless too old


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    return json.loads(line)


class LineBatch:
    """Lines for one stream, written together when the event loop's current round ends.

    Each write to a socket is a system call, and on loopback the receiver's
    side of TCP runs in it too: jobs or results that become ready in the
    same round (or, with `delay`, within that many seconds) go out in one
    write, and wake the reader once.
    """

    def __init__(self, writer: asyncio.StreamWriter, delay: float = 0.0) -> None:
        self.writer = writer
        self.delay = delay
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        if not self.lines:
            loop = asyncio.get_running_loop()
            if self.delay:
                loop.call_later(self.delay, self.flush)
            else:
                loop.call_soon(self.flush)
        self.lines.append(line)

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if lines and not self.writer.is_closing():
            self.writer.write(b"".join(lines))


async def serve_jobs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     handle: Callable[[dict, LineBatch], Awaitable[None]], batches: set,
                     tasks: set, delay: float, log: logging.Logger) -> None:
    """Serve one queue-send link of a delivery agent (a remote worker, the local agent).

    Each job line starts `handle(job, results)` as a task of `tasks`; results wait
    up to `delay` to share a write (the message is delivered already, only
    queue-send's bookkeeping waits). The result batch is in `batches` while the
    link is open, so a stopping agent can flush it.
    """
    results = LineBatch(writer, delay)
    batches.add(results)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            task = asyncio.create_task(handle(decode(line), results))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except (ConnectionError, ValueError) as e:
        log.warning("queue-send link closed: %s", e)
    finally:
        batches.discard(results)
