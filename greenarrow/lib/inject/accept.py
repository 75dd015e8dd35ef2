"""Accepting a message: validation, header processing and the queue commit.

Shared by command-line injection (`greenarrow inject`, `sendmail`,
`qmail-inject`) and SMTP injection (`smtpd`), so both treat a message the
same way (docs/operations.md, "What injection does to a message"):

- the identifiers (SendID, ListID, MtaID, Mail Class) come from the
  `X-GreenArrow-*` headers, else from the `GREENARROW_*` variables (for
  SMTP: the variables set for the client in `control/smtp.tcp`);
  a header wins over a variable because it is the more specific of the two;
- every `X-GreenArrow-*` header is stripped;
- `Message-ID` and `Date` are added when missing, using `me`;
- when a Mail Class applies (greenarrow.conf defines classes and the message
  names one, or a default is set), SimpleMH processing takes over
  (greenarrow.lib.simplemh.processing): each recipient gets their own copy, with
  tracking links, X-Mailer-Info, List-Unsubscribe and the encoded bounce
  address as envelope sender;
- one queue entry per recipient is committed into the ram-queue, and the
  scheduler is woken.

Errors are `InjectionError(permanent, text)`: permanent ones are exit 100 or
SMTP 5xx, the rest exit 111 or SMTP 451. The text says what is wrong.

Command-line injection imports this module: it imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
import time

from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.address import address_problem
from greenarrow.lib.core.identifiers import HEADER_NAMES, IDENTIFIERS, identifier_problem
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.simplemh import mail_class

TYPE_CHECKING = False  # typing and collections.abc cost start-up milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable


def validate_identifier(field: str, value: str, source: str) -> str:
    """Check an identifier; return it, or raise a permanent InjectionError naming `source`."""
    problem = identifier_problem(field, value)
    if problem:
        raise InjectionError(True, f"{problem} (from {source})")
    return value


def check_address(address: str, what: str) -> str:
    """An envelope address as it will go on the wire, or a permanent InjectionError."""
    problem = address_problem(address)
    if problem:
        raise InjectionError(True, f"{what} address {address!r} {problem}")
    return address


def check_sender(sender: str) -> str:
    """The envelope sender: empty (`<>`, for bounces) or a valid address."""
    return "" if sender == "" else check_address(sender, "sender")


class InjectionError(Exception):
    """The message cannot be accepted; `permanent` says whether to try again."""

    def __init__(self, permanent: bool, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.text = text


def check_size(size: int, databytes: int) -> None:
    """A permanent InjectionError for a message of `size` bytes over `databytes` (0: no limit)."""
    if databytes and size > databytes:
        raise InjectionError(
            True, f"message is {size} bytes, over the limit of {databytes} (control/databytes)")


class Prepared:
    """A message ready to commit: its final bytes and its identifiers.

    For SimpleMH (`simplemh` set) the final bytes depend on the recipient:
    use message_for().
    """

    __slots__ = ("message", "ids", "simplemh")

    def __init__(self, message: bytes, ids: dict[str, str], simplemh: object = None) -> None:
        self.message = message
        self.ids = ids
        self.simplemh = simplemh

    def message_for(self, recipient: str) -> bytes:
        """The message as it is queued for `recipient`."""
        return self.message if self.simplemh is None else self.simplemh.render(recipient)


def mail_classes(root: str | None, fast: object = None) -> mail_class.MailClasses:
    """The install root's Mail Classes (a cheap cached read); a broken greenarrow.conf is temporary.

    `fast` is the compiled SimpleMH module when this process has loaded it.
    """
    if root is None:
        return mail_class.EMPTY
    try:
        return mail_class.load(root, getattr(fast, "file_key", None))
    except mail_class.MailClassConfigError as e:
        raise InjectionError(False, str(e)) from None


def prepare(
    message: bytes, env: dict[str, str], me: str, msguid: str, now: float, trace: bytes = b"",
    root: str | None = None,
) -> Prepared:
    """Process the headers of a CRLF message; see the module docstring.

    `env` holds the `GREENARROW_*` variables that apply (the process
    environment for the command line; the smtp.tcp rule for SMTP).
    `trace` (a Received field) is put before the first header. `root` is
    the install root whose greenarrow.conf may define Mail Classes.
    """
    fast = sys.modules.get("greenarrow.pyx.simplemh")  # loaded once this process did SimpleMH
    classes = mail_classes(root, fast)
    if not classes.classes:
        fast = None
    if fast is not None:  # a long-lived injector that has done SimpleMH: the compiled scanner
        found, body_start = fast.split_headers(message)
        headers = [msglib.Header(*h) for h in found]
    else:
        headers, body_start = msglib.split_headers(message)
    ids: dict[str, str] = {}
    sources: dict[str, str] = {}
    drop: set[int] = set()
    for i, h in enumerate(headers):
        if h.name.startswith(b"x-greenarrow-"):
            drop.add(i)
    for field, (_, header_name, variable, _, _) in IDENTIFIERS.items():
        value = None
        for i in drop:
            h = headers[i]
            if h.name == header_name:
                value = msglib.header_value(message, h)
                source = f"header {HEADER_NAMES[h.name]}"
        if value is None and env.get(variable):
            value = env[variable]
            source = f"environment variable {variable}"
        if value:
            ids[field] = validate_identifier(field, value, source)
            sources[field] = source
    if classes.process_x_virtual_mta_header:  # X-Virtual-MTA wins over X-GreenArrow-MtaID
        for h in headers:
            if h.name == b"x-virtual-mta" and msglib.header_value(message, h):
                ids["mtaid"] = validate_identifier(
                    "mtaid", msglib.header_value(message, h), "header X-Virtual-MTA")
    added = []
    try:
        if msglib.find(headers, b"message-id") is None:
            added.append(msglib.header_field("Message-ID", f"<{msguid}@{me}>"))
        if msglib.find(headers, b"date") is None:
            added.append(msglib.header_field("Date", msglib.rfc5322_date(now)))
    except msglib.HeaderValueError as e:  # `me` comes from control/me
        raise InjectionError(False, f"{e} (control/me)") from None
    if classes.classes and (ids.get("mailclass") or classes.default):
        simplemh = sys.modules.get("greenarrow.lib.simplemh.processing")
        if simplemh is None:
            from greenarrow.lib.simplemh import (
                processing as simplemh,  # only SimpleMH mail pays for it
            )
        try:
            renderer = simplemh.prepare(message, headers, body_start, ids, sources, drop,
                                        added, trace, classes, root or "", now)
        except simplemh.SimpleMHError as e:
            raise InjectionError(e.permanent, e.text) from None
        simplemh_ids = renderer.ids()
        dkim = dkim_request(message, headers)
        if dkim:
            simplemh_ids["dkim"] = dkim
        return Prepared(message, simplemh_ids, renderer)
    if drop or added or trace:
        message = msglib.rebuild(message, headers, drop, prepend=trace, append=b"".join(added))
    return Prepared(message, ids)


def dkim_request(message: bytes, headers: list[msglib.Header]) -> str:
    """The signatures asked for by X-GreenArrow-DKIM headers, in the envelope's form.

    GreenArrow honours the header for SimpleMH mail (not for raw command-line
    injection), so only the SimpleMH path calls this. A bad value is a
    permanent error naming the header.
    """
    values = [msglib.header_value(message, h) for h in headers if h.name == b"x-greenarrow-dkim"]
    if not values:
        return ""
    from greenarrow.lib.dkim import request

    try:
        return request.encode_request(request.parse_dkim_header_values(values))
    except ValueError as e:
        raise InjectionError(True, str(e)) from None


def envelopes(
    prepared: Prepared,
    sender: str,
    recipients: list[str],
    msguid: str,
    now: float,
    source_ip: str = "",
) -> list[dict]:
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
        "instanceid": ids.get("instanceid", ""),
        "click_tracking_id": ids.get("click_tracking_id", ""),
        "injected_time": int(now),
        "source_ip": source_ip,
    }
    out = []
    for rcpt in recipients:
        env = dict(base)
        env["recipient"] = rcpt
        if prepared.simplemh is not None:
            env["sender"] = prepared.simplemh.sender(rcpt, sender)
            env["recipient"] = prepared.simplemh.recipient(rcpt)
        if ids.get("dkim"):
            env["dkim"] = ids["dkim"]
        out.append(env)
    return out


def accept(
    queue_dir: str,
    fifo: str | Callable[[list[str]], None],
    message: bytes,
    sender: str,
    recipients: list[str],
    env: dict[str, str],
    me: str,
    source_ip: str = "",
    trace: bytes = b"",
    databytes: int = 0,
    limit: int = 0,
    count_file: str = "",
    root: str | None = None,
    as_received: bool = False,
) -> str:
    """Validate, process and commit a CRLF message; return its msguid.

    `as_received`: queue the message unchanged after `trace` (mail for the
    engine's own mailboxes: no X-GreenArrow-* processing, no SimpleMH, no
    added Message-ID or Date), so a bounce or complaint is filed as it came.

    `limit` (control/queue.ram.limit.messages) is checked against the count
    the queue's scheduler publishes in `count_file`; over it the answer is a
    temporary failure, so the client tries again later and nothing is lost.
    `root` is the install root (default: the one holding `queue_dir`).
    Raises InjectionError. When this returns, the message is in the queue.
    """
    if not recipients:
        raise InjectionError(True, "no recipients")
    check_size(len(message), databytes)
    if limit and queue_entry.read_count(count_file) + len(recipients) > limit:
        raise InjectionError(False, f"queue is full ({limit} messages, "
                                    "control/queue.ram.limit.messages); try again later")
    now = time.time()
    msguid = queue_entry.new_msguid(now)
    if root is None:  # queue_dir is ROOT/queue/ram
        root = os.path.dirname(os.path.dirname(os.path.abspath(queue_dir)))
    if as_received:
        prepared = Prepared(trace + message, {})
    else:
        prepared = prepare(message, env, me, msguid, now, trace, root)
    envs = envelopes(prepared, sender, recipients, msguid, now, source_ip)
    try:
        if prepared.simplemh is None:
            names = queue_entry.commit(queue_dir, envs, prepared.message)
        else:  # one copy per recipient
            names = queue_entry.place(queue_dir, [
                (queue_entry.new_entry_name(msguid, i),
                 [queue_entry.envelope_line(e), b"\n", prepared.message_for(e["recipient"])])
                for i, e in enumerate(envs)])
    except queue_entry.QueueWriteError as e:
        raise InjectionError(False, str(e)) from None
    if callable(fifo):
        fifo(names)
    else:
        queue_entry.trigger(fifo, names)
    return msguid
