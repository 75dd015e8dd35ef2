"""Tracking URLs and their signed DATA (greenarrow.lib.simplemh.tracking_url, docs/simplemh.md).

Round trips for every kind and format, the fields of stateless mode, and
the promise that matters to the tracker: a DATA that was changed, cut short
or made with other secret constants decodes to an error, never to a URL.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenarrow.lib.simplemh import tracking_url as tu

C = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
OTHER = ("00000000000000000000000000000000", "fedcba9876543210fedcba9876543210")
BASE = "https://links.example.com"

_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_url = st.binary(max_size=300).filter(lambda b: b"\0" not in b)


def make(**kw) -> str:
    args = dict(kind=tu.CLICK, recipient="r@example.com", listid="t100", sendid="news-1",
                mailclass="news", instanceid="0901220005", click_tracking_id="42",
                url=b"https://example.com/a?x=1&y=2", stateless=True)
    args.update(kw)
    return tu.encode(C, **args)


def test_round_trip_carries_every_stateless_field() -> None:
    """Stateless DATA carries recipient, ListID, SendID, Mail Class, InstanceID,
    click tracking id and the target URL."""
    d = tu.decode(make(), C)
    assert (d.kind, d.recipient, d.listid, d.sendid, d.mailclass, d.instanceid,
            d.click_tracking_id) == ("c", "r@example.com", "t100", "news-1", "news",
                                     "0901220005", "42")
    assert d.url == "https://example.com/a?x=1&y=2"
    assert d.stateless and not d.text


def test_data_is_url_safe_and_versioned() -> None:
    data = make()
    assert set(data) <= set(string.ascii_letters + string.digits + "-_")
    assert tu.b64url(b"\x01")[:1] == data[:1].encode() == b"A"  # version byte 1 first


@pytest.mark.parametrize(("fmt", "expected"), [
    ("a", BASE + "/click/DATA"), ("b", BASE + "/click?DATA"), ("c", BASE + "/click?qs=DATA"),
])
def test_formats(fmt: str, expected: str) -> None:
    assert tu.tracking_url(BASE, fmt, tu.CLICK, "DATA") == expected
    assert tu.data_from_url(expected) == ("click", "DATA")


def test_paths_by_kind() -> None:
    assert tu.tracking_url(BASE, "b", tu.OPEN, "D") == BASE + "/open?D"
    assert tu.tracking_url(BASE, "a", tu.UNSUBSCRIBE, "D") == BASE + "/click/D"
    assert tu.tracking_url(BASE, "c", tu.LIST_UNSUBSCRIBE, "D") == BASE + "/unsub?qs=D"
    with pytest.raises(ValueError):
        tu.tracking_url(BASE, "d", tu.CLICK, "D")


def test_data_from_request_targets() -> None:
    assert tu.data_from_url("/click/ABC") == ("click", "ABC")
    assert tu.data_from_url("/open?ABC") == ("open", "ABC")
    assert tu.data_from_url("/click?qs=ABC&utm_source=x") == ("click", "ABC")
    assert tu.data_from_url("https://h.example/base/click?ABC") == ("click", "ABC")
    with pytest.raises(ValueError):
        tu.data_from_url("https://h.example/")


@pytest.mark.parametrize("fmt", tu.FORMATS)
def test_encoder_matches_encode_in_every_format(fmt: str) -> None:
    enc = tu.Encoder(C, BASE, fmt, "r@example.com", "t100", "news-1", "news", "0901220005",
                     "42", True)
    url = enc.url(tu.CLICK, b"https://example.com/a?x=1&y=2").decode()
    path, data = tu.data_from_url(url)
    assert path == "click"
    assert data == make()
    assert tu.decode(data, C).url == "https://example.com/a?x=1&y=2"
    assert enc.url(tu.OPEN).decode().startswith(BASE + "/open")
    assert tu.decode(tu.data_from_url(enc.url(tu.OPEN, text=True).decode())[1], C).text


def test_non_ascii_target_is_escaped_for_redirects() -> None:
    d = tu.decode(make(url="https://example.com/caf\u00e9 x".encode()), C)
    assert d.url_bytes == "https://example.com/caf\u00e9 x".encode()
    assert d.url == "https://example.com/caf%C3%A9%20x"


def test_other_constants_rejected() -> None:
    with pytest.raises(tu.TrackingDataError):
        tu.decode(make(), OTHER)


def test_kind_filter() -> None:
    with pytest.raises(tu.TrackingDataError):
        tu.decode(make(kind=tu.OPEN), C, kinds={tu.CLICK, tu.UNSUBSCRIBE})
    assert tu.decode(make(kind=tu.UNSUBSCRIBE), C, kinds={tu.CLICK, tu.UNSUBSCRIBE}).kind == "u"


@pytest.mark.parametrize("bad", ["", "!!!!", "A", "AAAA", "AW0A" * 3, "a b"])
def test_garbage_rejected(bad: str) -> None:
    with pytest.raises(tu.TrackingDataError):
        tu.decode(bad, C)


def test_every_truncation_rejected() -> None:
    data = make()
    for n in range(len(data)):
        with pytest.raises(tu.TrackingDataError):
            tu.decode(data[:n], C)


def test_every_single_character_change_rejected() -> None:
    data = make()
    alphabet = string.ascii_letters + string.digits + "-_"
    for i, ch in enumerate(data):
        for repl in (alphabet[(alphabet.index(ch) + 1) % 64], alphabet[(alphabet.index(ch) + 33) % 64]):
            with pytest.raises(tu.TrackingDataError):
                tu.decode(data[:i] + repl + data[i + 1:], C)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(tu.KINDS)), recipient=_printable, listid=_printable,
       sendid=_printable, mailclass=_printable, instanceid=_printable, ctid=_printable,
       url=_url, stateless=st.booleans(), text=st.booleans())
def test_round_trip_property(kind, recipient, listid, sendid, mailclass, instanceid, ctid, url,
                             stateless, text) -> None:
    data = tu.encode(C, kind, recipient, listid, sendid, mailclass, instanceid, ctid, url,
                     stateless, text)
    d = tu.decode(data, C)
    assert (d.kind, d.recipient, d.listid, d.sendid, d.mailclass, d.instanceid,
            d.click_tracking_id, d.url_bytes, d.stateless, d.text) == (
        kind, recipient, listid, sendid, mailclass, instanceid, ctid, url, stateless, text)


@settings(max_examples=300, deadline=None)
@given(data=st.text(max_size=200))
def test_decode_fuzz_never_returns_unsigned_data(data: str) -> None:
    """Random input is an error, never a TrackingData (and never another exception)."""
    with pytest.raises(tu.TrackingDataError):
        tu.decode(data, C)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_byte_change_in_the_blob_rejected(pos: int, flip: int) -> None:
    import binascii

    data = make().encode()
    blob = bytearray(binascii.a2b_base64(data.translate(bytes.maketrans(b"-_", b"+/"))
                                         + b"=" * (-len(data) % 4)))
    blob[pos % len(blob)] ^= flip
    with pytest.raises(tu.TrackingDataError):
        tu.decode(tu.b64url(bytes(blob)), C)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), kinds=st.sampled_from([None, {tu.CLICK}, tu.KINDS]))
def test_decode_bytes_fuzz(data: bytes, kinds) -> None:
    """Any bytes (or bytearray): TrackingDataError, and nothing else."""
    for value in (data, bytearray(data)):
        with pytest.raises(tu.TrackingDataError):
            tu.decode(value, C, kinds=kinds)


VALID_DATA = [make(), make(kind=tu.MAILER_INFO, url=b""), make(kind=tu.OPEN, recipient="",
                                                              url=b"", stateless=False)]


@settings(max_examples=600, deadline=None)
@given(pick=st.integers(0, len(VALID_DATA) - 1), pos=st.integers(0, 400),
       action=st.sampled_from(["replace", "insert", "delete", "truncate", "repeat", "swapcase"]),
       char=st.characters(max_codepoint=0x2FF), as_bytes=st.booleans())
def test_decode_near_valid_mutations(pick, pos, action, char, as_bytes) -> None:
    """Valid DATA changed by one character, cut, repeated or with its case changed:
    TrackingDataError, or (a change that leaves the bytes as they were) the same fields."""
    data = VALID_DATA[pick]
    pos = pos % (len(data) + 1)
    mutated = {
        "replace": data[:pos] + char + data[pos + 1:],
        "insert": data[:pos] + char + data[pos:],
        "delete": data[:pos] + data[pos + 1:],
        "truncate": data[:pos],
        "repeat": data + data[pos:],
        "swapcase": data[:pos] + data[pos:].swapcase(),
    }[action]
    value = mutated.encode("utf-8") if as_bytes else mutated
    try:
        got = tu.decode(value, C)
    except tu.TrackingDataError:
        return
    assert mutated == data
    assert got.recipient == tu.decode(data, C).recipient


@settings(max_examples=300, deadline=None)
@given(url=st.one_of(st.text(max_size=200),
                     st.builds(lambda a, b: f"{BASE}/{a}?{b}", st.text(max_size=20),
                               st.text(max_size=60))))
def test_data_from_url_fuzz(url: str) -> None:
    """data_from_url: a (path, DATA) pair of strings or ValueError, for any text; what it
    finds then decodes to TrackingDataError unless it was made with the constants."""
    try:
        path, data = tu.data_from_url(url)
    except ValueError:
        return
    assert isinstance(path, str) and isinstance(data, str)
    with pytest.raises(tu.TrackingDataError):
        tu.decode(data, C)


# --------------------------------------------------------------------------- the compiled signer


@pytest.fixture(params=[True, False], ids=["sha-extensions", "portable"])
def sha_mode(request):
    """Run with the x86 SHA extensions (when the CPU has them) and with the portable C code."""
    from greenarrow.pyx import tracksign

    before = tracksign.sha_extensions()
    tracksign.sha_extensions(request.param)
    yield tracksign
    tracksign.sha_extensions(before)


@settings(max_examples=300, deadline=None)
@given(key=st.binary(max_size=100), msg=st.binary(max_size=700), cut=st.integers(0, 700))
def test_signer_is_hmac_sha256(key: bytes, msg: bytes, cut: int) -> None:
    import hmac

    from greenarrow.pyx import tracksign

    for mode in (True, False):
        tracksign.sha_extensions(mode)
        signer = tracksign.Signer(key)
        assert signer.digest(msg) == hmac.digest(key, msg, "sha256")
        prefix, url = msg[:cut], msg[cut:]
        expected = tu.b64url(msg + hmac.digest(key, msg, "sha256")[:10])
        assert signer.data(prefix, url) == expected
        assert signer.data(prefix, url) == expected  # from the cached prefix state
        assert signer.url(b"https://x/c?", prefix, url) == b"https://x/c?" + expected
        assert tracksign.b64url(msg) == tu.b64url(msg)
    tracksign.sha_extensions(True)


def test_signer_prefix_cache_holds_many(sha_mode) -> None:
    import hmac

    signer = sha_mode.Signer(b"k" * 32)
    prefixes = [bytes([i]) * (i * 7) for i in range(20)]
    for _ in range(3):
        for p in prefixes:
            assert signer.data(p, b"u") == tu.b64url(p + b"u" + hmac.digest(b"k" * 32, p + b"u",
                                                                            "sha256")[:10])


def test_encoder_replacements(sha_mode) -> None:
    enc = tu.Encoder(C, BASE, "b", "r@example.com", "t1", "s1", "news", "", "", False)
    reps = enc.replacements(["c", "u", "p", "s", "d"], [b"http://a/", b"http://u/", b"", b"T", b""],
                            True, b"<img src=\"", b"\">")
    assert reps[0] == enc.url(tu.CLICK, b"http://a/", True)
    assert tu.decode(tu.data_from_url(reps[1].decode())[1], C).kind == "u"
    assert reps[2] == b'<img src="' + enc.url(tu.OPEN, b"", True) + b'">'
    assert reps[3:] == [b"T", b""]


def test_signer_link_and_links_are_encode(sha_mode) -> None:
    """Signer.link/links (one recipient's fields packed once) make exactly encode()'s DATA."""
    signer = tu.signer(C)
    assert signer is tu.signer(C)  # cached
    fields = tu.pack_fields(("r@example.com", "t1", "s1", "news", "i1", "77"),
                            ("recipient", "listid", "sendid", "mailclass", "instanceid",
                             "click_tracking_id"))
    ids = ("r@example.com", "t1", "s1", "news", "i1", "77")
    for kind in (tu.MAILER_INFO, tu.LIST_UNSUBSCRIBE, tu.CLICK):
        for flags in (0, 1, 3):
            expected = tu.encode(C, kind, *ids, url=b"http://a/\xc3\xa9" * (kind == tu.CLICK),
                                 stateless=bool(flags & 1), text=bool(flags & 2))
            got = signer.link(b"B/", ord(kind), flags, fields,
                              b"http://a/\xc3\xa9" * (kind == tu.CLICK))
            assert got == b"B/" + expected.encode()
    enc = tu.Encoder(C, BASE, "c", *ids, True)
    kinds, targets = ["c", "u", "p", "s", "d", "c"], [b"http://a/", b"http://u/", b"", b"T", b"",
                                                      b"https://x/" * 40]
    bases = (enc._bases[tu.CLICK], enc._bases[tu.UNSUBSCRIBE], enc._bases[tu.OPEN])
    for text in (False, True):
        assert signer.links("".join(kinds).encode(), targets, fields, 1 | (2 if text else 0),
                            bases, b'<img src="', b'">') == enc.replacements(
            kinds, targets, text, b'<img src="', b'">')
        data, offsets = signer.links_packed("".join(kinds).encode(), targets, fields, 1, bases,
                                            b'<img src="', b'">')
        off = memoryview(offsets).cast("n").tolist()
        assert [data[a:b] for a, b in zip(off, off[1:], strict=False)] == signer.links(
            "".join(kinds).encode(), targets, fields, 1, bases, b'<img src="', b'">')
    with pytest.raises(ValueError):
        signer.links(b"cc", [b"x"], fields, 0, bases, b"", b"")
    with pytest.raises(ValueError):
        signer.links_packed(b"cc", [b"x"], fields, 0, bases, b"", b"")


def test_pack_fields_refuses_nul() -> None:
    assert tu.pack_fields(("a", "é"), ("x", "y")) == b"a\0\xc3\xa9\0"
    with pytest.raises(ValueError, match="y may not contain NUL"):
        tu.pack_fields(("a", "b\0"), ("x", "y"))


def test_link_id_is_carried_in_version_2_data_and_version_1_still_decodes() -> None:
    """A link with a user-defined id gets version-2 DATA carrying it; DATA made
    before link ids (version 1) decodes as it did, with no linkid."""
    old = make()
    assert tu.decode(old, C).linkid is None
    new = make(linkid="promo-1")
    assert tu.b64url(b"\x02")[:1] == new[:1].encode() == b"A"
    d = tu.decode(new, C)
    assert (d.kind, d.recipient, d.url, d.linkid) == (
        "c", "r@example.com", "https://example.com/a?x=1&y=2", "promo-1")
    assert tu.decode(make(linkid="é", url=b""), C).linkid == "é"
    for bad in ("", "a#b", "x\0y", "x" * 101):
        with pytest.raises(ValueError):
            make(linkid=bad)


def test_links_packed_signs_a_link_with_an_id_as_encode_does(sha_mode) -> None:
    """Slot kind "i" (an href ##linkid:ID##URL, target URL NUL ID) is encode(linkid=ID)."""
    ids = ("r@example.com", "t1", "s1", "news", "i1", "77")
    fields = tu.pack_fields(ids, ("recipient", "listid", "sendid", "mailclass", "instanceid",
                                  "click_tracking_id"))
    enc = tu.Encoder(C, BASE, "b", *ids, True)
    bases = (enc._bases[tu.CLICK], enc._bases[tu.UNSUBSCRIBE], enc._bases[tu.OPEN])
    data, offsets = tu.signer(C).links_packed(
        b"cii", [b"http://a/", b"http://a/\0spring-sale", b"http://b/\0x"], fields, 1, bases,
        b"", b"")
    off = memoryview(offsets).cast("n").tolist()
    urls = [data[a:b].decode() for a, b in zip(off, off[1:], strict=False)]
    assert urls[1] == BASE + "/click?" + tu.encode(C, tu.CLICK, *ids, url="http://a/",
                                                   stateless=True, linkid="spring-sale")
    assert [tu.decode(tu.data_from_url(u)[1], C).linkid for u in urls] == [
        None, "spring-sale", "x"]
    assert tu.decode(tu.data_from_url(urls[2])[1], C).url == "http://b/"
    assert enc.replacements(["c", "i", "i"], [b"http://a/", b"http://a/\0spring-sale",
                                              b"http://b/\0x"], False, b"", b"") == [
        u.encode() for u in urls]


def test_html_link_with_an_id_is_a_linkid_slot() -> None:
    from greenarrow.pyx import simplemh

    html = (b'<a href="##linkid:promo-1##https://ex.test/a?b=1&amp;c=2">x</a>'
            b'<a href="https://ex.test/z">z</a><a href="##linkid:##https://ex.test/y">no id</a>'
            b'<a href="##LinkID:t##mailto:a@ex.test">m</a>')
    spans, kinds, targets = simplemh.html_link_slots(html, True, True, ())
    assert kinds == ["i", "c", "s", "p"]
    assert targets[:3] == [b"https://ex.test/a?b=1&c=2\0promo-1", b"https://ex.test/z",
                           b"mailto:a@ex.test"]
    # click tracking off: the tag is taken out, the URL left as written
    spans, kinds, targets = simplemh.html_link_slots(html, False, True, ())
    assert kinds == ["s", "s"]
    assert targets == [b"https://ex.test/a?b=1&amp;c=2", b"mailto:a@ex.test"]
