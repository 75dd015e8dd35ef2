"""The tracker's answer to one HTTP request, and the event it records: pure functions.

The kind inside the signed DATA decides what a request is, never the path
(docs/tracker.md):

    kind c  click               GET/POST: engine_click, 302 to the target
    kind u  ##unsubscribetag##  GET/POST: engine_unsub, 302 to the target
                                 + email, sendid, listid
    kind o  open pixel          GET/POST: engine_open, 1x1 GIF, no-cache
    kind l  List-Unsubscribe    GET: confirmation page; POST with
                                 List-Unsubscribe=One-Click: engine_unsub, 200

HEAD gets the same status and headers and records nothing. Anything that
does not verify (tampered, truncated, other secret constants, unknown
kind, no DATA) is a plain 404 that records nothing and redirects nowhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

from greenarrow.lib.events.types import make_event
from greenarrow.lib.simplemh import tracking_url
from greenarrow.lib.tracker import pages, privacy_open
from greenarrow.lib.tracker.settings import TrackerSettings

METHODS = ("GET", "HEAD", "POST")

_NO_CACHE = [("Cache-Control", "no-cache, no-store, must-revalidate, max-age=0"),
             ("Pragma", "no-cache"), ("Expires", "Thu, 01 Jan 1970 00:00:00 GMT")]
_TEXT = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"),
         ("X-Content-Type-Options", "nosniff")]
_HTML = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
         ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
         ("Referrer-Policy", "no-referrer")]
_GIF = [("Content-Type", "image/gif"), *_NO_CACHE]
_REDIRECT = [("Cache-Control", "no-cache, no-store"), ("Referrer-Policy", "no-referrer")]

_SPACE_OR_CONTROL = re.compile(rb"[\x00-\x20\x7f]")
_MULTIPART_ONE_CLICK = re.compile(
    rb'name="?List-Unsubscribe"?\s*\r?\n(?:[^\r\n]+\r?\n)*\r?\n\s*One-Click\s*(?:\r?\n|$)',
    re.IGNORECASE)


@dataclass(slots=True)
class Request:
    """What the tracker uses of one HTTP request."""

    method: str
    target: str  # the request target: path and query string
    client_ip: str
    user_agent: str = ""
    content_type: str = ""
    body: bytes = b""


@dataclass(slots=True)
class Reply:
    """The answer, and the event to record before sending it (None: nothing to record)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    event: dict[str, Any] | None = None
    head_only: bool = field(default=False)


def not_found(head_only: bool = False) -> Reply:
    return Reply(404, _TEXT, pages.NOT_FOUND, None, head_only)


def method_not_allowed() -> Reply:
    return Reply(405, [*_TEXT, ("Allow", ", ".join(METHODS))], pages.METHOD_NOT_ALLOWED)


def unavailable(head_only: bool = False) -> Reply:
    """The answer when the event could not be written: nothing answered goes unrecorded."""
    return Reply(503, [*_TEXT, ("Retry-After", "60")], pages.UNAVAILABLE, None, head_only)


def answer(request: Request, settings: TrackerSettings, now_ns: int, serial: str) -> Reply:
    """The reply to `request` at time `now_ns`; `serial` makes each recorded click or open distinct.

    `serial` is unique within the tracker's life (process id and a counter,
    say); with the time it keys the event_unique_id of clicks and opens,
    while an unsubscribe is keyed by the message's DATA alone, so a repeated
    one is one event.
    """
    method = request.method
    if method not in METHODS:
        return method_not_allowed()
    head = method == "HEAD"
    try:
        _path, data = tracking_url.data_from_url(request.target)
        found = tracking_url.decode(data, settings.constants)
    except ValueError:  # TrackingDataError is one: no DATA, or DATA that does not verify
        return not_found(head)
    kind = found.kind
    if kind == tracking_url.OPEN:
        event = None if head else _open_event(found, request, settings, now_ns, data, serial)
        return Reply(200, _GIF, pages.PIXEL_GIF, event, head)
    if kind == tracking_url.CLICK or kind == tracking_url.UNSUBSCRIBE:
        target = target_url(found)
        if not _redirectable(target):
            return not_found(head)
        if kind == tracking_url.UNSUBSCRIBE:
            location = with_recipient(target, found.recipient, found.sendid, found.listid)
            event = None if head else unsub_event(found, settings.server_id, now_ns, data, target)
        else:
            location = target
            event = None if head else _click_event(found, request, settings, now_ns, data,
                                                   serial, target)
        return Reply(302, [("Location", location), *_REDIRECT], b"", event, head)
    if kind == tracking_url.LIST_UNSUBSCRIBE:
        if method == "POST" and is_one_click(request.content_type, request.body):
            return Reply(200, _HTML, pages.DONE_PAGE,
                         unsub_event(found, settings.server_id, now_ns, data, ""))
        return Reply(200, _HTML, pages.CONFIRM_PAGE, None, head)
    return not_found(head)  # X-Mailer-Info DATA is no URL


