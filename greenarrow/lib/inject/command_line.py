"""Command-line injection: the sendmail and qmail-inject arguments, and one message queued.

Shared by the `sendmail` / `qmail-inject` programs (greenarrow.bin.inject)
and the injection daemon that the compiled `bin/sendmail` client hands its
message to (greenarrow.lib.inject.daemon), so both behave alike. Start-up
cost is per message for the Python programs, so this module imports nothing
it does not need: no click, no email package unless -t asks for header
parsing.
"""

from __future__ import annotations

import os

from greenarrow.lib.config import control
from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.paths import (
    control_dir,
    count_path,
    queue_dir,
    root_path_from_env,
    trigger_path,
)
from greenarrow.lib.inject import accept as injection

EXIT_OK, EXIT_PERMANENT, EXIT_TEMPORARY = 0, 100, 111

USAGE = """\
usage: sendmail [-t] [-i] [-f sender] [-F fullname] [--] [recipient ...]

Reads a message on standard input and queues it for delivery.
  -f ADDR, -r ADDR  envelope sender (bounces go there); -f '' or -f '<>' for none
  -F NAME           full name for a From header added when the message has none
  -t                take recipients from the To, Cc and Bcc headers (Bcc is removed)
  -i, -oi           a line with a single dot does not end the message
  -bm               deliver mail (the default mode)
  -bs               speak SMTP on standard input and output (Symfony Mailer and
                    Laravel run `sendmail -bs -i`): the checks and queueing of SMTP
                    injection, every recipient allowed, as for a local user
Other sendmail flags are accepted and ignored. Environment: GREENARROW_SENDID,
GREENARROW_LISTID, GREENARROW_MTAID, GREENARROW_MAILCLASS; QMAILUSER or LOGNAME
or USER, and QMAILHOST, for the default sender (`greenarrow inject`: also HVMAIL_ROOT).
Exit: 0 queued, 100 permanent error, 111 temporary error.
"""

# The environment variables command-line injection reads, besides HVMAIL_ROOT: the
# identifiers' defaults and who the default sender is. `injectd` takes exactly these from
# a client and nothing else (greenarrow/client/sendmail.c sends the same list; a test
# holds the two together). The root is never a client's to choose.
CLIENT_VARIABLE_PREFIX = "GREENARROW_"
IDENTITY_VARIABLES = ("QMAILUSER", "QMAILHOST", "LOGNAME", "USER")


def client_variable(name: str) -> bool:
    """Whether command-line injection reads the variable `name` (HVMAIL_ROOT aside)."""
    return name.startswith(CLIENT_VARIABLE_PREFIX) or name in IDENTITY_VARIABLES


def received(me: str, uid: int, now: float | None = None) -> bytes:
    """The trace field naming the submitting user, as Postfix's sendmail writes it."""
    return f"Received: by {me} (GreenArrow, from userid {uid});\r\n\t{msglib.rfc5322_date(now)}\r\n".encode(
        "ascii", "replace")


# sendmail options that take a value (attached or as the next argument) and are ignored.
_IGNORED_WITH_VALUE = set("BCLNOpqRVXh")
_IGNORED_FLAGS = set("vUGmnsAd")


class UsageError(Exception):
    pass


class Options:
    __slots__ = ("sender", "fullname", "from_headers", "ignore_dots", "recipients", "smtp")

    def __init__(self) -> None:
        self.sender: str | None = None
        self.fullname = ""
        self.from_headers = False
        self.ignore_dots = False
        self.recipients: list[str] = []
        self.smtp = False  # -bs: an SMTP session on stdin/stdout (greenarrow.lib.inject.smtp_stdio)


