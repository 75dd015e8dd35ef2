"""Accepting a message: validation, header processing and the queue commit.

Shared by command-line injection (`greenarrow inject`, `sendmail`,
`qmail-inject`) and SMTP injection (`smtpd`), so both treat a message the
same way (ARCHITECTURE section 6):

- the identifiers (SendID, ListID, MtaID, Mail Class) come from the
  `X-GreenArrow-*` headers, else from the `GREENARROW_*` variables (for
  SMTP: the variables set for the client in `control/smtp.tcp`);
  a header wins over a variable because it is the more specific of the two;
- every `X-GreenArrow-*` header is stripped;
- `Message-ID` and `Date` are added when missing, using `me`;
- one queue entry per recipient is committed into the ram-queue, and the
  scheduler is woken.

Errors are `InjectionError(permanent, text)`: permanent ones are exit 100 or
SMTP 5xx, the rest exit 111 or SMTP 451. The text says what is wrong.

Command-line injection imports this module: it imports nothing heavy.
"""

from __future__ import annotations

import re
import time

from greenarrow.lib import message as msglib
from greenarrow.lib import queue_entry


class InjectionError(Exception):
    """The message cannot be accepted; `permanent` says whether to try again."""

    def __init__(self, permanent: bool, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.text = text


# Identifier rules (seed 002, spec section 2.5 and 9.1). One table: the
# validation and its error text come from here.
_LISTID = re.compile(r"[A-Za-z0-9_+]{1,20}\Z")
_SENDID = re.compile(r"[\x21-\x7e]{1,100}\Z")
_MAILCLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\Z")
_MTAID_BAD = re.compile(r"[^\x20-\x7e]|[,#@]")

IDENTIFIERS = {
    # field: (header name lower-cased, environment variable)
    "sendid": (b"x-greenarrow-sendid", "GREENARROW_SENDID"),
    "listid": (b"x-greenarrow-listid", "GREENARROW_LISTID"),
    "mtaid": (b"x-greenarrow-mtaid", "GREENARROW_MTAID"),
    "mailclass": (b"x-greenarrow-mailclass", "GREENARROW_MAILCLASS"),
}


def validate_identifier(field: str, value: str, source: str) -> str:
    """Check an identifier; return it, or raise a permanent InjectionError naming `source`."""
    if field == "listid":
        if not _LISTID.match(value):
            raise InjectionError(True, f"invalid ListID {value!r} in {source}: "
                                       "at most 20 characters of A-Z, a-z, 0-9, _ and +")
    elif field == "sendid":
        if not _SENDID.match(value):
            raise InjectionError(True, f"invalid SendID {value!r} in {source}: "
                                       "1 to 100 printable ASCII characters without spaces")
    elif field == "mailclass":
        if not _MAILCLASS.match(value):
            raise InjectionError(True, f"invalid Mail Class {value!r} in {source}: "
                                       "letters, digits and underscores, starting with a letter")
    elif field == "mtaid":
        if (len(value) > 200 or _MTAID_BAD.search(value) or value != value.strip()):
            raise InjectionError(True, f"invalid MtaID {value!r} in {source}: 1 to 200 printable "
                                       "ASCII characters other than , # and @, no outer spaces")
    return value


_ATOM = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\Z")
_QUOTED = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_DOMAIN = re.compile(rb"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z")
_IPLITERAL = re.compile(rb"\[(?:\d{1,3}\.){3}\d{1,3}\]\Z|\[IPv6:[0-9A-Fa-f:.]+\]\Z")


def check_address(address: str, what: str) -> str:
    """An envelope address (`local@domain`) as it will go on the wire, or InjectionError.

    Only ASCII is accepted: the engine does not speak SMTPUTF8, so an 8-bit
    address is refused rather than mangled.
    """
    try:
        raw = address.encode("ascii")
    except UnicodeEncodeError:
        raise InjectionError(True, f"{what} address {address!r} contains non-ASCII characters") from None
    if len(raw) > 320:
        raise InjectionError(True, f"{what} address is longer than 320 characters")
    local, at, domain = raw.rpartition(b"@")
    if not at or not local or not domain:
        raise InjectionError(True, f"{what} address {address!r} is not of the form local@domain")
    if not (_ATOM.match(local) or _QUOTED.match(local)) or local.startswith(b".") \
            or local.endswith(b".") or b".." in local:
        raise InjectionError(True, f"{what} address {address!r} has an invalid local part")
    if len(local) > 64:
        raise InjectionError(True, f"{what} address {address!r} has a local part over 64 characters")
    if not (_DOMAIN.match(domain) or _IPLITERAL.match(domain)) or len(domain) > 253:
        raise InjectionError(True, f"{what} address {address!r} has an invalid domain")
    return address


def check_sender(sender: str) -> str:
    """The envelope sender: empty (`<>`, for bounces) or a valid address."""
    return "" if sender == "" else check_address(sender, "sender")


def recipient_domain(recipient: str) -> str:
    return recipient.rpartition("@")[2].lower()


class Prepared:
    """A message ready to commit: its final bytes and its identifiers."""

    __slots__ = ("message", "ids")

    def __init__(self, message: bytes, ids: dict[str, str]) -> None:
        self.message = message
        self.ids = ids


def prepare(message: bytes, env: dict[str, str], me: str, msguid: str,
            now: float, trace: bytes = b"") -> Prepared:
    """Process the headers of a CRLF message; see the module docstring.

    `env` holds the `GREENARROW_*` variables that apply (the process
    environment for the command line; the smtp.tcp rule for SMTP).
    `trace` (a Received field) is put before the first header.
    """
    headers, _ = msglib.split_headers(message)
    ids: dict[str, str] = {}
    drop: set[int] = set()
    for i, h in enumerate(headers):
        if h.name.startswith(b"x-greenarrow-"):
            drop.add(i)
    for field, (header_name, variable) in IDENTIFIERS.items():
        value = None
        for i in drop:
            h = headers[i]
            if h.name == header_name:
                value = msglib.header_value(message, h)
                source = f"header {h.name.decode().title().replace('Greenarrow', 'GreenArrow')}"
        if value is None and env.get(variable):
            value = env[variable]
            source = f"environment variable {variable}"
        if value:
            ids[field] = validate_identifier(field, value, source)
    added = []
    if msglib.find(headers, b"message-id") is None:
        added.append(f"Message-ID: <{msguid}@{me}>\r\n".encode("ascii", "replace"))
    if msglib.find(headers, b"date") is None:
        added.append(f"Date: {msglib.rfc5322_date(now)}\r\n".encode("ascii"))
    if drop or added or trace:
        message = msglib.rebuild(message, headers, drop, prepend=trace, append=b"".join(added))
    return Prepared(message, ids)


def envelopes(prepared: Prepared, sender: str, recipients: list[str], msguid: str,
              now: float, source_ip: str = "") -> list[dict]:
    """One envelope per recipient (queue entry format, docs/formats.md)."""
    ids = prepared.ids
    base = {
        "sender": sender,
        "recipient": "",
        "msguid": msguid,
        "sendid": ids.get("sendid", ""),
        "listid": ids.get("listid", ""),
        "mtaid": ids.get("mtaid", ""),
        "mailclass": ids.get("mailclass", ""),
        "instanceid": "",
        "click_tracking_id": "",
        "injected_time": int(now),
        "source_ip": source_ip,
    }
    out = []
    for rcpt in recipients:
        env = dict(base)
        env["recipient"] = rcpt
        out.append(env)
    return out


def accept(queue_dir: str, fifo: str, message: bytes, sender: str, recipients: list[str],
           env: dict[str, str], me: str, source_ip: str = "", trace: bytes = b"",
           databytes: int = 0) -> str:
    """Validate, process and commit a CRLF message; return its msguid.

    Raises InjectionError. When this returns, the message is in the queue.
    """
    if not recipients:
        raise InjectionError(True, "no recipients")
    if databytes and len(message) > databytes:
        raise InjectionError(True, f"message is {len(message)} bytes, over the limit of "
                                   f"{databytes} (control/databytes)")
    now = time.time()
    msguid = queue_entry.new_msguid(now)
    prepared = prepare(message, env, me, msguid, now, trace)
    envs = envelopes(prepared, sender, recipients, msguid, now, source_ip)
    try:
        names = queue_entry.commit(queue_dir, envs, prepared.message)
    except queue_entry.QueueWriteError as e:
        raise InjectionError(False, str(e)) from None
    queue_entry.trigger(fifo, names)
    return msguid

