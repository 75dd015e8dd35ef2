"""The compiled SimpleMH primitives (greenarrow.pyx.simplemh), checked against references.

The header scanner must agree with greenarrow.lib.core.message.split_headers,
the quoted-printable decoder with binascii.a2b_qp (what the email package
uses), and the encoder must round-trip within RFC 2045's line limits.
Hypothesis fuzzes every function with arbitrary bytes: no crash, no hang
(each example runs under a deadline far above its real cost).
"""

from __future__ import annotations

import binascii
import importlib.machinery
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenarrow.lib.core import message as msglib
from greenarrow.pyx import simplemh as fast

FUZZ = settings(max_examples=400, deadline=timedelta(seconds=2))


def test_is_compiled() -> None:
    assert isinstance(fast.__loader__, importlib.machinery.ExtensionFileLoader)


# --------------------------------------------------------------------------- headers


def _reference(msg: bytes) -> tuple[list, int]:
    headers, body = msglib.split_headers(msg)
    return [(h.name, h.start, h.end, h.colon) for h in headers], body


_line = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda n, v: n + b":" + v, st.sampled_from([b"From", b"X-GreenArrow-ListID",
                                                          b"Bad Name", b" cont", b"\tx", b""]),
              st.binary(max_size=30)),
)


@FUZZ
@given(lines=st.lists(_line, max_size=15), tail=st.sampled_from([b"", b"\r\n", b"\r\nbody"]))
def test_split_headers_matches_message_module(lines: list[bytes], tail: bytes) -> None:
    msg = b"\r\n".join(lines) + tail
    assert fast.split_headers(msg) == _reference(msg)


@FUZZ
@given(data=st.binary(max_size=300), a=st.integers(0, 300), b=st.integers(0, 300))
def test_split_headers_bounded(data: bytes, a: int, b: int) -> None:
    """With bounds, it is the same as scanning the slice, offsets shifted."""
    start, end = min(a, b, len(data)), min(max(a, b), len(data))
    headers, body = fast.split_headers(data, start, end)
    ref_headers, ref_body = fast.split_headers(data[start:end])
    assert [(n, s - start, e - start, c - start) for n, s, e, c in headers] == ref_headers
    assert body - start == ref_body


def test_header_value_unfolds() -> None:
    msg = b"Subject:  a\r\n b\r\n\tc \r\n\r\n"
    (name, start, end, colon), = fast.split_headers(msg)[0]
    assert fast.header_value(msg, colon, end) == b"a b\tc"


@pytest.mark.parametrize(("value", "expected"), [
    (b"text/html; charset=UTF-8", (b"text/html", {b"charset": b"UTF-8"})),
    (b'Multipart/Mixed;\r\n\tboundary="=_a\\"b; c"', (b"multipart/mixed", {b"boundary": b'=_a"b; c'})),
    (b"text/plain; format=flowed; ; junk; charset = us-ascii ",
     (b"text/plain", {b"format": b"flowed", b"charset": b"us-ascii"})),
    (b"text/plain; charset=\"unterminated", (b"text/plain", {b"charset": b"unterminated"})),
    (b"", (b"", {})),
])
def test_content_type(value: bytes, expected: tuple) -> None:
    assert fast.content_type(value) == expected


def test_find_delimiters() -> None:
    body = b"pre\r\n--b\r\nA\r\n--b  \r\nB\r\n--bx\r\n--b--\r\nepilogue\r\n--b\r\n"
    assert fast.find_delimiters(body, 0, len(body), b"b") == [
        (5, 10, False), (13, 20, False), (29, 36, True)]
    assert fast.find_delimiters(b"--b\r\n", 0, 5, b"b") == [(0, 5, False)]
    assert fast.find_delimiters(b"x--b\r\n", 0, 6, b"b") == []
    assert fast.find_delimiters(b"--b", 0, 3, b"") == []


# --------------------------------------------------------------------------- quoted-printable


@FUZZ
@given(data=st.binary(max_size=400) | st.text("=AF09az \t\r\n", max_size=200).map(str.encode))
def test_qp_decode_is_a2b_qp(data: bytes) -> None:
    decoded, lines = fast.qp_decode(data)
    assert decoded == binascii.a2b_qp(data)
    # the line table tiles both the input and the output, in order, one entry per physical line
    spans = fast.line_table(lines)
    enc_pos = dec_pos = 0
    for enc_start, enc_end, dec_start, dec_end, term in spans:
        assert (enc_start, dec_start) == (enc_pos, dec_pos)
        enc_pos, dec_pos = enc_end, dec_end
        line = data[enc_start:enc_end]
        assert binascii.a2b_qp(line) == decoded[dec_start:dec_end]  # each decodes on its own
        assert b"\n" not in line[:-1]
        if term == -1:
            assert enc_end == len(data) and not line.endswith(b"\n")
        elif term == 0:
            assert line.endswith(b"\n") and b"=" in line
        else:
            assert decoded[dec_end - term:dec_end] == line[-term:] == b"\r\n"[2 - term:]
    assert (enc_pos, dec_pos) == ((len(data), len(decoded)) if spans else (0, 0))


