"""`injectd`: takes messages from the compiled `bin/sendmail` client on `var/inject.sock`.

A Python process per command-line message spends most of its time starting
the interpreter; the client (greenarrow/client/sendmail.c) starts at once and
hands its arguments, a few environment variables and the message to this
long-lived service, which runs exactly what the Python `sendmail` runs
(greenarrow.lib.inject.command_line.outcome) and answers with the exit code and
the error text. The request format is in the client's source.
"""

from __future__ import annotations

import asyncio
import logging
import os

from greenarrow.lib.core.paths import INJECT_SOCKET, Root
from greenarrow.lib.inject import command_line

log = logging.getLogger("injectd")

SOCKET = INJECT_SOCKET
MAX_REQUEST = 256 * 1024 * 1024  # a message larger than this is refused outright


class RequestError(ValueError):
    pass


def parse_netstrings(data: bytes) -> list[bytes]:
    """The netstrings ("<length>:<bytes>,") of `data`, in order."""
    items = []
    pos = 0
    while pos < len(data):
        colon = data.find(b":", pos, pos + 21)
        if colon < 0 or not data[pos:colon].isdigit():
            raise RequestError("bad netstring length")
        length = int(data[pos:colon])
        end = colon + 1 + length
        if end >= len(data) or data[end:end + 1] != b",":
            raise RequestError("truncated netstring")
        items.append(data[colon + 1:end])
        pos = end + 1
    return items


def handle(root: Root, request: bytes) -> tuple[int, str]:
    """Inject the message of one request; (exit code, error text)."""
    items = parse_netstrings(request)
    try:
        program = items[0].decode()
        argc = int(items[1])
        argv = [os.fsdecode(a) for a in items[2:2 + argc]]
        envc = int(items[2 + argc])
        env_items = items[3 + argc:3 + argc + envc]
        message = items[3 + argc + envc]
    except (IndexError, ValueError):
        raise RequestError("malformed request") from None
    environ = {"HVMAIL_ROOT": str(root.path)}
    for item in env_items:
        name, _, value = os.fsdecode(item).partition("=")
        environ[name] = value
    return command_line.outcome(argv, message, environ, program,
                                qmail_inject=(program == "qmail-inject"))


class InjectDaemon:
    def __init__(self, root: Root) -> None:
        self.root = root
        self.server: asyncio.AbstractServer | None = None

    @property
    def path(self) -> str:
        return str(self.root.var / SOCKET)

    async def start(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o666)  # any local user may inject, as with bin/sendmail
        log.info("listening on %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.read(MAX_REQUEST + 1)
            while not reader.at_eof() and len(request) <= MAX_REQUEST:
                more = await reader.read(MAX_REQUEST + 1 - len(request))
                if not more:
                    break
                request += more
            if len(request) > MAX_REQUEST:
                code, text = 100, "sendmail: fatal: message too large for the injection daemon\n"
            else:
                try:
                    code, text = handle(self.root, request)
                except RequestError as e:
                    code, text = 111, f"sendmail: fatal: temporary failure: {e}\n"
            writer.write(f"{code}\n{text}".encode("utf-8", "replace"))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