def target_url(found: tracking_url.TrackingData) -> str:
    """`found.url`, without its per-byte loop when the target is plain printable ASCII (most are)."""
    raw = found.url_bytes
    if raw.isascii() and _SPACE_OR_CONTROL.search(raw) is None:
        return raw.decode("ascii")
    return found.url


def _redirectable(url: str) -> bool:
    return url[:8].lower() == "https://" or url[:7].lower() == "http://"


def with_recipient(url: str, email: str, sendid: str, listid: str) -> str:
    """`url` with `email`, `sendid` and `listid` appended to its query, as GreenArrow does.

    The fragment stays at the end; an existing query keeps its parameters.
    """
    base, hashmark, fragment = url.partition("#")
    if "?" not in base:
        base += "?"
    elif not base.endswith(("?", "&")):
        base += "&"
    query = (f"email={quote(email, safe='')}&sendid={quote(sendid, safe='')}"
             f"&listid={quote(listid, safe='')}")
    return base + query + hashmark + fragment


def is_one_click(content_type: str, body: bytes) -> bool:
    """True for an RFC 8058 one-click body: `List-Unsubscribe=One-Click`, urlencoded or multipart."""
    if content_type[:19].lower() == "multipart/form-data":
        return _MULTIPART_ONE_CLICK.search(body) is not None
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return False
    return ("List-Unsubscribe", "One-Click") in pairs


def _key(data: str, *parts: object) -> str:
    return "\0".join((data, *map(str, parts)))


def _click_event(found: tracking_url.TrackingData, request: Request,
                 settings: TrackerSettings, now_ns: int, data: str, serial: str,
                 target: str) -> dict[str, Any]:
    return make_event(
        "engine_click", now_ns // 1_000_000_000, settings.server_id,
        _key(data, "click", now_ns, serial),
        email=found.recipient, listid=found.listid, sendid=found.sendid,
        click_url=target, click_tracking_id=found.click_tracking_id,
        engine_ip=request.client_ip,
        user_agent=request.user_agent if settings.include_user_agent else None,
        linkid=found.linkid, mailclass=found.mailclass, instanceid=found.instanceid)


def _open_event(found: tracking_url.TrackingData, request: Request,
                settings: TrackerSettings, now_ns: int, data: str,
                serial: str) -> dict[str, Any]:
    return make_event(
        "engine_open", now_ns // 1_000_000_000, settings.server_id,
        _key(data, "open", now_ns, serial),
        email=found.recipient, listid=found.listid, sendid=found.sendid,
        click_tracking_id=found.click_tracking_id, engine_ip=request.client_ip,
        user_agent=request.user_agent if settings.include_user_agent else None,
        is_privacy_open=privacy_open.is_privacy_open(settings.ranges, request.client_ip,
                                                     request.user_agent),
        mailclass=found.mailclass, instanceid=found.instanceid)


def unsub_event(found: tracking_url.TrackingData, server_id: str, now_ns: int,
                data: str, click_url: str) -> dict[str, Any]:
    """`engine_unsub` for DATA: its id is made from DATA alone, so every repeat (and a
    mailto: request carrying the same DATA, tracker.unsubscribe_mailbox) is one event."""
    return make_event(
        "engine_unsub", now_ns // 1_000_000_000, server_id, _key(data, "unsub"),
        email=found.recipient, listid=found.listid, sendid=found.sendid,
        click_url=click_url, click_tracking_id=found.click_tracking_id,
        mailclass=found.mailclass, instanceid=found.instanceid)