@FUZZ
@given(data=st.binary(max_size=500) | st.text(max_size=300).map(lambda t: t.encode("utf-8")))
def test_qp_encode_round_trip_and_limits(data: bytes) -> None:
    encoded = fast.qp_encode(data)
    crlf = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert binascii.a2b_qp(encoded) == crlf
    for line in encoded.split(b"\r\n"):
        assert len(line) <= 76
        assert all(33 <= c <= 126 or c in (32, 9) for c in line)
        assert not line.endswith((b" ", b"\t"))


def test_qp_encode_examples() -> None:
    assert fast.qp_encode(b"a=b \r\nc\t") == b"a=3Db=20\r\nc=09"
    assert fast.qp_encode(b"x" * 76) == b"x" * 76
    assert fast.qp_encode(b"x" * 77) == b"x" * 75 + b"=\r\nxx"
    assert fast.qp_encode(b"\xff" * 30).count(b"=\r\n") == 1


@FUZZ
@given(text=st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=200),
                     min_size=1, max_size=8),
       picks=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 300),
                                st.binary(max_size=90)), max_size=6))
def test_qp_render_rewrites_only_changed_lines(text: list[str], picks: list) -> None:
    """Slots anywhere in the text (across soft line breaks too, never across a hard one):
    the result decodes to the spliced text, lines stay within 76 octets, and every physical
    line that holds no slot is copied as it was."""
    raw = fast.qp_encode("\r\n".join(text).encode("utf-8"))
    decoded, lines = fast.qp_decode(raw)
    slots, reps = [], []
    for start, length, rep in picks:
        s = min(start, len(decoded))
        e = min(s + length, len(decoded))
        nl = decoded.find(b"\r", s, e)
        if nl >= 0:
            e = nl
        if decoded[s - 1:s] == b"\r" and s:
            continue  # inside a line break: not a place a link can be
        if any(not (e <= a or s >= b) or s == a for a, b in slots):
            continue
        slots.append((s, e))
        reps.append(rep)
    order = sorted(range(len(slots)), key=lambda i: slots[i])
    slots = [slots[i] for i in order]
    reps = [reps[i] for i in order]
    out = fast.qp_render(raw, decoded, lines, slots, reps)
    assert binascii.a2b_qp(out) == fast.splice(decoded, slots, reps)
    assert all(len(x) <= 76 for x in out.split(b"\r\n"))
    for enc_start, enc_end, dec_start, dec_end, _ in fast.line_table(lines):
        untouched = all(e < dec_start or s > dec_end for s, e in slots)
        if untouched and enc_end > enc_start:
            assert raw[enc_start:enc_end] in out


def test_max_line_length() -> None:
    assert fast.max_line_length(b"") == 0
    assert fast.max_line_length(b"ab\r\nabcd\nabc") == 4
    assert fast.max_line_length(b"x" * 999 + b"\r\n") == 999


def test_splice() -> None:
    assert fast.splice(b"0123456789", [(1, 3), (5, 5), (8, 10)], [b"a", b"b", b""]) == b"0a34b567"


# --------------------------------------------------------------------------- links


def _values(html: bytes) -> list[bytes]:
    return [html[s:e] for s, e in fast.find_html_links(html)[0]]


def test_html_links() -> None:
    html = (b'<html><!-- <a href="http://comment"> --><A HREF = "http://a.example/?x=1&amp;y=2">a</a>'
            b"<a name=q href='https://b.example'>b</a><area shape=rect href=http://c.example/>"
            b'<a href="http://first" href="http://second">d</a><link href="http://no">'
            b'<img src="http://img"><script>var s="<a href=\'http://js\'>";</script>'
            b'<style>a{background:url("<a href=http://css>")}</style>'
            b'<a\r\nhref="http://wrapped">w</a><opentag/></BODY></html>')
    hrefs, body_close, opentags = fast.find_html_links(html)
    assert [html[s:e] for s, e in hrefs] == [
        b"http://a.example/?x=1&amp;y=2", b"https://b.example", b"http://c.example/",
        b"http://first", b"http://wrapped"]
    assert html[body_close:body_close + 7] == b"</BODY>"
    assert [html[s:e] for s, e in opentags] == [b"<opentag/>"]


