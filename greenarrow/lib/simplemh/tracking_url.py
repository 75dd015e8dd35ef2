"""Click, open and unsubscribe tracking URLs, and the signed DATA they carry.

GreenArrow does not publish its tracking-URL format, so this project fixes
one (docs/simplemh.md "Tracking URLs"):

    format a   BASE/click/DATA
    format b   BASE/click?DATA          (the default)
    format c   BASE/click?qs=DATA

`BASE` is the URL domain (`https://links.example.com`, maybe with a path).
The path is `click` for links (and `##unsubscribetag##` links), `open` for
the open pixel and `unsub` for the List-Unsubscribe URL; the tracker
trusts only the kind inside DATA, never the path.

DATA is the unpadded base64url encoding (`A-Z a-z 0-9 - _`) of

    version (1 byte, 1) | kind (1 byte) | flags (1 byte)
    | recipient NUL listid NUL sendid NUL mailclass NUL instanceid
      NUL click_tracking_id NUL target URL
    | tag (10 bytes)

kind: `c` click, `u` unsubscribe link, `o` open, `l` List-Unsubscribe,
`m` X-Mailer-Info. flags: 1 = stateless metadata storage, 2 = the link was
in a text/plain part. The tag is the first 80 bits of HMAC-SHA256 over
everything before it, keyed with a key derived from the two secret
constants, so every server of a fleet verifies what any other
made, and a changed or truncated DATA fails verification: decode() raises
TrackingDataError and never returns a URL.

DATA is self-contained in every metadata storage mode: no database holds
tracking metadata yet, so "local" and "external" differ from "stateless"
only by the flag, which tells an event server the sending server also
recorded the message.
"""

from __future__ import annotations

import binascii
import hmac

from greenarrow.lib.config import secret_constants

VERSION = 1
TAG_BYTES = 10
FORMATS = ("a", "b", "c")
DEFAULT_FORMAT = "b"

CLICK, UNSUBSCRIBE, OPEN, LIST_UNSUBSCRIBE, MAILER_INFO = "c", "u", "o", "l", "m"
KINDS = frozenset((CLICK, UNSUBSCRIBE, OPEN, LIST_UNSUBSCRIBE, MAILER_INFO))
PATHS = {CLICK: "click", UNSUBSCRIBE: "click", OPEN: "open", LIST_UNSUBSCRIBE: "unsub"}

FLAG_STATELESS = 1
FLAG_TEXT = 2

_FIELDS = 7  # recipient, listid, sendid, mailclass, instanceid, click_tracking_id, url
_B64_TO_URL = bytes.maketrans(b"+/", b"-_")
_URL_TO_B64 = bytes.maketrans(b"-_", b"+/")
_DATA_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class TrackingDataError(ValueError):
    """DATA that is malformed, truncated, forged or of an unexpected kind."""


def derive_key(constants: tuple[str, str]) -> bytes:
    """The HMAC key for DATA, derived from the secret constants (secret_constants.derive_key)."""
    return secret_constants.derive_key(constants, b"greenarrow simplemh tracking data v1")


def b64url(data: bytes) -> bytes:
    """Unpadded base64url: safe in a path, a query string and a header."""
    return binascii.b2a_base64(data, newline=False).translate(_B64_TO_URL).rstrip(b"=")


def _field(value: str, name: str) -> bytes:
    raw = value.encode("utf-8")
    if b"\0" in raw:
        raise ValueError(f"{name} may not contain NUL")
    return raw


class TrackingData:
    """What a DATA carries; `url` is the target as a URL string."""

    __slots__ = ("kind", "stateless", "text", "recipient", "listid", "sendid", "mailclass",
                 "instanceid", "click_tracking_id", "url_bytes")

    def __init__(self, kind: str, stateless: bool, text: bool, fields: list[str],
                 url_bytes: bytes) -> None:
        self.kind = kind
        self.stateless = stateless
        self.text = text
        (self.recipient, self.listid, self.sendid, self.mailclass, self.instanceid,
         self.click_tracking_id) = fields
        self.url_bytes = url_bytes

    @property
    def url(self) -> str:
        """The target URL; bytes outside printable ASCII are %-escaped, so it is safe to redirect to."""
        return "".join(chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in self.url_bytes)

    def __repr__(self) -> str:
        return (f"TrackingData(kind={self.kind!r}, recipient={self.recipient!r}, "
                f"sendid={self.sendid!r}, url={self.url!r})")


