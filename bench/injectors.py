"""Injectors: SMTP load (smtp-source or bench.loadgen) and command-line injection.

The timed interval of every run starts at `go()`: for smtp-source that is
its exec (it starts in a millisecond); the Python load generator is started
beforehand and told to go on stdin, so its interpreter start-up is not
counted against the MTA.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.genmsg import RCPT, SENDER
from bench.sinks import smtp_source_path

REPO = Path(__file__).resolve().parent.parent


def python_env() -> dict[str, str]:
    """The environment for `python -m bench.*` children: the repository on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO))


class SmtpInjector:
    """One SMTP load run against 127.0.0.1:port, in a child process.

    `tool` is "smtp-source" (Postfix's, as the shared harness uses it: the
    same -F file for every message, HELO, one message per connection unless
    reuse) or "python" (bench.loadgen: EHLO, a unique Message-ID per message,
    optional pacing and per-message 250 timestamps).
    """

    def __init__(
        self,
        tool: str,
        port: int,
        n: int,
        message: Path,
        sessions: int = 10,
        reuse: bool = False,
        rate: float | None = None,
        acks: Path | None = None,
        token: str = "bench",
        timeout: float = 900.0,
        log: Path | None = None,
    ) -> None:
        self.tool = tool
        self.n = n
        self.timeout = timeout
        self.log = log
        if tool == "smtp-source":
            binary = smtp_source_path()
            if binary is None:
                raise RuntimeError("smtp-source is not installed")
            argv = [binary, "-s", str(sessions), "-m", str(n), "-F", str(message)]
            argv += ["-f", SENDER, "-t", RCPT, "-M", "bench.test"]
            argv += ["-d"] if reuse else []
            self.argv = [*argv, f"127.0.0.1:{port}"]
        else:
            argv = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--n", str(n)]
            argv += ["--sessions", str(sessions), "--message", str(message), "--token", token]
            argv += ["--timeout", str(timeout), "--wait-go"]
            argv += ["--reuse"] if reuse else []
            argv += ["--rate", str(rate)] if rate else []
            argv += ["--acks", str(acks)] if acks else []
            self.argv = argv
        self.proc: subprocess.Popen[str] | None = None
        self.t0 = 0.0
        self.ended: float | None = None
        self.rc: int | None = None
        self.output = ""
        self._thread: threading.Thread | None = None

    def prepare(self) -> None:
        """Start the load generator and wait until it is ready (no-op for smtp-source)."""
        if self.tool == "smtp-source":
            return
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=python_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"load generator did not start: {line}{self.proc.stdout.read()}")

    def go(self) -> float:
        """Start sending; return t0 (time.monotonic())."""
        if self.tool == "smtp-source":
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        else:
            assert self.proc is not None and self.proc.stdin is not None
            self.t0 = time.monotonic()
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        self._thread = threading.Thread(target=self._reap, daemon=True)
        self._thread.start()
        return self.t0

    def _reap(self) -> None:
        assert self.proc is not None
        try:
            out, _ = self.proc.communicate(timeout=self.timeout + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.ended = time.monotonic()
        self.output = out or ""
        self.rc = self.proc.returncode
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"$ {' '.join(self.argv)}\n{self.output}rc={self.rc}\n")

    def failed(self) -> bool:
        """True once the injector exited unsuccessfully (the wait on the sink can stop)."""
        return self.rc is not None and self.rc != 0

    def wait(self, timeout: float | None = None) -> int:
        """Wait (bounded) for the injector; return its exit code (124 if still running)."""
        if self._thread is not None:
            self._thread.join(self.timeout + 60 if timeout is None else timeout)
        return 124 if self.rc is None else self.rc

    def summary(self) -> dict[str, object]:
        """The load generator's JSON line, if it printed one."""
        for line in reversed(self.output.splitlines()):
            if line.startswith("{"):
                try:
                    return dict(json.loads(line))
                except ValueError:
                    break
        return {}

    def problem(self) -> str:
        """'' when the injector sent everything, else a short reason."""
        if self.rc == 0:
            return ""
        tail = " | ".join(self.output.strip().splitlines()[-3:])
        return f"{self.tool} rc={self.rc}: {tail[-400:]}"


@dataclass
class CliResult:
    """Command-line injection: per-process wall times and failures."""

    elapsed: float = 0.0
    durations: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.durations) * 1000 if self.durations else float("nan")

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.durations) * 1000 if self.durations else float("nan")


def cli_inject(
    argv: list[str],
    files: list[Path],
    parallel: int = 1,
    timeout: float = 900.0,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Feed each file to a fresh `argv` process on stdin, `parallel` at a time (like xargs -P).

    Bounded by the number of files and by `timeout` (files not started by
    then count as failed).
    """
    result = CliResult()
    lock = threading.Lock()
    todo = iter(files)
    deadline = time.monotonic() + timeout

    def worker() -> None:
        while True:
            with lock:
                path = next(todo, None)
            if path is None:
                return
            if time.monotonic() > deadline:
                with lock:
                    result.failed += 1
                continue
            with open(path, "rb") as f:
                started = time.monotonic()
                try:
                    proc = subprocess.run(
                        argv, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        env=env, timeout=120,
                    )
                    rc, err = proc.returncode, proc.stderr.decode(errors="replace")
                except subprocess.TimeoutExpired:
                    rc, err = 124, "timed out"
                took = time.monotonic() - started
            with lock:
                result.durations.append(took)
                if rc != 0:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(f"{path.name}: rc={rc} {err.strip()[-300:]}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 150)
    result.elapsed = time.monotonic() - t0
    return result
