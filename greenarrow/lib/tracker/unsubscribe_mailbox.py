"""The unsubscribe processor: mailto: unsubscribe requests into `engine_unsub` events.

SimpleMH's List-Unsubscribe offers `mailto:` the unsubscribe form of the
bounce address (greenarrow.lib.simplemh.return_path, versions 7 and 8),
with `?subject=unsubscribe-DATA` (DATA of kind `l`, the one in the
one-click URL). greenarrow.lib.routing.incoming delivers those requests to
the domain's `unsubscribe_mailbox`; each pass here takes the messages in
its `new/`, oldest name first, and for each one:

1. reads its head (the `Delivered-To` the local agent adds: the address
   the request was sent to; the Subject);
2. verifies the address with the secret constants (and the subject's DATA,
   which the short form needs); an address that is not an unsubscribe
   request made here is refused;
3. writes `engine_unsub` (blank `click_url`) to the spool
   `log/events/unsubscribe-mailbox/`, then unlinks the message. Killed
   between the two, the message is read again and the event written
   again with the same `event_unique_id`: the events store keeps one.
4. A refused message is renamed into the mailbox's
   `.INBOX.CouldNotProcess/new/` and the log says why.

Once per message: when the subject still carries the DATA, the event's id
is the one a one-click POST of the same message makes (tracker.answer), so
a recipient who unsubscribes both ways is recorded once; without it (a
client that dropped the subject), the id comes from the address, which is
one per message and recipient too.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

from greenarrow.lib.config import conf as conf_file
from greenarrow.lib.config import secret_constants
from greenarrow.lib.core.paths import Root
from greenarrow.lib.core.rotating_log import RotatingLog
from greenarrow.lib.events.types import make_event
from greenarrow.lib.routing import incoming
from greenarrow.lib.simplemh import return_path as bounce_address
from greenarrow.lib.simplemh import tracking_url
from greenarrow.lib.tracker import answer, spool
from greenarrow.lib.tracker import settings as tracker_settings

log = logging.getLogger("unsubscribe-processor")

SPOOL = "unsubscribe-mailbox"  # log/events/<SPOOL>/
MAX_HEAD = 64 * 1024  # bytes of a request read: its header is all we use
BATCH = 200  # messages per mailbox per pass
COULD_NOT_PROCESS = ".INBOX.CouldNotProcess"
_SUBJECT_DATA = re.compile(r"unsubscribe-([A-Za-z0-9_-]+)", re.IGNORECASE)


class RequestError(ValueError):
    """A message in an unsubscribe mailbox that is not an unsubscribe request made here."""


@dataclass(frozen=True)
class Request:
    """The parts of an unsubscribe request the processor reads."""

    delivered_to: str
    subject: str


def read_request(head: bytes) -> Request:
    """Delivered-To (the first: the local agent's) and Subject of a message's header."""
    text = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields: dict[str, str] = {}
    name = ""
    for line in text.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and name:
            fields[name] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon:
            name = ""
            continue
        if name in fields:
            name = ""  # only the first of each
            continue
        fields[name] = value.strip()
    if "delivered-to" not in fields:
        raise RequestError("no Delivered-To field (not delivered by the local agent)")
    return Request(fields["delivered-to"], fields.get("subject", ""))


def unsub_event(request: Request, constants: tuple[str, str], server_id: str,
                now_ns: int) -> dict:
    """The `engine_unsub` of a verified request; RequestError when it does not verify."""
    match = _SUBJECT_DATA.search(request.subject)
    data = match.group(1) if match else None
    try:
        address = bounce_address.decode(request.delivered_to, constants, mailer_info=data)
    except bounce_address.BounceAddressError as e:
        if data is None:
            raise RequestError(str(e)) from None
        try:  # a full-form address with a subject that is not ours: the address alone
            address = bounce_address.decode(request.delivered_to, constants)
        except bounce_address.BounceAddressError as e2:
            raise RequestError(str(e2)) from None
        data = None
    if not address.unsubscribe:
        raise RequestError(f"{request.delivered_to!r} is a bounce address, not an unsubscribe "
                           "address")
    found = None
    if data is not None:
        try:
            found = tracking_url.decode(data, constants, kinds={tracking_url.LIST_UNSUBSCRIBE})
        except tracking_url.TrackingDataError:
            found = None
        if found is not None and (found.recipient, found.listid, found.sendid) != (
                address.recipient, address.listid, address.sendid):
            found = None  # a subject from another message: trust the address only
    if found is not None:
        return answer.unsub_event(found, server_id, now_ns, data, "")
    return make_event(
        "engine_unsub", now_ns // 1_000_000_000, server_id,
        "\0".join((request.delivered_to.strip("<> ").lower(), "mailto-unsub")),
        email=address.recipient, listid=address.listid, sendid=address.sendid,
        click_url="", click_tracking_id=address.click_tracking_id,
        mailclass=address.mailclass, instanceid=address.instanceid)


def _refuse(mailbox: incoming.Mailbox, name: str, why: str) -> None:
    folder = os.path.join(mailbox.path, COULD_NOT_PROCESS)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    os.rename(os.path.join(mailbox.path, "new", name), os.path.join(folder, "new", name))
    log.warning("%s: refused %s (moved to %s/new/): %s", mailbox.address, name,
                COULD_NOT_PROCESS, why)


class UnsubscribeProcessor:
    """Passes over the unsubscribe mailboxes of an install root."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.spool = RotatingLog(root.log / "events" / SPOOL, max_bytes=spool.MAX_BYTES,
                                 keep=spool.NEVER_PRUNE)
        self.recorded = 0
        self.refused = 0

    def mailboxes(self) -> list[incoming.Mailbox]:
        tree = conf_file.load_root(self.root)
        return [b for b in incoming.mailboxes(str(self.root.path), tree)
                if b.kind == incoming.UNSUBSCRIBE]

    def run_once(self) -> int:
        """One pass over every unsubscribe mailbox: messages handled."""
        constants = secret_constants.read(self.root.control)
        server_id = tracker_settings.server_id(self.root)
        handled = 0
        for mailbox in self.mailboxes():
            try:
                names = sorted(os.listdir(os.path.join(mailbox.path, "new")))[:BATCH]
            except FileNotFoundError:
                continue
            for name in names:
                handled += self._one(mailbox, name, constants, server_id)
        return handled

    def _one(self, mailbox: incoming.Mailbox, name: str, constants: tuple[str, str],
             server_id: str) -> int:
        path = os.path.join(mailbox.path, "new", name)
        try:
            with open(path, "rb") as f:
                head = f.read(MAX_HEAD)
        except FileNotFoundError:
            return 0
        try:
            event = unsub_event(read_request(head), constants, server_id, time.time_ns())
        except RequestError as e:
            _refuse(mailbox, name, str(e))
            self.refused += 1
            return 1
        self.spool.write_bytes(spool.event_line(event))  # before the unlink: never lost
        os.unlink(path)
        self.recorded += 1
        log.info("%s: engine_unsub for %s (ListID %s, SendID %s)", mailbox.address,
                 event["email"], event["listid"], event["sendid"])
        return 1

    def close(self) -> None:
        self.spool.close()