def test_html_edge_cases() -> None:
    assert _values(b'<a href="unterminated') == []  # a tag never closed is not a tag
    assert _values(b"<a href=>x</a>") == [b""]
    assert _values(b"<abbr href=x>") == []
    assert _values(b"<a href=x/>") == [b"x/"]
    assert fast.find_html_links(b"<p>no body</p>")[1] == -1
    assert fast.find_html_links(b"</bodyx></body >")[1] == 8


@pytest.mark.parametrize(("text", "urls"), [
    (b"see http://a.example/x). and more", [b"http://a.example/x"]),
    (b"(https://b.example/(x))", [b"https://b.example/(x)"]),
    (b"<http://c.example/p?q=1&r=2>", [b"http://c.example/p?q=1&r=2"]),
    (b"HTTPS://UP.example/A, then", [b"HTTPS://UP.example/A"]),
    (b"xhttp://no.example shttp://no", []),
    (b"http:// nothing", []),
    (b'"http://q.example/a"', [b"http://q.example/a"]),
    (b"http://caf\xc3\xa9.example/\xc3\xa9 next", [b"http://caf\xc3\xa9.example/\xc3\xa9"]),
])
def test_text_links(text: bytes, urls: list[bytes]) -> None:
    assert [text[s:e] for s, e, _ in fast.find_text_links(text)] == urls


def test_text_unsubscribe_tag() -> None:
    text = b"Bye: ##unsubscribetag##https://u.example/u?id=1. Plain http://x.example"
    (s1, e1, u1), (s2, e2, u2) = fast.find_text_links(text)
    assert text[s1:e1] == b"##unsubscribetag##https://u.example/u?id=1"
    assert text[u1:e1] == b"https://u.example/u?id=1"
    assert u2 == s2 and text[s2:e2] == b"http://x.example"


@pytest.mark.parametrize(("value", "expected"), [
    (b"http://a/?x=1&amp;y=2&AMP;z", b"http://a/?x=1&y=2&z"),
    (b"&#38;&#x26;&#X3d;&quot;&apos;&lt;&gt;", b"&&=\"'<>"),
    (b"&eacute;&#233;&#0;&#;&", b"&eacute;&#233;&#0;&#;&"),
    (b"&ampx", b"&x"),
    (b"no entities", b"no entities"),
])
def test_unescape_entities(value: bytes, expected: bytes) -> None:
    assert fast.unescape_entities(value) == expected


@FUZZ
@given(data=st.binary(max_size=600) | st.text("<>ahrefbody=\"' /!-opentag&#;x", max_size=300)
       .map(str.encode))
def test_fuzz_no_crash(data: bytes) -> None:
    """Every entry point takes arbitrary bytes without crashing, and its offsets are in range."""
    n = len(data)
    headers, body = fast.split_headers(data)
    assert 0 <= body <= n + 2
    for _, s, e, c in headers:
        assert 0 <= s < c < e <= n
        fast.header_value(data, c, e)
    fast.content_type(data)
    fast.find_delimiters(data, 0, n, b"b")
    fast.qp_decode(data)
    fast.qp_encode(data)
    fast.max_line_length(data)
    hrefs, body_close, opentags = fast.find_html_links(data)
    assert all(0 <= s <= e <= n for s, e in hrefs + opentags) and -1 <= body_close < n
    for s, e, u in fast.find_text_links(data):
        assert 0 <= s <= u < e <= n
    fast.unescape_entities(data)


@pytest.mark.parametrize("raw", [b"abc\r\n", b"abc", b"a=0Ab\r\nxyz=\r\n", b"", b"abc\r\n=",
                                 b"=", b"=\r\n", b"x\r\n\r\n"])
def test_qp_render_insertion_at_the_end(raw: bytes) -> None:
    """An open pixel appended to a part whose text has no </body>: right after its last byte."""
    decoded, lines = fast.qp_decode(raw)
    out = fast.qp_render(raw, decoded, lines, [(len(decoded), len(decoded))], [b"<img>"])
    assert binascii.a2b_qp(out) == decoded + b"<img>"


