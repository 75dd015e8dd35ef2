"""Link rewriting and the open pixel over real MIME messages (greenarrow.lib.simplemh.processing).

The messages are the raw MIME corpora of ../shared/corpus (stalwart-mail-parser
and cpython-test-email, listed in their index.jsonl), each injected twice:
as it is, and "linkified" (every text part given a set of links, in its own
transfer encoding, by the email package), plus hypothesis-made messages.
For each output, checked with Python's `email` package and an independent
link finder written here:

- the MIME tree is the same (types, boundaries, charsets, number of parts);
- parts that are not rewritten keep their raw payload;
- every text part decodes to the same text apart from the rewritten URLs
  and the open pixel; every link that should be tracked (http and https
  hrefs, plain-text URLs, ##unsubscribetag## links) is tracked, and its
  tracking URL decodes back to the original URL; mailto:, tel:, #anchor
  and data: links are left alone;
- every line is at most 998 octets, and quoted-printable and base64 lines
  at most 76.
"""

from __future__ import annotations

import base64
import json
import quopri
import re
from email import message_from_bytes, policy
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenarrow.lib.config import secret_constants
from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject import accept as injection
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.simplemh import mail_class
from greenarrow.lib.simplemh import tracking_url as tu

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.exists():
    CORPUS = Path("/work/shared/corpus")
BASE = "https://links.example.com"
RCPT = "rcpt@dest.example"
CONF = f"""\
mail_class news {{
    listid t100
    track_clicks_and_opens yes
    url_domain {BASE}
    bounce_address bounce@bounces.example.com
}}
"""
SKIP_CHARSETS = ("utf-16", "utf-32", "utf16", "utf32", "ucs-", "ucs2", "ucs4", "utf-7", "utf7",
                 "iso-2022", "iso2022", "csiso2022", "hz")
TRACKING = re.compile(rb"https://links\.example\.com/(click|open|unsub)\?([A-Za-z0-9_-]+)")
PIXEL = re.compile(rb'<img src="https://links\.example\.com/open\?[A-Za-z0-9_-]+" width="1" '
                   rb'height="1" border="0" alt="" />')
HREF = re.compile(rb"""<(?:a|area)\b[^>]*?\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""",
                  re.IGNORECASE)
TEXT_URL = re.compile(rb"(?<![A-Za-z0-9])(?:##unsubscribetag##)?https?://[^\s<>\"\x00-\x1f\x7f]+",
                      re.IGNORECASE)

LINKS_HTML = (
    b'<p><a href="https://example.com/x?a=1&amp;b=2">one</a> '
    b"<A HREF='http://example.org/p/(x)'>two</A> <a class=c href=https://example.net/u>three</a>\n"
    b'<a href="mailto:m@example.com">m</a> <a href="tel:+123">t</a> <a href="#top">top</a> '
    b'<a href="data:text/plain,hi">d</a> <a href="/relative">r</a>\n'
    b'<a href="##unsubscribetag##https://example.com/unsub?id=9">unsubscribe</a></p>\n'
)
LINKS_TEXT = (
    b"Visit https://example.com/t?a=1&b=2 or (http://example.org/p).\n"
    b"Unsubscribe: ##unsubscribetag##https://example.com/unsub?id=9\n"
    b"Mail mailto:m@example.com, call tel:+123\n"
)


def corpus_files() -> list[Path]:
    files = []
    for source in ("stalwart-mail-parser", "cpython-test-email"):
        index = CORPUS / source / "index.jsonl"
        if index.exists():
            for line in index.read_text().splitlines():
                files.append(CORPUS / source / json.loads(line)["file"])
    return files


FILES = corpus_files()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, tuple[str, str]]:
    root = Root(tmp_path_factory.mktemp("links") / "hvmail")
    init_root(root, "links.test")
    (root.control / "greenarrow.conf").write_text(CONF)
    mail_class._memo.clear()
    return str(root.path), secret_constants.read(root.control)


def process(root: str, message: bytes) -> bytes:
    prepared = injection.prepare(msglib.to_crlf(message), {"GREENARROW_MAILCLASS": "news"},
                                 "links.test", "uid", 1.7e9, b"", root)
    return prepared.message_for(RCPT)


# --------------------------------------------------------------------------- the checker


