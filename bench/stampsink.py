"""A sink that timestamps each arrival by Message-ID, for the latency scenario.

Neither smtp-sink nor `greenarrow sink` says *when* each message arrived, so
the latency scenario uses this one: a minimal SMTP receiver (EHLO/HELO, MAIL,
RCPT, DATA, RSET, NOOP, QUIT, PIPELINING-safe: commands are answered in
order) that, when the final `.` of a message is read, takes
CLOCK_MONOTONIC (the same clock the load generator uses for the 250 it got
back, and system-wide on Linux, so two processes can compare) and the
Message-ID header. It keeps a count file like `greenarrow sink`'s
(`messages=N`, rewritten every 20 ms while it changes) so the harness can
wait on it the same way, and writes `NS MESSAGE-ID` lines to `--out` when it
gets SIGTERM/SIGINT.

It runs in its own process (`python -m bench.stampsink`) so that the load
generator and the harness cannot delay its timestamps by holding a GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

COUNT_INTERVAL = 0.02


class StampSink:
    """Arrivals (monotonic ns, Message-ID) and a count file."""

    def __init__(self, count_file: Path | None) -> None:
        self.arrivals: list[tuple[int, bytes]] = []
        self.count_file = count_file
        self._flush_pending = False

    def arrived(self, message: bytes) -> None:
        stamp = time.monotonic_ns()
        self.arrivals.append((stamp, message_id(message)))
        if self.count_file is not None and not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_later(COUNT_INTERVAL, self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        if self.count_file is None:
            return
        tmp = self.count_file.with_name(f".{self.count_file.name}.tmp")
        tmp.write_text(f"messages={len(self.arrivals)}\n")
        os.replace(tmp, self.count_file)


def message_id(message: bytes) -> bytes:
    """The Message-ID field's value (stripped), or b"-" when the header block has none."""
    end = message.find(b"\r\n\r\n")
    head = b"\r\n" + (message if end < 0 else message[:end])
    marker = b"\r\nmessage-id:"
    at = head.lower().find(marker)
    if at < 0:
        return b"-"
    start = at + len(marker)
    stop = head.find(b"\r\n", start)
    return head[start : stop if stop >= 0 else None].strip() or b"-"


class _Session(asyncio.Protocol):
    def __init__(self, sink: StampSink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 stampsink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while self.transport is not None:
            if self.in_data:
                # The message so far starts right after "DATA\r\n"; look for CRLF.CRLF.
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    if self.buf.startswith(b".\r\n"):  # empty message
                        end, skip = -2, 3
                    else:
                        break
                else:
                    skip = end + 5
                message = bytes(self.buf[: end + 2]) if end >= 0 else b""
                del self.buf[:skip]
                self.in_data = False
                self.sink.arrived(message)
                out.append(b"250 ok\r\n")
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            verb = bytes(self.buf[:4]).upper()
            del self.buf[: nl + 1]
            if verb in (b"EHLO",):
                out.append(b"250-stampsink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                out.append(b"354 go ahead\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                out.append(b"221 bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                self.transport = None
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.append(b"250 ok\r\n")
            else:
                out.append(b"502 not implemented\r\n")
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, count_file: Path | None, out: Path) -> int:
    """Serve until SIGTERM/SIGINT; then write the arrivals to `out`; return their count."""
    loop = asyncio.get_running_loop()
    sink = StampSink(count_file)
    server = await loop.create_server(
        lambda: _Session(sink), host, port, reuse_address=True, backlog=1024
    )
    sink.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    sink.flush()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(b"".join(b"%d %s\n" % (ns, mid) for ns, mid in sink.arrivals))
    os.replace(tmp, out)
    return len(sink.arrivals)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.stampsink --port P --count-file F --out STAMPS`."""
    ap = argparse.ArgumentParser(prog="python -m bench.stampsink")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count-file", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    asyncio.run(serve(a.host, a.port, a.count_file, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