def pack_fields(values: tuple[str, ...], names: tuple[str, ...]) -> bytes:
    """The fields as DATA carries them: each UTF-8 encoded and followed by NUL.

    ValueError naming the field when one holds a NUL.
    """
    joined = "\0".join(values)
    if joined.count("\0") != len(values) - 1:
        for value, name in zip(values, names, strict=True):
            _field(value, name)
    return joined.encode("utf-8") + b"\0"


def _payload(kind: str, flags: int, fields: tuple[str, ...], url: bytes) -> bytes:
    parts = [_field(v, n) for v, n in zip(fields, ("recipient", "listid", "sendid", "mailclass",
                                                    "instanceid", "click_tracking_id"),
                                           strict=True)]
    if b"\0" in url:
        raise ValueError("url may not contain NUL")
    parts.append(url)
    return bytes((VERSION, ord(kind), flags)) + b"\0".join(parts)


def encode(constants: tuple[str, str], kind: str, recipient: str, listid: str = "",
           sendid: str = "", mailclass: str = "", instanceid: str = "",
           click_tracking_id: str = "", url: bytes | str = b"", stateless: bool = False,
           text: bool = False) -> str:
    """DATA for one link (or pixel, List-Unsubscribe URL, X-Mailer-Info)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if isinstance(url, str):
        url = url.encode("utf-8")
    flags = (FLAG_STATELESS if stateless else 0) | (FLAG_TEXT if text else 0)
    payload = _payload(kind, flags, (recipient, listid, sendid, mailclass, instanceid,
                                     click_tracking_id), url)
    tag = hmac.digest(derive_key(constants), payload, "sha256")[:TAG_BYTES]
    return b64url(payload + tag).decode("ascii")


def decode(data: str | bytes, constants: tuple[str, str],
           kinds: frozenset[str] | set[str] | None = None) -> TrackingData:
    """Verify and unpack DATA; TrackingDataError for anything not made with these constants.

    `kinds` limits the kinds accepted (the tracker's click handler accepts
    only click and unsubscribe DATA, say).
    """
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    if not raw or not _DATA_CHARS.issuperset(raw):
        raise TrackingDataError("not tracking data: characters outside base64url")
    if len(raw) % 4 == 1:
        raise TrackingDataError("truncated tracking data")
    try:
        blob = binascii.a2b_base64(raw.translate(_URL_TO_B64) + b"=" * (-len(raw) % 4))
    except binascii.Error:
        raise TrackingDataError("truncated tracking data") from None
    if len(blob) < 3 + _FIELDS - 1 + TAG_BYTES or b64url(blob) != raw:
        # too short, or a non-canonical encoding (changed padding bits)
        raise TrackingDataError("truncated or altered tracking data")
    payload, tag = blob[:-TAG_BYTES], blob[-TAG_BYTES:]
    expected = hmac.digest(derive_key(constants), payload, "sha256")[:TAG_BYTES]
    if not hmac.compare_digest(tag, expected):
        raise TrackingDataError("tracking data failed verification (tampered, truncated or "
                                "made with other secret constants)")
    if payload[0] != VERSION:
        raise TrackingDataError(f"unknown tracking data version {payload[0]}")
    kind = chr(payload[1])
    if kind not in KINDS or (kinds is not None and kind not in kinds):
        raise TrackingDataError(f"tracking data of kind {kind!r} not accepted here")
    flags = payload[2]
    parts = payload[3:].split(b"\0", _FIELDS - 1)
    if len(parts) != _FIELDS:
        raise TrackingDataError("malformed tracking data")
    try:
        fields = [p.decode("utf-8") for p in parts[:-1]]
    except UnicodeDecodeError:
        raise TrackingDataError("malformed tracking data") from None
    return TrackingData(kind, bool(flags & FLAG_STATELESS), bool(flags & FLAG_TEXT), fields,
                        parts[-1])


def tracking_url(base: str, fmt: str, kind: str, data: str) -> str:
    """The URL for DATA under `base` in tracker format a, b or c."""
    path = PATHS[kind]
    if fmt == "a":
        return f"{base}/{path}/{data}"
    if fmt == "b":
        return f"{base}/{path}?{data}"
    if fmt == "c":
        return f"{base}/{path}?qs={data}"
    raise ValueError(f"unknown tracker format {fmt!r}: expected a, b or c")


def data_from_url(url: str) -> tuple[str, str]:
    """(path name, DATA) from a tracking URL or request target in any of the three formats.

    `https://x/click?DATA`, `/click/DATA`, `/click?qs=DATA&utm=...` all
    work; ValueError when there is no DATA to be found.
    """
    rest = url
    if "://" in rest:
        rest = rest.split("://", 1)[1]
        slash = rest.find("/")
        rest = rest[slash:] if slash >= 0 else "/"
    path, _, query = rest.partition("?")
    path = path.rstrip("/")
    if query:
        for item in query.split("&"):
            if item.startswith("qs="):
                return path.rpartition("/")[2], item[3:]
        first = query.split("&", 1)[0]
        if first and "=" not in first:
            return path.rpartition("/")[2], first
    head, _, last = path.rpartition("/")
    if head and last:
        return head.rpartition("/")[2], last
    raise ValueError(f"no tracking data in {url!r}")


_signers: dict[bytes, object] = {}
SEPARATORS = {"a": "/", "b": "?", "c": "?qs="}  # between BASE/path and DATA, per format


def signer(constants: tuple[str, str]) -> object:
    """The greenarrow.pyx.tracksign.Signer for DATA made with these constants (cached)."""
    key = derive_key(constants)
    found = _signers.get(key)
    if found is None:
        from greenarrow.pyx.tracksign import Signer

        found = _signers[key] = Signer(key)
    return found


class Encoder:
    """Makes the tracking URLs of one message for one recipient, fast.

    The fields common to every link are packed once, and signing is done
    by greenarrow.pyx.tracksign (HMAC-SHA256 in C, with the state after
    those common fields kept), so each link costs a few SHA-256 blocks and
    a base64url encoding. The result is exactly encode()'s. URLs are
    returned as ASCII bytes, ready to splice into the message.
    """

    __slots__ = ("_signer", "_fields", "_state", "_prefixes", "_bases")

    def __init__(self, constants: tuple[str, str], base: str, fmt: str, recipient: str,
                 listid: str, sendid: str, mailclass: str, instanceid: str,
                 click_tracking_id: str, stateless: bool) -> None:
        self._signer = signer(constants)
        self._fields = _payload(CLICK, 0, (recipient, listid, sendid, mailclass, instanceid,
                                           click_tracking_id), b"")[3:]
        self._state = FLAG_STATELESS if stateless else 0
        self._prefixes: dict[tuple[str, bool], bytes] = {}
        sep = SEPARATORS[fmt]
        self._bases = {kind: f"{base}/{path}{sep}".encode("ascii") for kind, path in PATHS.items()}
        self._bases[MAILER_INFO] = b""

    def _prefix(self, kind: str, text: bool) -> bytes:
        flags = self._state | (FLAG_TEXT if text else 0)
        prefix = self._prefixes[kind, text] = bytes((VERSION, ord(kind), flags)) + self._fields
        return prefix

    def data(self, kind: str, url: bytes = b"", text: bool = False) -> bytes:
        """DATA (base64url bytes) for one target."""
        prefix = self._prefixes.get((kind, text)) or self._prefix(kind, text)
        return self._signer.data(prefix, url, TAG_BYTES)

    def url(self, kind: str, url: bytes = b"", text: bool = False) -> bytes:
        """The tracking URL for `url` (empty for the open pixel and List-Unsubscribe)."""
        prefix = self._prefixes.get((kind, text)) or self._prefix(kind, text)
        return self._signer.url(self._bases[kind], prefix, url, TAG_BYTES)

    def replacements(self, kinds: list[str], targets: list[bytes], text: bool,
                     pixel_open: bytes, pixel_close: bytes) -> list[bytes]:
        """The tracking URLs (or open pixel) for a part's slots, in one C loop.

        kinds: "c" click, "u" unsubscribe link, "p" the open pixel
        (pixel_open + open URL + pixel_close), "s" the target as it is,
        anything else nothing.
        """
        prefixes = self._prefixes
        by_kind = {k: prefixes.get((k, text)) or self._prefix(k, text)
                   for k in (CLICK, UNSUBSCRIBE, OPEN)}
        return self._signer.replacements(kinds, targets, by_kind, self._bases, pixel_open,
                                         pixel_close)
