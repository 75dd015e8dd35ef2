"""Header-block operations on a message as bytes, without building a tree.

Every byte that is not a header we read, add or strip stays as it was:
folding, order, case and the body are untouched. Messages handled here have
CRLF line endings (`to_crlf` makes them so).

Command-line injection imports this module: it imports nothing heavy.
"""

from __future__ import annotations

import time

CRLF = b"\r\n"


def to_crlf(data: bytes) -> bytes:
    """Every line ending (LF, CRLF or lone CR) as CRLF."""
    crlf = data.count(b"\r\n")
    if crlf == data.count(b"\n") == data.count(b"\r") and data.endswith(b"\r\n"):
        return data  # already so (what SMTP delivers): counting is cheaper than copying
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = data.replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class Header:
    """One header field: its name and the bytes span [start, end) it occupies."""

    __slots__ = ("name", "start", "end", "colon")

    def __init__(self, name: bytes, start: int, end: int, colon: int) -> None:
        self.name = name
        self.start = start
        self.end = end
        self.colon = colon


def split_headers(msg: bytes) -> tuple[list[Header], int]:
    """The header fields of a CRLF message and the offset where the body starts.

    The header block ends at the first empty line; a line that is neither a
    field nor a continuation (no colon) also ends it, as in RFC 5322 parsers
    that are forgiving of broken mail.
    """
    headers: list[Header] = []
    pos = 0
    n = len(msg)
    while pos < n:
        eol = msg.find(CRLF, pos)
        if eol < 0:
            eol = n
        if eol == pos:  # the empty line
            return headers, eol + 2
        first = msg[pos]
        if first in (0x20, 0x09) and headers:  # continuation line
            headers[-1].end = min(eol + 2, n)
            pos = eol + 2
            continue
        colon = msg.find(b":", pos, eol)
        if colon <= pos:
            return headers, pos  # not a header field: the body starts here
        name = msg[pos:colon].rstrip(b" \t")
        if b" " in name or b"\t" in name:
            return headers, pos
        headers.append(Header(name.lower(), pos, eol + 2 if eol < n else n, colon))
        pos = eol + 2
    return headers, n


class HeaderValueError(ValueError):
    """A value for a header the engine writes holds CR, LF or NUL."""


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot go into a header the engine writes, or None when it can.

    A CR or LF would end the header line early and start another, and at a
    receiver that takes a bare CR or LF for a line end, `CR . CR` ends the
    DATA and smuggles in a second message (CVE-2023-51764); NUL is cut or
    mishandled by many receivers.
    """
    if "\r" in value or "\n" in value or "\0" in value:
        return "contains a line break (CR or LF) or NUL"
    return None


def header_field(name: str, *parts: str) -> bytes:
    """One header field the engine writes: `Name: part1 CRLF TAB part2 ... CRLF`.

    Every header the engine adds (Received, From, Message-ID, Date) is made
    here, so none of them can carry a value with CR, LF or NUL:
    HeaderValueError names the header. Parts after the first are folded onto
    continuation lines. ASCII (a character outside it becomes `?`; callers
    encode text first, as RFC 2047 words for a display name).
    """
    for part in parts:
        if "\r" in part or "\n" in part or "\0" in part:
            raise HeaderValueError(f"{name} header: {part!r} {header_value_problem(part)}")
    value = "\r\n\t".join(parts)
    return f"{name}: {value}\r\n".encode("ascii", "replace")


def header_value(msg: bytes, header: Header) -> str:
    """The unfolded value of a header, stripped, decoded as Latin-1 (lossless)."""
    raw = msg[header.colon + 1 : header.end]
    return raw.replace(b"\r\n", b"").strip().decode("latin-1")


def find(headers: list[Header], name: bytes) -> Header | None:
    for h in headers:
        if h.name == name:
            return h
    return None


def rebuild(
    msg: bytes, headers: list[Header], drop: set[int], prepend: bytes = b"", append: bytes = b""
) -> bytes:
    """The message with the headers whose index is in `drop` removed.

    `prepend` goes before the first header (trace fields such as Received),
    `append` after the last header, before the empty line.
    """
    parts = [prepend]
    pos = 0
    end_of_headers = headers[-1].end if headers else 0
    for i in sorted(drop):
        h = headers[i]
        parts.append(msg[pos : h.start])
        pos = h.end
    parts.append(msg[pos:end_of_headers])
    parts.append(append)
    parts.append(msg[end_of_headers:])
    return b"".join(parts)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(now: float | None = None) -> str:
    """An RFC 5322 date in local time with its numeric zone (no email package)."""
    global _last_date
    second = int(time.time() if now is None else now)
    if _last_date[0] == second:  # smtpd stamps hundreds of messages a second
        return _last_date[1]
    _last_date = (second, _format_date(second))
    return _last_date[1]


def _format_date(now: int) -> str:
    t = time.localtime(now)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{offset // 60:02d}{offset % 60:02d}"
    )
