"""The encoded bounce address (Return-Path) of SimpleMH mail, and its decoder.

GreenArrow's documentation gives the shape of a bounce address
(`LocalPart-ListID-SendID-Recipient@BounceDomain`) but not its details, so
this project fixes them (docs/simplemh.md "Bounce
address"). For the mailbox `bounce@bounces.example.com`:

    full form   bounce-<listid>-<sendid>-<recipient>-1<tag>@bounces.example.com
    short form  bounce-<listid>-2<tag>@bounces.example.com

Fields are escaped so that the address is a valid dot-atom and survives a
receiver that lower-cases (or upper-cases) the local part, with the
original case recoverable: lower-case letters, digits, `_`, `+` and `.`
stand for themselves; every other byte (upper-case letters, `-`, `@`, `=`,
UTF-8 bytes, a second `.` in a row) is `=` and two lower-case hex digits.
So `Alice@Example.com` is `=41lice=40=45xample.com`. The mailbox's own
local part is kept as it is and may contain `-`: the decoder splits from the
right.

The last field is a version digit and an 8-character tag: 40 bits of
HMAC-SHA256 (key derived from the secret constants) over the version, the
mailbox local part lower-cased, the bounce domain lower-cased, the ListID,
the SendID and the recipient, in base32 (a-z, 2-7), so any change to the
address, its domain included, is detected. Versions (VERSIONS):
5 bounce (full), 6 bounce (short), 7 unsubscribe request (full, the mailto:
of List-Unsubscribe), 8 unsubscribe request (short). Versions 1 to 4 are
the same four made before the domain was signed: decode() still accepts
them (mail sent before an upgrade bounces for days), with `domain_bound`
False, so the caller may check their domain against its bounce domains.

When the full form would make the local part longer than 64 octets
(RFC 5321), the short form is used: it keeps the ListID (when it fits)
and a tag over the same fields as the full form. The bounced message
brings the rest: its X-Mailer-Info header (greenarrow.lib.simplemh.tracking_url,
kind `m`) carries the SendID and the recipient, and decode() verifies the
short form's tag against them, so neither part can be forged.
"""

from __future__ import annotations

import hmac

from greenarrow.lib.config import secret_constants
from greenarrow.lib.simplemh import tracking_url

MAX_LOCAL = 64
MAX_MAILBOX_LOCAL = 40  # leaves room for the short form: 40 + 1 + 0 + 1 + 9 <= 64
TAG_CHARS = 8
BOUNCE, BOUNCE_SHORT, UNSUBSCRIBE, UNSUBSCRIBE_SHORT = "5", "6", "7", "8"
# version digit: (short form, unsubscribe request, domain signed); encode() makes 5-8,
# decode() reads them all. A new format takes new digits and keeps these decoding.
VERSIONS = {
    "1": (False, False, False), "2": (True, False, False),
    "3": (False, True, False), "4": (True, True, False),
    "5": (False, False, True), "6": (True, False, True),
    "7": (False, True, True), "8": (True, True, True),
}
_FULL = tuple(v for v, (short, _, _) in VERSIONS.items() if not short)
_SHORT = tuple(v for v, (short, _, _) in VERSIONS.items() if short)

