"""`injectd`: takes messages from the compiled `bin/sendmail` client on `var/inject.sock`.

A Python process per command-line message spends most of its time starting
the interpreter; the client (greenarrow/client/sendmail.c) starts at once and
hands its arguments, a few environment variables and the message to this
long-lived service, which runs exactly what the Python `sendmail` runs
(greenarrow.lib.inject.command_line.outcome) and answers with the exit code and
the error text. The request format is in docs/formats.md.

The socket is open to every local user, and the daemon may run with more
rights than its clients, so a client chooses no more than a user running the
Python `sendmail` chooses: the arguments, the message and the variables
command-line injection reads (command_line.client_variable). The install
root is the daemon's own; every other variable is dropped unread. The kernel
says who the client is (SO_PEERCRED), and that uid goes into the message's
Received field, as Postfix's sendmail records the submitting user.

What one client costs is bounded. The request is read as a stream: the
message's netstring length comes before its bytes and is checked against
control/databytes (or MAX_MESSAGE when that is 0) before a byte of it is
read. At most `max_clients` requests are served at once; the next clients
wait in the listen backlog (their `connect` waits), nothing is refused. The
message bytes being read at once stay within `budget`. A request that is
not complete `timeout` seconds after it started (then again after its
message began) is answered 111 and cut, however it trickles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from dataclasses import dataclass

from greenarrow.lib.config import control
from greenarrow.lib.core.paths import INJECT_SOCKET, Root
from greenarrow.lib.inject import accept as injection
from greenarrow.lib.inject import command_line

log = logging.getLogger("injectd")

SOCKET = INJECT_SOCKET
MAX_MESSAGE = 256 * 1024 * 1024  # the ceiling when control/databytes is 0 (no limit)
MAX_HEAD = 1024 * 1024  # the program name, the arguments and the variables together
MAX_CLIENTS = 16  # requests served at once; the others wait to be accepted
BUDGET = 64 * 1024 * 1024  # message bytes being read at once, over all clients
TIMEOUT = 60.0  # seconds for a request's head, and again for its message
BACKLOG = 128
STOP_GRACE = 5.0  # seconds a stopping daemon gives the requests under way (the supervisor waits 30)

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class RequestError(ValueError):
    """A request that breaks the format: a temporary failure (111), the client is at fault."""


@dataclass
class Client:
    """Who is at the other end of a connection, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer(sock: socket.socket) -> Client:
    pid, uid, gid = _CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    return Client(pid, uid, gid)


@dataclass
class Request:
    """A request up to its message: what the client may choose, and the message's length."""

    program: str  # "sendmail" or "qmail-inject"
    argv: list[str]
    environ: dict[str, str]  # only the variables command-line injection reads
    message_length: int


class _Netstrings:
    """The netstrings of one request, read from a stream; the head's bytes are bounded."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.head_left = MAX_HEAD

    async def length(self) -> int:
        try:
            head = await self.reader.readuntil(b":")
        except asyncio.LimitOverrunError:
            raise RequestError("bad netstring length") from None
        except asyncio.IncompleteReadError:
            raise RequestError("truncated request") from None
        digits = head[:-1]
        if not digits.isdigit() or len(digits) > 20:
            raise RequestError("bad netstring length")
        self.head_left -= len(head)
        return int(digits)

    async def body(self, length: int) -> bytes:
        try:
            data = await self.reader.readexactly(length)
            comma = await self.reader.readexactly(1)
        except asyncio.IncompleteReadError:
            raise RequestError("truncated request") from None
        if comma != b",":
            raise RequestError("netstring without its comma")
        return data

    async def item(self) -> bytes:
        length = await self.length()
        self.head_left -= length + 1
        if self.head_left < 0:
            raise RequestError(f"arguments and variables over {MAX_HEAD} bytes")
        return await self.body(length)

    async def count(self) -> int:
        item = await self.item()
        if not item.isdigit() or len(item) > 9:
            raise RequestError("bad count")
        return int(item)


async def read_head(items: _Netstrings) -> Request:
    """Everything before the message's bytes; variables a client may not set are dropped."""
    program = "qmail-inject" if await items.item() == b"qmail-inject" else "sendmail"
    argv = [os.fsdecode(await items.item()) for _ in range(await items.count())]
    environ = {}
    for _ in range(await items.count()):
        name, equals, value = os.fsdecode(await items.item()).partition("=")
        if equals and command_line.client_variable(name):
            environ[name] = value
    return Request(program, argv, environ, await items.length())


