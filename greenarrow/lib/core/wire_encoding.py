"""What may go on the wire: no line over 998 octets (RFC 5321 4.5.3.1.6, RFC 5322
2.1.1), and 7-bit bodies where 8-bit is not allowed (RFC 6152).

Injection accepts long lines (minified HTML from applications has them;
Postfix accepts it too), so the remote worker shortens them before DKIM
signing: each MIME leaf part whose body holds a line over 998 octets is
re-encoded as quoted-printable (RFC 2045 6.7: soft breaks keep every line
within 76 octets, and the receiver decodes the part to the bytes that were
injected). A part already in quoted-printable is decoded and encoded again;
one in base64 is re-wrapped in 76-character lines. Multipart bodies are
walked part by part, `message/rfc822` bodies as messages; every other byte
is kept as it was. A message without a long line is returned as it is,
after one scan (the cost for almost every message).

seven_bit() does the same for every leaf part whose body holds an 8-bit
byte: it becomes quoted-printable, for a receiver that does not offer
8BITMIME (RFC 6152 section 3: convert, do not send 8-bit data to it). The
remote worker does it before signing when it signs with DKIM (so the
signature covers what every receiver gets), and the SMTP client does it for
an unsigned message when the receiver lacks 8BITMIME. 8-bit bytes in a
header block cannot be converted this way and are sent as they are.

Left alone (sent as they are): a long line in a header block, in a
multipart preamble or epilogue, or in a multipart whose boundary is not
found: re-encoding cannot reach those without changing what they mean.
The byte work is greenarrow.pyx.simplemh's (header scanning, MIME
delimiters, the quoted-printable encoder).
"""

from __future__ import annotations

import binascii

from greenarrow.pyx import simplemh as fast

MAX_LINE = 998  # octets, without the CRLF


def shorten_long_lines(message: bytes) -> bytes:
    """`message` (CRLF) with every body line over 998 octets re-encoded away."""
    if fast.max_line_length(message) <= MAX_LINE:
        return message
    return _entity(message, 0, len(message), False, top=True)


def seven_bit(message: bytes) -> bytes:
    """`message` with long lines and 8-bit bodies re-encoded (quoted-printable)."""
    if message.isascii() and fast.max_line_length(message) <= MAX_LINE:
        return message
    return _entity(message, 0, len(message), True, top=True)


def _fine(data: bytes, seven: bool) -> bool:
    return fast.max_line_length(data) <= MAX_LINE and (not seven or data.isascii())


def _entity(msg: bytes, start: int, end: int, seven: bool, top: bool = False) -> bytes:
    """The entity msg[start:end] (headers, body) with its body re-encoded where it must be."""
    if _fine(msg[start:end], seven):
        return msg[start:end]
    fields, body_start = fast.split_headers(msg, start, end)
    body_start = min(body_start, end)
    values = {}
    for name, fstart, fend, colon in fields:
        if name in (b"content-type", b"content-transfer-encoding", b"mime-version"):
            values.setdefault(name, (fstart, fend, fast.header_value(msg, colon, fend)))
    mime_type, params = (fast.content_type(values[b"content-type"][2])
                         if b"content-type" in values else (b"text/plain", {}))
    head = msg[start:body_start]
    if mime_type.startswith(b"multipart/"):
        boundary = params.get(b"boundary", b"")
        delimiters = fast.find_delimiters(msg, body_start, end, boundary) if boundary else []
        if not delimiters:
            return msg[start:end]
        out = [head]
        previous = None  # where the current part starts (after a delimiter line)
        copied = body_start
        for line_start, after, closing in delimiters:
            if previous is not None:
                part_end = max(previous, line_start - 2)  # its CRLF belongs to the delimiter
                out.append(_entity(msg, previous, part_end, seven))
                copied = part_end
            out.append(msg[copied:after])
            copied = after
            previous = None if closing else after
        if previous is not None:  # no closing delimiter: the last part runs to the end
            out.append(_entity(msg, previous, end, seven))
        else:
            out.append(msg[copied:end])
        return b"".join(out)
    if mime_type == b"message/rfc822":
        return head + _entity(msg, body_start, end, seven)
    body = msg[body_start:end]
    if _fine(body, seven) or body_start <= start:
        return msg[start:end]  # what must change is in the header block (or there is none)
    encoding = values.get(b"content-transfer-encoding", (0, 0, b""))[2].strip().lower()
    try:
        if encoding == b"base64":
            return head + fast.base64_lines(binascii.a2b_base64(body)) + b"\r\n"
        if encoding == b"quoted-printable":
            body = binascii.a2b_qp(body)
    except (binascii.Error, ValueError):
        return msg[start:end]
    return _with_qp_header(msg, start, body_start, values, top) + fast.qp_encode(body)


def _with_qp_header(msg: bytes, start: int, body_start: int, values: dict, top: bool) -> bytes:
    """The header block with `Content-Transfer-Encoding: quoted-printable` (and, for a
    message without MIME headers, `MIME-Version: 1.0`, so the encoding is read)."""
    line = b"Content-Transfer-Encoding: quoted-printable\r\n"
    if b"content-transfer-encoding" in values:
        fstart, fend, _ = values[b"content-transfer-encoding"]
        return msg[start:fstart] + line + msg[fend:body_start]
    if top and b"mime-version" not in values:
        line = b"MIME-Version: 1.0\r\n" + line
    # Added at the end of the block: before its empty line, or before the body when a
    # malformed part has none.
    head = msg[start:body_start]
    if head.endswith(b"\r\n\r\n"):
        return head[:-2] + line + b"\r\n"
    if body_start == start:
        return line + b"\r\n"
    return head + (b"" if head.endswith(b"\r\n") else b"\r\n") + line + b"\r\n"
