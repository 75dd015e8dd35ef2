"""The delivery_attempt event of one processed delivery log line.

The log (greenarrow.lib.delivery_log) keeps every value as text; the event
gives seed 003's types: `timestamp` a float, the ids, times and codes
integers (None when the column is blank), the rest strings as logged. The
fields the log does not carry (`from_address`, `headers`, `message_size`,
`smtp_timing`, `source_ip`) are None.
"""

from __future__ import annotations

import math
from typing import Any

from greenarrow.lib.delivery_log import FIELDS as LOG_FIELDS
from greenarrow.lib.delivery_log import parse_line
from greenarrow.lib.events.types import make_event

EVENT_TYPE = "delivery_attempt"
INTEGER_FIELDS = frozenset(
    {"is_retry", "mtaid_id", "injected_time", "outmtaid", "throttleid", "bounce_code"}
)


def _integer(text: str) -> int | None:
    if text.isascii() and text.isdigit():  # the usual case, without raising for blanks
        return int(text)
    try:
        return int(text)  # a sign, spaces
    except ValueError:
        return None


def event_of_line(raw: bytes, server_id: str) -> dict[str, Any]:
    """The event of the raw log line `raw` (its id comes from these bytes).

    Raises ValueError for a line that is not a delivery log line.
    """
    record = parse_line(raw.decode("utf-8", "replace"))
    fields: dict[str, Any] = {}
    for name in LOG_FIELDS:
        text = record[name]
        if name in INTEGER_FIELDS:
            fields[name] = _integer(text)
        elif name == "timestamp":
            fields[name] = float(text)
            if not math.isfinite(fields[name]):
                raise ValueError(f"delivery log line has a bad timestamp {text!r}")
        else:
            fields[name] = text
    return make_event(EVENT_TYPE, int(fields["timestamp"]), server_id, raw, **fields)
