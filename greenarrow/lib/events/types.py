"""The event types and their fields: the one owner of both (GreenArrow's "Types of Events"; docs/events.md).

Every producer (the delivery-attempt recorder, the bounce and complaint
processors, the tracker) builds its events with `make_event`, and the event
processor delivers them as they were built, so the fields of a type are
written here and nowhere else. Field order is GreenArrow's.

`event_unique_id` is deterministic: SHA-256 (hex, 64 characters) of the
server id, the event type and a key naming the event's source (the delivery
log line, the bounce message's file, the tracking request...). A source read
twice, after a crash or a replay, gives the same id, and the events table's
unique constraint keeps one row.
"""

from __future__ import annotations

import hashlib
from typing import Any

# Fields every event carries; `make_event` fills the first four.
COMMON: tuple[str, ...] = ("event_type", "event_time", "server_id", "event_unique_id")

_IDENTITY = ("email", "listid", "sendid")
_SIMPLEMH = ("mailclass", "instanceid")

FIELDS: dict[str, tuple[str, ...]] = {
    "bounce_all": (*COMMON, *_IDENTITY, "bounce_type", "bounce_code", "bounce_text",
                   "click_tracking_id", "synchronous", *_SIMPLEMH),
    "bounce_bad_address": (*COMMON, *_IDENTITY, "bounce_type", "bounce_code", "bounce_text",
                           "click_tracking_id", *_SIMPLEMH),
    # `id` of the Lite events is the events table's row id, set when delivered.
    "bounce_lite": (*COMMON, "id", "bounce_code", "bounce_code_match_text", "synchronous",
                    "report_recipient", "report_message_text"),
    "scomp": (*COMMON, *_IDENTITY, "click_tracking_id", *_SIMPLEMH),
    "scomp_lite": (*COMMON, "id", "email", "user_agent", "headers", "report_recipient",
                   "report_message_text", "report_sender"),
    "engine_click": (*COMMON, *_IDENTITY, "click_url", "click_tracking_id", "engine_ip",
                     "user_agent", "linkid", *_SIMPLEMH),
    "engine_open": (*COMMON, *_IDENTITY, "click_tracking_id", "engine_ip", "user_agent",
                    "is_privacy_open", *_SIMPLEMH),
    "engine_unsub": (*COMMON, *_IDENTITY, "click_url", "click_tracking_id", *_SIMPLEMH),
    "delivery_attempt": (*COMMON, *_IDENTITY, "click_tracking_id", "timestamp", "channel",
                         "status", "is_retry", "msguid", "sender", "mtaid", "mtaid_id",
                         "mtaid_name", "injected_time", "message", "outmtaid", "outmtaid_ip",
                         "outmtaid_hostname", "outmtaid_name", "sendsliceid", "throttleid",
                         "mx_hostname", "mx_ip", "from_address", "headers", "message_size",
                         "smtp_timing", "bounce_code", "source_ip", *_SIMPLEMH),
}

EVENT_TYPES: tuple[str, ...] = tuple(FIELDS)


class EventError(ValueError):
    """An event that does not match its type's fields."""


def event_unique_id(server_id: str, event_type: str, source_key: str | bytes) -> str:
    """The 64-character id of the event of `event_type` that `source_key` produced."""
    if isinstance(source_key, str):
        source_key = source_key.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256()
    for part in (server_id.encode("utf-8"), event_type.encode("ascii")):
        digest.update(len(part).to_bytes(4, "big"))  # length-prefixed: no ambiguous joins
        digest.update(part)
    digest.update(source_key)
    return digest.hexdigest()


def make_event(event_type: str, event_time: int, server_id: str, source_key: str | bytes,
               **fields: Any) -> dict[str, Any]:
    """One event as delivered: every field of its type, in GreenArrow's order.

    Fields not given are None (JSON null); a field the type does not have is
    an error, so a misspelt name cannot slip through to the application.
    """
    names = FIELDS.get(event_type)
    if names is None:
        raise EventError(f"unknown event type {event_type!r}")
    unknown = set(fields) - set(names)
    if unknown:
        raise EventError(f"{event_type} has no field {', '.join(sorted(unknown))}")
    event: dict[str, Any] = dict.fromkeys(names)
    event.update(fields)
    event["event_type"] = event_type
    event["event_time"] = int(event_time)
    event["server_id"] = server_id
    event["event_unique_id"] = event_unique_id(server_id, event_type, source_key)
    return event