def test_qp_render_keeps_the_other_physical_lines() -> None:
    """A link in the middle of a long soft-broken line: only its physical lines change."""
    text = ("word " * 40 + '<a href="http://x.example/long/path?q=1">x</a> ' + "word " * 40).encode()
    raw = fast.qp_encode(text + b"\r\n")
    decoded, lines = fast.qp_decode(raw)
    s = decoded.index(b"http://")
    e = decoded.index(b'">x')
    out = fast.qp_render(raw, decoded, lines, [(s, e)], [b"https://t.example/click?" + b"D" * 120])
    assert binascii.a2b_qp(out) == decoded[:s] + b"https://t.example/click?" + b"D" * 120 + decoded[e:]
    raw_lines = raw.split(b"\r\n")
    out_lines = out.split(b"\r\n")
    assert raw_lines[0] == out_lines[0] and raw_lines[-2:] == out_lines[-2:]


def test_qp_render_keeps_encoded_line_feeds() -> None:
    """A line holding =0A (a line feed that is data) keeps it as data when rewritten."""
    raw = b"a=0Ab http://x.example/\r\nnext\r\n"
    decoded, lines = fast.qp_decode(raw)
    s = decoded.index(b"http")
    out = fast.qp_render(raw, decoded, lines, [(s, s + 17)], [b"https://t.example/c?D"])
    assert out.count(b"\r\n") == 2
    assert binascii.a2b_qp(out) == b"a\nb https://t.example/c?D\r\nnext\r\n"
    assert out.endswith(b"\r\nnext\r\n")


# --------------------------------------------------------------------------- exact references


def _delimiters_by_lines(msg: bytes, start: int, end: int, boundary: bytes) -> list:
    """find_delimiters as a plain line-by-line scan (what the compiled search must agree with)."""
    out: list = []
    n = min(end, len(msg))
    pos = start
    while boundary and pos < n:
        eol = msg.find(b"\r\n", pos, n)
        stop = n if eol < 0 else eol
        dash = b"--" + boundary
        if pos + len(dash) <= n and msg[pos:pos + len(dash)] == dash:
            q = pos + len(dash)
            closing = msg[q:q + 2] == b"--" and q + 1 < n
            rest = msg[q + (2 if closing else 0):stop]
            if q + (2 if closing else 0) <= stop and rest.strip(b" \t") == b"":
                out.append((pos, n if eol < 0 else eol + 2, closing))
                if closing:
                    return out
        if eol < 0:
            break
        pos = eol + 2
    return out


_body_line = st.sampled_from([b"--b", b"--b--", b"--b  ", b"--bx", b"x--b", b"-", b"--", b"",
                              b"text", b"\r", b"\n", b"--b\r", b"a\n--b", b"--b\t--"])


@FUZZ
@given(lines=st.lists(_body_line, max_size=20), seps=st.lists(st.sampled_from(
    [b"\r\n", b"\n", b"\r", b"\r\r\n"]), min_size=20, max_size=20), cut=st.integers(0, 8),
    trim=st.integers(0, 4))
def test_find_delimiters_is_a_line_scan(lines: list[bytes], seps: list[bytes], cut: int,
                                        trim: int) -> None:
    body = b"".join(line + sep for line, sep in zip(lines, seps, strict=False))
    start, end = min(cut, len(body)), max(0, len(body) - trim)
    for boundary in (b"b", b"bx", b"-"):
        assert (fast.find_delimiters(body, start, end, boundary)
                == _delimiters_by_lines(body, start, end, boundary))


def _qp_line_reference(line: bytes) -> bytes:
    """One hard line in quoted-printable, byte by byte: the rules qp_encode_line follows."""
    out, col = bytearray(), 0
    for i, c in enumerate(line):
        last = i == len(line) - 1
        literal = (33 <= c <= 126 and c != 61) or (c in (32, 9) and not last)
        piece = bytes([c]) if literal else b"=%02X" % c
        if col + len(piece) > (76 if last else 75):
            out += b"=\r\n"
            col = 0
        out += piece
        col += len(piece)
    return bytes(out)


@FUZZ
@given(line=st.lists(st.sampled_from([b"x" * 17, b"word ", b"=", b"\t", b" ", b"\xc3\xa9", b"u",
                                      b"y" * 80]), max_size=30).map(b"".join))
def test_qp_encode_line_is_byte_exact(line: bytes) -> None:
    """The encoder copies runs of literal bytes at once (SSE2): the same bytes as one at a time."""
    assert fast.qp_encode_line(line) == _qp_line_reference(line)
    assert fast.qp_encode_line(line, True) == _qp_line_reference(line) + b"\r\n"


@FUZZ
@given(data=st.binary(max_size=300))
def test_base64_lines(data: bytes) -> None:
    encoded = binascii.b2a_base64(data, newline=False)
    assert fast.base64_lines(data) == b"\r\n".join(encoded[i:i + 76]
                                                   for i in range(0, len(encoded), 76))