def parse_args(argv: list[str], qmail_inject: bool = False) -> Options:
    """sendmail-style arguments; UsageError for modes we do not offer."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            opts.recipients.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        flag, rest = arg[1:2], arg[2:]
        if flag in ("f", "r", "F"):
            if not rest:
                if i >= len(argv):
                    raise UsageError(f"option -{flag} needs a value")
                rest = argv[i]
                i += 1
            if flag == "F":
                opts.fullname = rest
            else:
                opts.sender = "" if rest in ("<>", "") else rest.strip("<>")
        elif flag == "t":
            opts.from_headers = True
        elif flag == "i":
            opts.ignore_dots = True
        elif flag == "o":
            if not rest and i < len(argv):  # `-o i` is `-oi`, as getopt reads it
                rest = argv[i]
                i += 1
            if rest.startswith("i"):
                opts.ignore_dots = True
        elif flag == "b":
            if rest == "s" and not qmail_inject:
                opts.smtp = True
            elif rest not in ("m", ""):
                raise UsageError(f"mode -b{rest} is not supported; only -bm (deliver mail)"
                                 " and -bs (SMTP on standard input and output)")
        elif flag == "a" and qmail_inject:
            pass  # qmail-inject -a: recipients from arguments only (our default)
        elif flag == "h" and qmail_inject:
            opts.from_headers = True
        elif flag in _IGNORED_WITH_VALUE:
            if not rest:
                i += 1
        elif flag in _IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"unknown option {arg}")
    return opts


def cut_at_dot(data: bytes) -> bytes:
    """Without -i, a line holding a single dot ends the message (sendmail's rule)."""
    if data.startswith(b".\n") or data.startswith(b".\r\n") or data == b".":
        return b""
    for marker in (b"\n.\n", b"\n.\r\n"):
        pos = data.find(marker)
        if pos >= 0:
            data = data[:pos + 1]
    if data.endswith(b"\n."):
        data = data[:-1]
    return data


def header_recipients(message: bytes) -> tuple[list[str], bytes]:
    """Addresses of To, Cc and Bcc, and the message without its Bcc headers (-t)."""
    from email.utils import getaddresses  # only -t pays for the email package

    headers, _ = msglib.split_headers(message)
    values = []
    drop = set()
    for i, h in enumerate(headers):
        if h.name in (b"to", b"cc", b"bcc", b"resent-to", b"resent-cc", b"resent-bcc"):
            values.append(msglib.header_value(message, h))
            if h.name.endswith(b"bcc"):
                drop.add(i)
    addresses = [addr for _, addr in getaddresses(values) if addr]
    if drop:
        message = msglib.rebuild(message, headers, drop)
    return addresses, message


def default_sender(me: str, environ: dict[str, str] | None = None) -> str:
    """$QMAILUSER (or $LOGNAME, $USER) at $QMAILHOST; without $QMAILHOST, at `me`."""
    env = os.environ if environ is None else environ
    user = env.get("QMAILUSER") or env.get("LOGNAME") or env.get("USER") or "root"
    host = env.get("QMAILHOST") or me
    return f"{user}@{host}"


def needs_qualifying(address: str) -> bool:
    """Whether qualify() would change `address`: no host, a host without a dot, or a +."""
    if not address:
        return False
    local, at, host = address.rpartition("@")
    if not at:
        return True
    return bool(host) and not host.startswith("[") and (host.endswith("+") or "." not in host)


def qualify(address: str, defaulthost: str, defaultdomain: str, plusdomain: str) -> str:
    """An envelope address completed as qmail-inject completes it.

    `root` gets `@defaulthost`; then a host ending in `+` has the `+` replaced
    by `.plusdomain`, and a host without a dot gets `.defaultdomain` (so with
    the defaults, all `me`: `root` -> `root@me`, `a@web` -> `a@web.me`).
    """
    if not needs_qualifying(address):
        return address
    local, at, host = address.rpartition("@")
    if not at:
        local, host = address, defaulthost
    if host.endswith("+"):
        host = f"{host[:-1]}.{plusdomain}"
    elif host and "." not in host and not host.startswith("["):
        host = f"{host}.{defaultdomain}"
    return f"{local}@{host}"


def qualify_all(addresses: list[str], folder: str) -> list[str]:
    """qualify() each address; the three control files are read only when one needs it."""
    if not any(needs_qualifying(a) for a in addresses):
        return addresses
    try:
        names = [control.read_text(folder, n) for n in ("defaulthost", "defaultdomain",
                                                            "plusdomain")]
    except control.ControlError as e:
        raise injection.InjectionError(False, str(e)) from None
    return [qualify(a, *names) for a in addresses]


def check_fullname(fullname: str) -> str:
    """The -F full name, or a permanent InjectionError when it cannot go into a header."""
    problem = msglib.header_value_problem(fullname)
    if problem:
        raise injection.InjectionError(True, f"option -F: the full name {fullname!r} {problem}")
    return fullname


def add_from(message: bytes, sender: str, fullname: str) -> bytes:
    """Add a From header when the message has none (qmail-inject does the same).

    The name is a quoted string (RFC 5322 3.2.4): its quotes and backslashes
    are kept, escaped with a backslash. A name that is not ASCII is written
    as RFC 2047 encoded words instead, so the header stays 7-bit.
    """
    headers, _ = msglib.split_headers(message)
    if msglib.find(headers, b"from") is not None or not sender:
        return message
    name = display_name(check_fullname(fullname))
    value = f"{name} <{sender}>" if name else sender
    line = msglib.header_field("From", value)
    return msglib.rebuild(message, headers, set(), append=line)


def display_name(name: str) -> str:
    """A full name as the display name of an address: a quoted string, or encoded words."""
    if not name:
        return ""
    if name.isascii():
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    from binascii import b2a_base64  # only a non-ASCII name pays for it

    # RFC 2047: base64 words of at most 75 characters (45 octets of UTF-8 each, whole
    # characters), not inside quotes; a space between two words is not displayed.
    words, chunk = [], b""
    for c in name:
        octets = c.encode("utf-8", "replace")
        if len(chunk) + len(octets) > 45:
            words.append(chunk)
            chunk = b""
        chunk += octets
    words.append(chunk)
    return " ".join(f"=?utf-8?b?{b2a_base64(w, newline=False).decode()}?=" for w in words)


def sender_source(opts: Options, environ: dict[str, str]) -> str:
    """Where the envelope sender came from, for error messages: the option or the variables."""
    if opts.sender is not None:
        return "option -f"
    user = next((v for v in ("QMAILUSER", "LOGNAME", "USER") if environ.get(v)), "")
    host = "QMAILHOST" if environ.get("QMAILHOST") else ""
    names = " and ".join(f"${v}" for v in (user, host) if v)
    return f"default sender (no -f) from {names or 'control/me'}"


def inject(argv: list[str], stdin: bytes, environ: dict[str, str], qmail_inject: bool = False,
           uid: int | None = None, root: str | None = None) -> str:
    """Queue one message; return its msguid. Raises UsageError or InjectionError.

    `uid` is the submitting user (default: this process's), recorded in a
    Received field; `root` the install root (default: HVMAIL_ROOT of `environ`).
    """
    opts = parse_args(argv, qmail_inject)
    if opts.smtp:  # the programs serve -bs themselves; a message handed over cannot be SMTP
        raise UsageError("mode -bs is served by bin/sendmail itself, not with a message")
    if root is None:
        root = root_path_from_env(environ)  # strings, not pathlib: start-up time
    try:
        me = control.read_text(control_dir(root), "me")
        databytes = control.read_int(control_dir(root), "databytes")
        limit = control.read_int(control_dir(root), "queue.ram.limit.messages")
    except control.ControlError as e:
        raise injection.InjectionError(False, str(e)) from None
    if not opts.ignore_dots and not qmail_inject:
        stdin = cut_at_dot(stdin)
    message = msglib.to_crlf(stdin)
    recipients = list(opts.recipients)
    if opts.from_headers:
        found, message = header_recipients(message)
        recipients.extend(found)
    sender = default_sender(me, environ) if opts.sender is None else opts.sender
    sender, *recipients = qualify_all([sender, *recipients], control_dir(root))
    try:
        sender = injection.check_sender(sender)
    except injection.InjectionError as e:
        raise injection.InjectionError(True, f"{sender_source(opts, environ)}: {e.text}") from None
    recipients = [injection.check_address(r, "recipient") for r in recipients]
    check_fullname(opts.fullname)
    message = add_from(message, sender, opts.fullname)
    env = {k: v for k, v in environ.items() if k.startswith(CLIENT_VARIABLE_PREFIX)}
    return injection.accept(
        queue_dir(root, "ram"), trigger_path(root, "ram"), message, sender, recipients, env, me,
        trace=received(me, os.getuid() if uid is None else uid),
        databytes=databytes, limit=limit, count_file=count_path(root, "ram"),
    )


def outcome(argv: list[str], stdin: bytes, environ: dict[str, str], program: str,
            qmail_inject: bool = False, uid: int | None = None,
            root: str | None = None) -> tuple[int, str]:
    """Inject one message; (exit code, what to print on stderr) as qmail-inject would."""
    try:
        inject(argv, stdin, environ, qmail_inject, uid, root)
    except UsageError as e:
        return EXIT_PERMANENT, f"{program}: fatal: {e}\n{USAGE}"
    except injection.InjectionError as e:
        return (EXIT_PERMANENT if e.permanent else EXIT_TEMPORARY), f"{program}: fatal: {e.text}\n"
    except OSError as e:
        return EXIT_TEMPORARY, f"{program}: fatal: temporary failure: {e}\n"
    return EXIT_OK, ""
