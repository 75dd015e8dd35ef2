"""`sendmail -bs`: an SMTP session on standard input and output.

Symfony Mailer and Laravel submit with `/usr/sbin/sendmail -bs -i` by
default: they speak SMTP to the program's pipes instead of handing it a
message. The session is smtpd's own (greenarrow.lib.smtp.server: the same
parser, limits and replies) with smtpd's commit (smtp_injection.InjectionPolicy),
so a message is checked and queued exactly as over TCP. What differs is
who the client is: a local user, as with command-line injection. So every
recipient may be relayed to (no smtp.tcp rule applies), addresses without
a domain are completed as on the command line (control/defaulthost ...),
the `GREENARROW_*` variables of the environment give the identifiers'
defaults, the trace field names the uid, and no TLS is offered.

Exit code: 0 when the session ended (QUIT or end of input), whatever the
replies said (the client read them); 111 when the install root cannot be
read (bad control file).
"""

from __future__ import annotations

import asyncio
import os

from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject import accept as injection
from greenarrow.lib.inject import command_line
from greenarrow.lib.inject.smtp_injection import InjectionPolicy, Settings
from greenarrow.lib.smtp.server import SmtpSession, Transaction


class LocalPolicy(InjectionPolicy):
    """InjectionPolicy for a local user on the pipes of `sendmail -bs`."""

    def __init__(self, settings: Settings, environ: dict[str, str], uid: int) -> None:
        super().__init__(settings)
        self.env = {k: v for k, v in environ.items()
                    if k.startswith(command_line.CLIENT_VARIABLE_PREFIX)}
        self.uid = uid
        self.control = str(settings.root.control)

    def connected(self, session: SmtpSession) -> str | None:
        return None  # one session per process: nothing to count

    def closed(self, session: SmtpSession) -> None:
        pass

    def _qualified(self, address: str) -> str:
        return command_line.qualify_all([address], self.control)[0]

    def check_sender(self, session: SmtpSession, address: str) -> str | None:
        try:
            injection.check_sender(self._qualified(address))
        except injection.InjectionError as e:
            return f"{'553 5.1.7' if e.permanent else '451 4.3.0'} {e.text}"
        return None

    def check_recipient(self, session: SmtpSession, address: str) -> str | None:
        try:
            injection.check_address(self._qualified(address), "recipient")
        except injection.InjectionError as e:
            return f"{'553 5.1.3' if e.permanent else '451 4.3.0'} {e.text}"
        return None

    def message(self, session: SmtpSession, transaction: Transaction, data: bytes) -> str:
        try:
            sender, *recipients = command_line.qualify_all(
                [transaction.sender, *transaction.recipients], self.control)
        except injection.InjectionError as e:
            return f"451 4.3.0 {e.text}"
        transaction.sender, transaction.recipients = sender, recipients
        return self.commit(session, transaction, data, self.env,
                           lambda: command_line.received(self.settings.me, self.uid))


class _Output(asyncio.Transport):
    """The session's transport: replies go to a file descriptor (standard output)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.done = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view and not self.done.is_set():
                view = view[os.write(self.fd, view):]
        except OSError:  # the client went away (EPIPE): the session is over
            self.close()

    def close(self) -> None:
        self.done.set()

    def is_closing(self) -> bool:
        return self.done.is_set()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # no peer address: the client is local


async def serve(policy: LocalPolicy, stdin: int = 0, stdout: int = 1) -> None:
    """One SMTP session on `stdin`/`stdout`, until QUIT, end of input or the timeout."""
    loop = asyncio.get_running_loop()
    output = _Output(stdout)
    session = SmtpSession(policy, idle_timeout=policy.settings.timeout)
    session.connection_made(output)
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            chunk = os.read(stdin, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        arrived.put_nowait(chunk)
        if not chunk:
            loop.remove_reader(stdin)

    os.set_blocking(stdin, False)
    try:
        loop.add_reader(stdin, readable)
        watching = True
    except PermissionError:  # a regular file (`sendmail -bs < script`): reads never block
        watching = False
    try:
        while not output.is_closing():
            if watching:
                chunk = await _first(arrived.get(), output.done.wait())
            else:
                chunk = os.read(stdin, 65536)
            if not chunk:
                break
            session.data_received(chunk)
    finally:
        if watching:
            loop.remove_reader(stdin)
        os.set_blocking(stdin, True)
        session.connection_lost(None)
        policy.trigger.flush()
        policy.trigger.close()


async def _first(read: object, closed: object) -> bytes:
    """The next chunk of input, or b"" once the session is closed (QUIT, timeout)."""
    read_task = asyncio.ensure_future(read)  # type: ignore[arg-type]
    closed_task = asyncio.ensure_future(closed)  # type: ignore[arg-type]
    done, pending = await asyncio.wait({read_task, closed_task},
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return read_task.result() if read_task in done else b""


def run(root: Root, environ: dict[str, str], uid: int) -> int:
    """`sendmail -bs`: serve one session on this process's standard input and output."""
    from greenarrow.lib.config import control, tcprules

    try:
        policy = LocalPolicy(Settings(root, local=True), environ, uid)
    except (control.ControlError, tcprules.TcpRulesError, OSError) as e:
        os.write(1, f"421 4.3.0 temporary failure: {e}\r\n".encode("utf-8", "replace"))
        return command_line.EXIT_TEMPORARY
    asyncio.run(serve(policy))
    return command_line.EXIT_OK
