"""Event delivery destinations: the `event_delivery_destination` blocks of greenarrow.conf.

    event_delivery_destination primary {
        event_delivery_url "https://app.example.com/greenarrow-events"
        event_delivery_events all            # or: delivery_attempt bounce_all ...
        event_delivery_max_batch_size 100    # events per POST (a JSON array)
        event_delivery_timeout 30s           # per POST
        event_delivery_signing_secret "whsec_..."   # optional: Standard Webhooks headers
        event_delivery_new_destination leave_in_queue   # or drop_from_queue
    }

A destination has either a URL (HTTP POST of JSON arrays) or
`event_delivery_logfile PATH` (JSON lines in a rotating log folder). The
parser (greenarrow.lib.config.conf) checks the shape of each directive; `load`
checks the values and raises conf.ConfError naming the file and line.

Signing follows the Standard Webhooks form: `webhook-id`, `webhook-timestamp`
and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
with the secret's bytes (`whsec_` then base64).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from greenarrow.lib.config.conf import Block
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events.settings import ALL
from greenarrow.lib.events.types import EVENT_TYPES

BLOCK = "event_delivery_destination"
DEFAULT_MAX_BATCH_SIZE = 100
MAX_BATCH_SIZE_LIMIT = 10_000
DEFAULT_TIMEOUT = 30  # seconds per POST
LEAVE_IN_QUEUE = "leave_in_queue"
DROP_FROM_QUEUE = "drop_from_queue"
SECRET_PREFIX = "whsec_"
# Logfile destinations: the same sizes as the delivery logs' defaults.
LOGFILE_MAX_BYTES = 16 * 1024 * 1024
LOGFILE_KEEP = 20


@dataclass(frozen=True)
class Destination:
    """One destination as configured."""

    name: str
    url: str | None  # an http(s) URL, or None for a logfile destination
    logfile: Path | None  # a rotating log folder, or None for a URL destination
    event_types: tuple[str, ...] | None  # None: every type
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    timeout: int = DEFAULT_TIMEOUT
    signing_secret: bytes | None = None
    new_destination: str = LEAVE_IN_QUEUE

    def takes(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


def _url(block: Block) -> str | None:
    directive = block.directive("event_delivery_url")
    if directive is None:
        return None
    url = directive.as_str()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise directive.error(f"event_delivery_url: not a URL: {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise directive.error(f"event_delivery_url: expected an http:// or https:// URL "
                              f"with a host, got {url!r}")
    if any(c.isspace() for c in url):
        raise directive.error(f"event_delivery_url: a URL cannot contain spaces: {url!r}")
    return url


def _types(block: Block) -> tuple[str, ...] | None:
    directive = block.directive("event_delivery_events")
    if directive is None:
        raise block.error(f"{BLOCK} {block.args[0]}: event_delivery_events is required "
                          f"({ALL} or a list of event types)")
    names = [name.strip().rstrip(",") for name in directive.args]
    names = [name for name in names if name]
    if ALL in names:
        if len(names) > 1:
            raise directive.error(f"event_delivery_events: {ALL} cannot be listed with types")
        return None
    for name in names:
        if name not in EVENT_TYPES:
            raise directive.error(f"event_delivery_events: unknown event type {name!r}; "
                                  f"expected {ALL} or one of {', '.join(EVENT_TYPES)}")
    return tuple(dict.fromkeys(names))


def _secret(block: Block) -> bytes | None:
    directive = block.directive("event_delivery_signing_secret")
    if directive is None:
        return None
    text = directive.as_str()
    if not text.startswith(SECRET_PREFIX):
        raise directive.error(f"event_delivery_signing_secret: expected {SECRET_PREFIX} "
                              f"followed by base64 (Standard Webhooks form)")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise directive.error("event_delivery_signing_secret: the part after "
                              f"{SECRET_PREFIX} is not base64") from None
    if len(key) < 16:
        raise directive.error("event_delivery_signing_secret: the key must be at least "
                              "16 bytes (24 base64 characters)")
    return key


def destination_of(block: Block, root: Root | None = None) -> Destination:
    """The destination a block declares; ConfError naming the line of a bad value."""
    name = block.args[0]
    url = _url(block)
    logfile_directive = block.directive("event_delivery_logfile")
    logfile = None
    if logfile_directive is not None:
        text = logfile_directive.as_str()
        if not text:
            raise logfile_directive.error("event_delivery_logfile: empty path")
        logfile = Path(text)
        if not logfile.is_absolute() and root is not None:
            logfile = root.log / logfile
    if (url is None) == (logfile is None):
        raise block.error(f"{BLOCK} {name}: give exactly one of event_delivery_url and "
                          f"event_delivery_logfile")
    event_types = _types(block)
    size = block.get_int("event_delivery_max_batch_size", DEFAULT_MAX_BATCH_SIZE)
    if not 1 <= size <= MAX_BATCH_SIZE_LIMIT:
        directive = block.directive("event_delivery_max_batch_size")
        assert directive is not None
        raise directive.error(f"event_delivery_max_batch_size: expected 1 to "
                              f"{MAX_BATCH_SIZE_LIMIT}, got {size}")
    timeout = block.get_duration("event_delivery_timeout", DEFAULT_TIMEOUT)
    if timeout < 1:
        directive = block.directive("event_delivery_timeout")
        assert directive is not None
        raise directive.error("event_delivery_timeout: must be at least 1 second")
    secret = _secret(block)
    if secret is not None and url is None:
        raise block.error(f"{BLOCK} {name}: event_delivery_signing_secret applies to "
                          f"URL destinations only")
    new = block.get_str("event_delivery_new_destination", LEAVE_IN_QUEUE) or LEAVE_IN_QUEUE
    return Destination(name, url, logfile, event_types, size, timeout, secret, new)


def load(conf: Block, root: Root | None = None) -> list[Destination]:
    """Every destination of greenarrow.conf (ConfError on the first bad one).

    A relative `event_delivery_logfile` is under `root`'s `log/` folder.
    """
    names = dict.fromkeys(block.args[0].lower() for block in conf.blocks_named(BLOCK))
    found = []
    for name in names:
        merged = conf.block(BLOCK, name)  # a block written in pieces is one block
        assert merged is not None
        found.append(destination_of(merged, root))
    return found


def signature_headers(secret: bytes, message_id: str, timestamp: int,
                      body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one POST."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii"),
    }
