"""What every long-running service shares: its process title, logging and signals.

Services log to stderr, one line per event; `hvmail_init` captures that into
`log/<service>/current`. SIGTERM asks a service to stop (it finishes or
safely abandons what it is doing), SIGHUP asks it to re-read its configuration.

Every asyncio service (smtpd, injectd, queue-send, the remote workers) runs
on asyncio's own loop: measured again on 2026-12-04 with the engine's
present code, per process and alternating, uvloop cost queue-send about a
third more CPU per message and the remote workers about a sixth more, and
gained nothing overall in the simplemh scenario (bench/RESULTS.md).
GREENARROW_EVENT_LOOP=uvloop in the environment chooses uvloop (a warning
and asyncio's loop when the package is missing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import setproctitle

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LOG_DELAY = 0.2  # seconds an INFO line may wait for company before it is written


class BatchedStderr(logging.Handler):
    """Writes log lines to standard error; the lines of a `*.session` logger in batches.

    The supervisor reads every service's standard error into its log file; a
    write per line (smtpd logs a line per SMTP session) cost the supervisor a
    wake-up and a write per message. So the lines of a logger whose name ends
    in `.session` wait up to LOG_DELAY for company; any other line, a WARNING or
    worse, 16 KiB of lines, or the process's exit (logging.shutdown) writes
    everything waiting at once, in order. A kill -9 may lose up to LOG_DELAY
    of session lines.
    """

    def __init__(self, delay: float = LOG_DELAY, limit: int = 16384) -> None:
        super().__init__()
        self.delay, self.limit = delay, limit
        self.parts: list[bytes] = []
        self.size = 0
        self.timer: threading.Timer | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:  # noqa: BLE001 (logging's own contract: report, never raise)
            self.handleError(record)
            return
        self.parts.append(line)
        self.size += len(line)
        if (record.levelno >= logging.WARNING or self.size >= self.limit
                or not record.name.endswith(".session")):
            self._write()
        elif self.timer is None:
            self.timer = threading.Timer(self.delay, self.flush)
            self.timer.daemon = True
            self.timer.start()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        data, self.parts, self.size = b"".join(self.parts), [], 0
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(2, view):]
            except OSError:
                return  # standard error is gone: nothing to log to


class LineFormatter(logging.Formatter):
    """LOG_FORMAT, with the date part of the time formatted once a second."""

    _second = -1
    _date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second, self._date = second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                             time.localtime(second))
        return f"{self._date},{int(record.msecs):03d}"


def setup(title: str) -> None:
    """Name the process (`ps` shows `greenarrow <title>`) and configure logging."""
    setproctitle.setproctitle(f"greenarrow {title}")
    # smtpd logs a line per session: what a record costs counts. No line shows the
    # thread, the process or the caller (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = BatchedStderr()
    handler.setFormatter(LineFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


EVENT_LOOP_ENV = "GREENARROW_EVENT_LOOP"
EVENT_LOOPS = ("asyncio", "uvloop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when GREENARROW_EVENT_LOOP=uvloop asks for it and it is installed;
    None (asyncio's loop) otherwise."""
    choice = os.environ.get(EVENT_LOOP_ENV, "").strip().lower()
    if choice in ("", "asyncio"):
        return None
    if choice != "uvloop":
        logging.getLogger("service").warning(
            "%s=%r is not one of %s: using the default", EVENT_LOOP_ENV, choice,
            ", ".join(EVENT_LOOPS))
        return None
    try:
        import uvloop
    except ImportError:
        logging.getLogger("service").warning(
            "%s=uvloop but the uvloop package is not installed: using asyncio's loop",
            EVENT_LOOP_ENV)
        return None
    return uvloop.new_event_loop


def run(main: Callable[[asyncio.Event, asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop, reload)` until it returns; signals set the events.

    `stop` is set by SIGTERM or SIGINT; `reload` by SIGHUP (main clears it
    after reloading).
    """

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        reload = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        await main(stop, reload)

    with asyncio.Runner(loop_factory=loop_factory()) as runner_:
        runner_.run(runner())


async def wait_stop_or_reload(
    stop: asyncio.Event, reload: asyncio.Event, on_reload: Callable[[], None]
) -> None:
    """Sleep until `stop`; call `on_reload` each time `reload` is set."""
    while not stop.is_set():
        stop_wait = asyncio.ensure_future(stop.wait())
        reload_wait = asyncio.ensure_future(reload.wait())
        await asyncio.wait({stop_wait, reload_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        reload_wait.cancel()
        if reload.is_set():
            reload.clear()
            on_reload()


def run_blocking(title: str, make: Callable[[], Any], what: str,
                 config_errors: tuple[type[Exception], ...] = ()) -> None:
    """Run a service that works in threads rather than asyncio, then exit.

    `make()` imports and builds it (an object with `configure()` and
    `run(stop, reload)`, given two threading.Events). An ImportError there (psycopg
    without libpq) is said once and the service waits for its stop instead of
    being restarted in a loop; one of `config_errors` from `configure()` exits 111
    with the line named.
    """
    setup(title)
    log = logging.getLogger(title)
    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        worker = make()
    except ImportError as exc:
        log.error("cannot %s: %s (install libpq5); waiting for stop", what, exc)
        while not stop.wait(60):
            pass
        sys.exit(0)
    try:
        worker.configure()
    except config_errors as exc:
        log.error("cannot start: %s", exc)
        sys.exit(111)
    worker.run(stop, reload)
    sys.exit(0)