def entities(part: Message) -> list[tuple[Message, bool]]:
    """Every entity in walk order, with whether it is inside a message/* (rfc822, partial...)."""
    out = []

    def visit(m: Message, inside: bool) -> None:
        out.append((m, inside))
        if m.is_multipart():
            for sub in m.get_payload():
                visit(sub, inside or m.get_content_maintype() == "message")

    visit(part, False)
    return out


def rewritable(part: Message, inside: bool) -> bool:
    if inside or part.is_multipart() or part.get_content_type() not in ("text/html", "text/plain"):
        return False
    if (part.get("Content-Disposition") or "").split(";")[0].strip().lower() == "attachment":
        return False
    if (part.get_param("charset") or "").lower().startswith(SKIP_CHARSETS):
        return False
    cte = (part.get("Content-Transfer-Encoding") or "").strip().lower()
    return cte in ("", "7bit", "8bit", "binary", "quoted-printable", "base64")


def expected_links(text: bytes, html: bool) -> list[tuple[int, int, bytes]]:
    """(start, end, original URL) of each link that must be tracked, found independently."""
    out = []
    if html:
        for m in HREF.finditer(text):
            g = next(i for i in (1, 2, 3) if m.group(i) is not None)
            raw = m.group(g)
            value = raw.strip()
            url = value.replace(b"&amp;", b"&")
            if url.lower().startswith(b"##unsubscribetag##"):
                url = url[18:]
            elif not url.lower().startswith((b"http://", b"https://")):
                continue
            start = m.start(g) + (len(raw) - len(raw.lstrip()))
            out.append((start, start + len(value), url))
    else:
        for m in TEXT_URL.finditer(text):
            s, e = m.span()
            while e > s and text[e - 1:e] in b".,;:!?'*":
                e -= 1
            while text[e - 1:e] in b")]" and text[s:e].count(b"(" if text[e - 1:e] == b")" else b"[") < \
                    text[s:e].count(text[e - 1:e]):
                e -= 1
            url = text[s:e]
            if url.lower().startswith(b"##unsubscribetag##"):
                url = url[18:]
            out.append((s, e, url))
    return out


def check(original: bytes, out: bytes, constants: tuple[str, str]) -> int:
    """Assert everything in the module docstring; return the number of tracked links."""
    for line in out.split(b"\r\n"):
        assert len(line) <= 998
    a = message_from_bytes(msglib.to_crlf(original), policy=policy.compat32)
    b = message_from_bytes(out, policy=policy.compat32)
    ea, eb = entities(a), entities(b)
    assert [(p.get_content_type(), p.is_multipart(), p.get_boundary(), p.get_param("charset"))
            for p, _ in ea] == [
           (p.get_content_type(), p.is_multipart(), p.get_boundary(), p.get_param("charset"))
           for p, _ in eb]
    tracked = 0
    for (pa, inside), (pb, _) in zip(ea, eb, strict=True):
        if pa.is_multipart():
            continue
        cte_a = (pa.get("Content-Transfer-Encoding") or "").strip().lower()
        cte_b = (pb.get("Content-Transfer-Encoding") or "").strip().lower()
        if not rewritable(pa, inside):
            assert pb.get_payload() == pa.get_payload()
            continue
        assert cte_b == cte_a or (cte_a in ("", "7bit", "8bit", "binary")
                                  and cte_b == "quoted-printable")
        if cte_b in ("quoted-printable", "base64"):  # lines we wrote: at most 76 octets
            old = set(pa.get_payload().splitlines())
            assert all(len(line) <= 76 for line in pb.get_payload().splitlines()
                       if line not in old)
        html = pa.get_content_type() == "text/html"
        da = pa.get_payload(decode=True) or b""
        db = pb.get_payload(decode=True) or b""
        links = expected_links(da, html)
        if html:
            pixels = PIXEL.findall(db)
            assert len(pixels) == 1, db
            db = PIXEL.sub(b"", db)
        found = list(TRACKING.finditer(db))
        assert len(found) == len(links), (links, [m.group(0) for m in found])
        for (s, e, url), m in zip(links, found, strict=True):
            d = tu.decode(m.group(2).decode(), constants)
            assert d.url_bytes == url
            assert d.kind == (tu.UNSUBSCRIBE if da[s:e].lower().startswith(b"##unsub") else tu.CLICK)
            assert d.text == (not html) and d.recipient == RCPT
        # the same text apart from the links
        pieces, pos = [], 0
        for s, e, _ in links:
            pieces += [da[pos:s], b"<LINK>"]
            pos = e
        pieces.append(da[pos:])
        assert TRACKING.sub(b"<LINK>", db) == b"".join(pieces)
        tracked += len(links)
    return tracked