def test_file_key_is_the_stat_key(tmp_path) -> None:
    import os

    path = tmp_path / "greenarrow.conf"
    path.write_bytes(b"x" * 10)
    st_ = os.stat(path)
    key = f"{st_.st_mtime_ns} {st_.st_size} {st_.st_ino}".encode()
    assert fast.file_key(os.fsencode(path)) == key
    missing = os.fsencode(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        fast.file_key(missing)
    assert fast.files_key((os.fsencode(path), missing, os.fsencode(path))) == b";".join(
        (key, b"-", key))


# --------------------------------------------------------------------------- the body plan


def _plan(msg: bytes, track: bool = True, base: bytes = b"https://t.example"):
    fields, body_start = fast.split_headers(msg)
    return fast.plan_body(msg, fields, body_start, track, True, base, b"<img src=\"", b"\">")


def test_plan_body_finds_the_parts() -> None:
    msg = (b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\npre\r\n--b\r\n"
           b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"<a href=3D\"http://x.example/\">x</a></body>\r\n--b\r\n"
           b"Content-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nhttp://y/\r\n"
           b"--b\r\n\r\nsee http://z.example/ and ##unsubscribetag##http://u.example/\r\n"
           b"--b--\r\n")
    plan = _plan(msg)
    assert plan.top is None
    html, text = plan.parts
    assert (html.enc, html.text, html.kinds) == (fast.ENC_QP, False, b"cp")
    assert html.targets == [b"http://x.example/", b""]
    assert html.raw == b"<a href=3D\"http://x.example/\">x</a></body>"  # the CRLF is the delimiter's
    assert (text.enc, text.text, text.kinds) == (fast.ENC_IDENTITY, True, b"cu")
    assert [text.decoded[a:b] for a, b in text.slots] == [
        b"http://z.example/", b"##unsubscribetag##http://u.example/"]
    # without a URL domain nothing is signed: only the tag is stripped
    plain = _plan(msg, track=False, base=b"")
    (part,) = plain.parts
    assert part.kinds == b"s"
    out = plain.render(None, b"", 0, (b"", b"", b""), b"H: 1\r\n", b"", b"A: 2\r\n", b"\r\n")
    assert out == b"H: 1\r\nA: 2\r\n\r\n" + msg[msg.index(b"\r\n\r\n") + 4:].replace(
        b"##unsubscribetag##", b"")


def test_plan_body_long_line_becomes_quoted_printable() -> None:
    from greenarrow.pyx import tracksign

    msg = b"Content-Type: text/plain\r\n\r\n" + b"x" * 990 + b" http://a.example/\r\n"
    plan = _plan(msg)
    assert plan.top is not None and plan.top.enc == fast.ENC_IDENTITY
    signer = tracksign.Signer(b"k" * 32)
    out = plan.render(signer, b"r\x00\x00\x00\x00\x00\x00", 0, (b"C/", b"U/", b"O/"), b"HEAD",
                      b"HEADQP", b"", b"\r\n")
    assert out.startswith(b"HEADQP\r\n")
    assert binascii.a2b_qp(out[8:]).startswith(b"x" * 990 + b" C/")


def test_body_plan_only_from_plan_body() -> None:
    with pytest.raises(ValueError):
        fast.BodyPlan().render(None, b"", 0, (b"", b"", b""), b"", b"", b"", b"")


def test_pixel_never_goes_into_a_header_block() -> None:
    """A malformed text/html part with no empty line and no body (MIME corpus): the open
    pixel is not appended to its Content-Type line; the part is left alone. A part with an
    empty line and an empty body still gets it, in its body."""
    from greenarrow.pyx import tracksign

    signer = tracksign.Signer(b"k" * 32)

    def render(msg: bytes) -> bytes:
        return _plan(msg).render(signer, b"r\x00\x00\x00\x00\x00\x00", 0, (b"C/", b"U/", b"O/"),
                                 b"", b"", b"", b"\r\n")

    broken = (b"Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\n"
              b"Content-Type: text/html\r\n--b--\r\n")
    body = broken[broken.index(b"\r\n\r\n") + 4:]
    assert _plan(broken).parts == []
    assert render(broken) == b"\r\n" + body
    empty = (b"Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\n"
             b"Content-Type: text/html\r\n\r\n\r\n--b--\r\n")
    out = render(empty)
    assert b"Content-Type: text/html\r\n\r\n<img src=\"O/" in out