_LITERAL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_+.")
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_HEX = frozenset("0123456789abcdef")
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+/=?^_`{|}~-")
_LABEL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


class BounceAddressError(ValueError):
    """Not an encoded bounce address, or one that fails verification."""


def derive_key(constants: tuple[str, str]) -> bytes:
    """The HMAC key for bounce-address tags, separate from the tracking-data key."""
    return secret_constants.derive_key(constants, b"greenarrow simplemh bounce address v1")


_ESCAPES = {i: f"={i:02x}" for i in range(128) if chr(i) not in _LITERAL}


_escaped: dict[str, str] = {}  # escape() of recent fields: a message's ListID, SendID, recipients


def escape(text: str) -> str:
    """A field as it is written in the local part (see the module docstring)."""
    out = _escaped.get(text)
    if out is None:
        if len(_escaped) >= 4096:
            _escaped.clear()
        out = _escaped[text] = _escape(text)
    return out


def _escape(text: str) -> str:
    if text.isascii():
        out = text.translate(_ESCAPES)
        while ".." in out:  # a second dot in a row is escaped: the local part stays a dot-atom
            out = out.replace("..", ".=2e", 1)
        return out
    out = []
    prev = ""
    for c in text:
        if c in _LITERAL and not (c == "." and prev == "."):
            out.append(c)
            prev = c
        else:
            out.extend(f"={b:02x}" for b in c.encode("utf-8"))
            prev = "="
    return "".join(out)


def unescape(field: str) -> str:
    """The inverse of escape(), whatever the case of the letters it is given."""
    field = field.lower()
    if "=" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i]
        if c == "=":
            pair = field[i + 1 : i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                raise BounceAddressError(f"bad escape in {field!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(ord(c))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise BounceAddressError(f"bad escape in {field!r}") from None


_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> 2 characters


_signers: dict[bytes, object] = {}


def _signer(key: bytes) -> object:
    """The greenarrow.pyx.tracksign.Signer of a key (its HMAC states precomputed), cached."""
    signer = _signers.get(key)
    if signer is None:
        from greenarrow.pyx.tracksign import Signer

        signer = _signers[key] = Signer(key)
    return signer


def _digest(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256(key, msg)."""
    return (_signers.get(key) or _signer(key)).digest(msg)


def _domain_key(domain: str) -> str:
    """The bounce domain as signed: lower-cased, without a final dot."""
    return domain.lower().rstrip(".")


def _tag(key: bytes, version: str, box: str, domain: str | None, listid: str, sendid: str,
         recipient: str) -> str:
    """The tag; `domain` None for versions 1-4, which did not sign it."""
    fields = (version, box.lower(), listid, sendid, recipient) if domain is None else (
        version, box.lower(), _domain_key(domain), listid, sendid, recipient)
    msg = "\0".join(fields).encode("utf-8")
    n = int.from_bytes(_digest(key, msg)[:5], "big")
    pairs = _B32_PAIRS
    return pairs[n >> 30] + pairs[(n >> 20) & 1023] + pairs[(n >> 10) & 1023] + pairs[n & 1023]


def mailbox_problem(mailbox: str) -> str | None:
    """Why `mailbox` cannot be a bounce mailbox (`local@domain`), or None when it can.

    The local part must be a dot-atom of at most MAX_MAILBOX_LOCAL octets, so
    that the encoded address still fits in 64; the domain a host name.
    """
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        return "is not of the form local@domain"
    if len(local) > MAX_MAILBOX_LOCAL:
        return f"has a local part longer than {MAX_MAILBOX_LOCAL} characters"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "has a local part that is not a dot-atom"
    if not all(c in _ATEXT or c == "." for c in local):
        return "has characters not allowed in a local part"
    labels = domain.rstrip(".").split(".")
    if len(domain) > 253 or not all(
        label and len(label) <= 63 and _LABEL.issuperset(label)
        and not label.startswith("-") and not label.endswith("-")
        for label in labels
    ):
        return "has a domain that is not a host name"
    return None


_sends: dict[tuple, tuple] = {}  # what encode() computes once per mailbox, ListID and SendID


def _send(mailbox: str, listid: str, sendid: str, constants: tuple[str, str]) -> tuple:
    box, _, domain = mailbox.rpartition("@")
    lid = escape(listid)
    setup = (_signer(derive_key(constants)), box, domain, f"{box}-{lid}-{escape(sendid)}-",
             f"{box}-{lid}-",
             f"\0{box.lower()}\0{_domain_key(domain)}\0{listid}\0{sendid}\0".encode())
    if len(_sends) >= 1024:
        _sends.clear()
    _sends[mailbox, listid, sendid, constants] = setup
    return setup


def encode(mailbox: str, listid: str, sendid: str, recipient: str,
           constants: tuple[str, str], unsubscribe: bool = False) -> str:
    """The encoded address for one recipient: the full form, or the short one past 64 octets."""
    setup = _sends.get((mailbox, listid, sendid, constants))
    signer, box, domain, head, short_head, tag_fields = setup or _send(mailbox, listid, sendid,
                                                                       constants)
    head = f"{head}{escape(recipient)}-"
    # the tag: as _tag(), with the fields after the version packed once per send
    full = len(head) + 1 + TAG_CHARS <= MAX_LOCAL
    version = (UNSUBSCRIBE if unsubscribe else BOUNCE) if full else (
        UNSUBSCRIBE_SHORT if unsubscribe else BOUNCE_SHORT)
    n = int.from_bytes(signer.digest(version.encode("ascii") + tag_fields
                                     + recipient.encode("utf-8"))[:5], "big")
    pairs = _B32_PAIRS
    tag = pairs[n >> 30] + pairs[(n >> 20) & 1023] + pairs[(n >> 10) & 1023] + pairs[n & 1023]
    if full:
        return f"{head}{version}{tag}@{domain}"
    local = f"{short_head}{version}{tag}"
    if len(local) > MAX_LOCAL:
        local = f"{box}--{version}{tag}"
    return f"{local}@{domain}"


def is_full(address: str) -> bool:
    """Whether encode() gave the full form (it decodes without the bounced message)."""
    local = address.rpartition("@")[0]
    last = local.rpartition("-")[2]
    return last[:1] in _FULL


class BounceAddress:
    """A verified bounce address: what the bounce processor records the bounce against.

    `domain_bound`: the tag covers the domain (versions 5-8); False for an
    address of versions 1-4, whose domain anyone could have changed.
    """

    __slots__ = ("mailbox", "listid", "sendid", "recipient", "short", "unsubscribe",
                 "mailclass", "instanceid", "click_tracking_id", "version", "domain_bound")

    def __init__(self, mailbox: str, listid: str, sendid: str, recipient: str, short: bool,
                 unsubscribe: bool, extra: tuple[str, str, str] = ("", "", ""),
                 version: str = BOUNCE) -> None:
        self.mailbox = mailbox
        self.listid = listid
        self.sendid = sendid
        self.recipient = recipient
        self.short = short
        self.unsubscribe = unsubscribe
        self.mailclass, self.instanceid, self.click_tracking_id = extra
        self.version = version
        self.domain_bound = VERSIONS[version][2]

    def __repr__(self) -> str:
        return (f"BounceAddress(mailbox={self.mailbox!r}, listid={self.listid!r}, "
                f"sendid={self.sendid!r}, recipient={self.recipient!r}, short={self.short})")


def decode(address: str | bytes, constants: tuple[str, str],
           mailer_info: str | bytes | None = None) -> BounceAddress:
    """Verify and unpack an encoded address (the RCPT TO of a bounce the engine receives).

    `mailer_info` is the X-Mailer-Info value found in the returned message
    (or the DATA from the subject of an unsubscribe request): the short form
    needs it, the full form ignores it. Raises BounceAddressError, and only
    that, for any address or mailer_info that was not made with these secret
    constants (as text or bytes). Versions 1-4 decode too (see the module
    docstring): check `domain_bound`.
    """
    if isinstance(address, (bytes, bytearray)):
        address = bytes(address).decode("latin-1")  # not ASCII: refused below
    if isinstance(mailer_info, (bytes, bytearray)):
        mailer_info = bytes(mailer_info).decode("latin-1")
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        raise BounceAddressError(f"not an encoded bounce address: {address!r}")
    low = local.lower()
    last = low.rpartition("-")[2]
    version, tag = last[:1], last[1:]
    if len(tag) != TAG_CHARS or version not in VERSIONS:
        raise BounceAddressError(f"not an encoded bounce address: {address!r}")
    key = derive_key(constants)
    short, unsubscribe, domain_bound = VERSIONS[version]
    extra = ("", "", "")
    if not short:
        parts = low.rsplit("-", 4)
        if len(parts) != 5 or not parts[0]:
            raise BounceAddressError(f"malformed bounce address: {address!r}")
        box = local[: len(parts[0])]
        listid, sendid, recipient = (unescape(p) for p in parts[1:4])
    else:
        parts = low.rsplit("-", 2)
        if len(parts) != 3 or not parts[0]:
            raise BounceAddressError(f"malformed bounce address: {address!r}")
        box = local[: len(parts[0])]
        if mailer_info is None:
            raise BounceAddressError("short bounce address: the X-Mailer-Info of the returned "
                                     "message is needed to decode it")
        try:
            info = tracking_url.decode(
                "".join(mailer_info.split()), constants,
                kinds={tracking_url.MAILER_INFO, tracking_url.LIST_UNSUBSCRIBE})
        except tracking_url.TrackingDataError as e:
            raise BounceAddressError(f"X-Mailer-Info: {e}") from None
        listid = unescape(parts[1]) if parts[1] else info.listid
        if listid != info.listid:
            raise BounceAddressError("bounce address and X-Mailer-Info disagree on the ListID")
        sendid, recipient = info.sendid, info.recipient
        extra = (info.mailclass, info.instanceid, info.click_tracking_id)
    expected = _tag(key, version, box, domain if domain_bound else None, listid, sendid,
                    recipient)
    if not hmac.compare_digest(tag, expected):
        raise BounceAddressError(f"bounce address failed verification: {address!r}")
    return BounceAddress(f"{box}@{domain}", listid, sendid, recipient, short, unsubscribe,
                         extra, version)