# --------------------------------------------------------------------------- the corpus


def linkify(raw: bytes) -> bytes:
    """The message with links added to each text part, in the part's own encoding."""
    msg = message_from_bytes(msglib.to_crlf(raw), policy=policy.compat32)
    for part, inside in entities(msg):
        if not rewritable(part, inside):
            continue
        payload = part.get_payload(decode=True) or b""
        html = part.get_content_type() == "text/html"
        add = LINKS_HTML if html else LINKS_TEXT
        at = payload.lower().rfind(b"</body>") if html else -1
        payload = payload[:at] + add + payload[at:] if at >= 0 else payload + b"\n" + add
        payload = payload.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        cte = (part.get("Content-Transfer-Encoding") or "").strip().lower()
        if cte == "quoted-printable":
            payload = quopri.encodestring(payload).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        elif cte == "base64":
            payload = base64.encodebytes(payload).replace(b"\n", b"\r\n")
        part.set_payload(payload.decode("ascii", "surrogateescape"))
    return msglib.to_crlf(msg.as_bytes())


def test_corpus_is_there() -> None:
    assert len(FILES) >= 30, f"corpus not found under {CORPUS}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parts[-2]}/{p.name}"
                         if "stalwart" in str(p) else p.name)
def test_corpus_message_as_is(env, path: Path) -> None:
    root, constants = env
    raw = path.read_bytes()
    check(raw, process(root, raw), constants)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parts[-2]}/{p.name}"
                         if "stalwart" in str(p) else p.name)
def test_corpus_message_with_links(env, path: Path) -> None:
    root, constants = env
    raw = linkify(path.read_bytes())
    out = process(root, raw)
    n = check(raw, out, constants)
    parts = [p for p, inside in entities(message_from_bytes(raw, policy=policy.compat32))
             if rewritable(p, inside)]
    assert n >= sum(4 if p.get_content_type() == "text/html" else 3 for p in parts)


def test_corpus_untouched_without_tracking(env) -> None:
    """With X-GreenArrow-Click-Tracking-Do: no, every corpus body comes out byte for byte."""
    root, _ = env
    for path in FILES:
        raw = msglib.to_crlf(path.read_bytes())
        prepared = injection.prepare(b"X-GreenArrow-Click-Tracking-Do: no\r\n" + raw,
                                     {"GREENARROW_MAILCLASS": "news"}, "t", "u", 1.7e9, b"", root)
        out = prepared.message_for(RCPT)
        _, body_in = msglib.split_headers(raw)
        _, body_out = msglib.split_headers(out)
        assert out[body_out:] == raw[body_in:], path


# --------------------------------------------------------------------------- specific cases


def test_long_7bit_line_becomes_quoted_printable(env) -> None:
    root, constants = env
    links = b" ".join(b'<a href="https://example.com/%d">x</a>' % i for i in range(40))
    raw = (b"Subject: long\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
           b"<html><body>" + links + b"</body></html>\r\n")
    out = process(root, raw)
    assert check(raw, out, constants) == 40
    headers, _ = msglib.split_headers(out)
    ctes = [msglib.header_value(out, h) for h in headers if h.name == b"content-transfer-encoding"]
    assert ctes == ["quoted-printable"]


def test_long_line_in_a_multipart_part(env) -> None:
    root, constants = env
    inner = MIMEText("<p>" + " ".join(f'<a href="http://e.example/{i}">{i}</a>' for i in range(40))
                     + "</p>", "html", "us-ascii")
    del inner["Content-Transfer-Encoding"]
    m = MIMEMultipart("alternative")
    m.attach(MIMEText("plain text\n", "plain", "us-ascii"))
    m.attach(inner)
    raw = msglib.to_crlf(m.as_bytes())
    out = process(root, raw)
    assert check(raw, out, constants) == 40
    assert out.count(b"Content-Transfer-Encoding: quoted-printable") == 1


def test_opentag_places_the_pixel(env) -> None:
    root, constants = env
    raw = (b"Content-Type: text/html\r\n\r\n<html><body><opentag/><p>hi</p><OPENTAG />"
           b"</body></html>\r\n")
    out = process(root, raw)
    body = out.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b'<html><body><img src="https://links.example.com/open?')
    assert body.endswith(b"<p>hi</p></body></html>\r\n")