def handle(root: Root, request: Request, message: bytes, uid: int) -> tuple[int, str]:
    """Inject the message of one request into `root`; (exit code, error text)."""
    return command_line.outcome(request.argv, message, request.environ, request.program,
                                qmail_inject=(request.program == "qmail-inject"),
                                uid=uid, root=str(root.path))


class ByteBudget:
    """Bytes handed out first come, first served; a request for more than all waits for all."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._turn = asyncio.Lock()
        self._changed = asyncio.Condition()

    async def take(self, wanted: int) -> int:
        wanted = min(wanted, self.total)
        async with self._turn, self._changed:
            await self._changed.wait_for(lambda: self.free >= wanted)
            self.free -= wanted
        return wanted

    async def give(self, taken: int) -> None:
        async with self._changed:
            self.free += taken
            self._changed.notify_all()


class InjectDaemon:
    def __init__(self, root: Root, max_clients: int = MAX_CLIENTS, timeout: float = TIMEOUT,
                 budget: int = BUDGET, max_message: int = MAX_MESSAGE) -> None:
        self.root = root
        self.timeout = timeout
        self.max_message = max_message
        self.budget = ByteBudget(budget)
        self._slots = asyncio.Semaphore(max_clients)
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._clients: set[asyncio.Task] = set()

    @property
    def path(self) -> str:
        return str(self.root.var / SOCKET)

    async def start(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        # Any local user may inject, as anyone may run bin/sendmail: a client chooses no path.
        os.chmod(self.path, 0o666)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept())
        log.info("listening on %s", self.path)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a client beyond the bound waits in the backlog
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:  # out of descriptors: the client waits in the backlog
                self._slots.release()
                log.warning("cannot accept a client: %s", e)
                await asyncio.sleep(1)
                continue
            task = asyncio.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task) -> None:
        self._clients.discard(task)
        self._slots.release()

    async def _serve(self, conn: socket.socket) -> None:
        client = peer(conn)
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        try:
            code, text = await self._answer(reader, client)
            writer.write(f"{code}\n{text}".encode("utf-8", "replace"))
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, client: Client) -> tuple[int, str]:
        program = "sendmail"
        try:
            items = _Netstrings(reader)
            async with asyncio.timeout(self.timeout):
                request = await read_head(items)
            program = request.program
            self._check_size(request.message_length)
            taken = await self.budget.take(request.message_length)
            try:
                async with asyncio.timeout(self.timeout):
                    message = await items.body(request.message_length)
                return handle(self.root, request, message, client.uid)
            finally:
                await self.budget.give(taken)
        except RequestError as e:
            log.warning("uid %d pid %d: %s", client.uid, client.pid, e)
            return command_line.EXIT_TEMPORARY, f"{program}: fatal: temporary failure: {e}\n"
        except TimeoutError:
            log.warning("uid %d pid %d: request not complete in %g s, cut",
                        client.uid, client.pid, self.timeout)
            return (command_line.EXIT_TEMPORARY,
                    f"{program}: fatal: temporary failure: timed out reading the request\n")
        except injection.InjectionError as e:
            log.warning("uid %d pid %d: %s", client.uid, client.pid, e.text)
            code = command_line.EXIT_PERMANENT if e.permanent else command_line.EXIT_TEMPORARY
            return code, f"{program}: fatal: {e.text}\n"

    def _check_size(self, length: int) -> None:
        """Refuse a message over control/databytes (over `max_message` when that is 0)."""
        try:
            databytes = control.read(self.root.control, "databytes")
        except control.ControlError as e:
            raise injection.InjectionError(False, str(e)) from None
        if databytes:
            injection.check_size(length, databytes)
        elif length > self.max_message:
            raise injection.InjectionError(
                True, f"message is {length} bytes, over the injection daemon's limit of "
                      f"{self.max_message} (set control/databytes)")

    async def close(self) -> None:
        """Stop taking clients; those being served get STOP_GRACE seconds, then are cut (111)."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._clients:
            _, late = await asyncio.wait(set(self._clients), timeout=min(self.timeout, STOP_GRACE))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