def test_pixel_without_body_tag(env) -> None:
    root, _ = env
    out = process(root, b"Content-Type: text/html\r\n\r\n<p>hi</p>\r\n\r\n")
    assert out.endswith(b'<p>hi</p><img src="' + out.split(b'<img src="')[1].split(b'"')[0]
                        + b'" width="1" height="1" border="0" alt="" />\r\n\r\n')


def test_already_tracked_links_stay(env) -> None:
    root, constants = env
    raw = (b"Content-Type: text/html\r\n\r\n"
           b'<a href="https://links.example.com/click?AAAA">x</a></body>\r\n')
    out = process(root, raw)
    assert b'href="https://links.example.com/click?AAAA"' in out


def test_attachment_and_forwarded_message_untouched(env) -> None:
    root, constants = env
    raw = msglib.to_crlf(
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\n"
        b"see http://a.example/\n--b\nContent-Type: text/html\nContent-Disposition: attachment\n\n"
        b'<a href="http://att.example/">x</a>\n--b\nContent-Type: message/rfc822\n\n'
        b'Content-Type: text/html\n\n<a href="http://fwd.example/">y</a>\n--b--\n')
    out = process(root, raw)
    assert check(raw, out, constants) == 1
    assert b'"http://att.example/"' in out and b'"http://fwd.example/"' in out


def test_utf16_part_left_alone(env) -> None:
    root, constants = env
    text = '<a href="http://x.example/">x</a>'.encode("utf-16")
    raw = (b"Content-Type: text/html; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(text).replace(b"\n", b"\r\n"))
    assert process(root, raw).endswith(raw.split(b"\r\n\r\n", 1)[1])


# --------------------------------------------------------------------------- generated messages

_words = st.lists(st.sampled_from(["caf\u00e9", "hello", "world", "a", "=", "  ", "\t", "x" * 90,
                                   "\u00fcber", "."]), max_size=20).map(" ".join)
_html_link = st.sampled_from([
    '<a href="https://example.com/p?a=1&amp;b=2">l</a>', "<a href='http://example.org/'>l</a>",
    '<a href="mailto:z@example.com">m</a>', '<a href="#x">a</a>', '<a href="tel:1">t</a>',
    '<a href="data:,x">d</a>', '<a href="##unsubscribetag##https://example.com/u">u</a>',
])
_text_link = st.sampled_from(["https://example.com/t?x=1", "http://example.org/a/b",
                              "##unsubscribetag##https://example.com/u", "mailto:q@example.com"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    def part(html: bool) -> MIMEText:
        chunks = draw(st.lists(st.tuples(_words, _html_link if html else _text_link), max_size=6))
        text = "\n".join(f"{w} {link}" for w, link in chunks) + draw(_words)
        if html and draw(st.booleans()):
            text = f"<html><body>{text}</body></html>"
        charset = draw(st.sampled_from(["utf-8", "iso-8859-1", "us-ascii"]))
        if charset == "us-ascii":
            text = text.encode("ascii", "replace").decode()
        if charset == "iso-8859-1":
            text = text.encode("latin-1", "replace").decode("latin-1")
        p = MIMEText(text, "html" if html else "plain", charset)
        cte = draw(st.sampled_from(["base64", "quoted-printable", "8bit"]))
        if cte != "base64":
            del p["Content-Transfer-Encoding"]
            data = text.encode(charset)
            if cte == "quoted-printable":
                data = quopri.encodestring(data)
            p.set_payload(data.decode("ascii", "surrogateescape"))
            p["Content-Transfer-Encoding"] = cte
        return p

    kind = draw(st.sampled_from(["html", "text", "alternative", "mixed"]))
    if kind in ("html", "text"):
        m = part(kind == "html")
    else:
        m = MIMEMultipart(kind, boundary="=_gen_boundary_=")
        m.attach(part(False))
        m.attach(part(True))
        if kind == "mixed":
            att = MIMEText("http://attached.example/", "plain")
            att.add_header("Content-Disposition", "attachment", filename="a.txt")
            m.attach(att)
    m["Subject"] = "generated"
    return msglib.to_crlf(m.as_bytes())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(raw=messages())
def test_generated_messages(env, raw: bytes) -> None:
    root, constants = env
    check(raw, process(root, raw), constants)
