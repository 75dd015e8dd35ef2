"""The tracker's answers and events without sockets (greenarrow.lib.tracker.answer, privacy_open).

What each kind of DATA answers and records, the unsubscribe redirect's
appended recipient, one-click bodies, the event ids (one unsubscribe per
message, distinct clicks), MPP detection and the ranges file; every byte
and bit of a DATA changed must answer 404 and record nothing.
"""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from greenarrow.lib.events.types import FIELDS
from greenarrow.lib.simplemh import tracking_url as tu
from greenarrow.lib.tracker import answer as A
from greenarrow.lib.tracker import pages, privacy_open
from greenarrow.lib.tracker.settings import TrackerSettings

C = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
OTHER = ("00000000000000000000000000000000", "fedcba9876543210fedcba9876543210")
MPP_UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
SAFARI_UA = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko) Version/17.0 Safari/605.1.15")
APPLE_NET = "172.224.226.0/27"  # an Apple egress range, as in the shipped file
NOW = 1_700_000_000_123_456_789


def settings(include_user_agent: bool = True, ranges: list[str] | None = None) -> TrackerSettings:
    nets = [ipaddress.ip_network(n) for n in (ranges if ranges is not None else [APPLE_NET])]
    return TrackerSettings(C, "srv1", include_user_agent, privacy_open.EgressRanges(nets))


def data(kind: str = tu.CLICK, url: str = "https://example.com/a?x=1&y=2#top",
         constants: tuple[str, str] = C, **kw: object) -> str:
    fields = dict(recipient="r@example.com", listid="t100", sendid="news-1", mailclass="news",
                  instanceid="0901220005", click_tracking_id="42", stateless=True)
    fields.update(kw)
    return tu.encode(constants, kind, url=url, **fields)


def request(target: str, method: str = "GET", ip: str = "192.0.2.7", ua: str = "Test/1.0",
            ctype: str = "", body: bytes = b"") -> A.Request:
    return A.Request(method, target, ip, ua, ctype, body)


def ask(req: A.Request, s: TrackerSettings | None = None, serial: str = "1") -> A.Reply:
    return A.answer(req, s or settings(), NOW, serial)


@pytest.mark.parametrize("fmt", tu.FORMATS)
@pytest.mark.parametrize("prefix", ["", "/t", "/deep/er"])
def test_click_redirects_to_the_target_and_records_engine_click(fmt: str, prefix: str) -> None:
    d = data()
    target = tu.tracking_url(prefix, fmt, tu.CLICK, d)
    reply = ask(request(target))
    assert reply.status == 302
    assert dict(reply.headers)["Location"] == "https://example.com/a?x=1&y=2#top"
    assert reply.body == b""
    event = reply.event
    assert list(event) == list(FIELDS["engine_click"])
    assert event["event_type"] == "engine_click"
    assert event["event_time"] == NOW // 10**9
    assert event["server_id"] == "srv1"
    assert len(event["event_unique_id"]) == 64
    assert (event["email"], event["listid"], event["sendid"], event["click_url"],
            event["click_tracking_id"], event["engine_ip"], event["user_agent"],
            event["linkid"], event["mailclass"], event["instanceid"]) == (
        "r@example.com", "t100", "news-1", "https://example.com/a?x=1&y=2#top", "42",
        "192.0.2.7", "Test/1.0", None, "news", "0901220005")


def test_the_kind_inside_data_decides_not_the_path() -> None:
    """An open DATA under /click is an open; a click DATA under /open is a click."""
    reply = ask(request("/click?" + data(tu.OPEN, url="")))
    assert reply.status == 200 and reply.body == pages.PIXEL_GIF
    assert reply.event["event_type"] == "engine_open"
    reply = ask(request("/unsub/" + data()))
    assert reply.status == 302 and reply.event["event_type"] == "engine_click"


def test_user_agent_recorded_only_when_allowed() -> None:
    reply = ask(request("/click?" + data()), settings(include_user_agent=False))
    assert reply.event["user_agent"] is None
    reply = ask(request("/open?" + data(tu.OPEN, url="")), settings(include_user_agent=False))
    assert reply.event["user_agent"] is None


def test_open_answers_a_transparent_gif_without_caching() -> None:
    reply = ask(request("/open/" + data(tu.OPEN, url="")))
    headers = dict(reply.headers)
    assert reply.status == 200 and headers["Content-Type"] == "image/gif"
    assert reply.body[:6] == b"GIF89a" and reply.body[6:10] == b"\x01\x00\x01\x00"
    assert "no-cache" in headers["Cache-Control"] and "no-store" in headers["Cache-Control"]
    assert headers["Pragma"] == "no-cache"
    event = reply.event
    assert list(event) == list(FIELDS["engine_open"])
    assert event["is_privacy_open"] is False
    assert event["engine_ip"] == "192.0.2.7"


def test_privacy_open_needs_apple_address_and_apple_proxy_agent() -> None:
    target = "/open?" + data(tu.OPEN, url="")
    apple_ip = "172.224.226.5"
    assert ask(request(target, ip=apple_ip, ua=MPP_UA)).event["is_privacy_open"] is True
    assert ask(request(target, ip=apple_ip, ua=SAFARI_UA)).event["is_privacy_open"] is False
    assert ask(request(target, ip="192.0.2.7", ua=MPP_UA)).event["is_privacy_open"] is False
    # flagged, never dropped: the event is there either way
    assert ask(request(target, ip=apple_ip, ua=MPP_UA)).status == 200


def test_unsubscribe_link_records_engine_unsub_and_appends_the_recipient() -> None:
    d = data(tu.UNSUBSCRIBE, url="https://example.com/unsub?u=9#done",
             recipient="a+b@example.com", sendid="s 1", listid="l&2")
    reply = ask(request("/click?qs=" + d))
    assert reply.status == 302
    assert dict(reply.headers)["Location"] == (
        "https://example.com/unsub?u=9&email=a%2Bb%40example.com&sendid=s%201&listid=l%262#done")
    event = reply.event
    assert list(event) == list(FIELDS["engine_unsub"])
    assert event["event_type"] == "engine_unsub"
    assert event["click_url"] == "https://example.com/unsub?u=9#done"
    assert (event["email"], event["sendid"], event["listid"]) == ("a+b@example.com", "s 1", "l&2")


@pytest.mark.parametrize(("url", "expected"), [
    ("http://x.test/", "http://x.test/?email=e&sendid=s&listid=l"),
    ("http://x.test/?", "http://x.test/?email=e&sendid=s&listid=l"),
    ("http://x.test/?a=1&", "http://x.test/?a=1&email=e&sendid=s&listid=l"),
    ("http://x.test/p#f?g", "http://x.test/p?email=e&sendid=s&listid=l#f?g"),
])
def test_with_recipient(url: str, expected: str) -> None:
    assert A.with_recipient(url, "e", "s", "l") == expected


def test_list_unsubscribe_get_shows_a_confirmation_page_and_records_nothing() -> None:
    target = "/unsub?" + data(tu.LIST_UNSUBSCRIBE, url="")
    for method in ("GET", "HEAD"):
        reply = ask(request(target, method))
        assert reply.status == 200 and reply.event is None
        assert b'name="List-Unsubscribe" value="One-Click"' in reply.body
        assert b'method="post"' in reply.body
        assert "Location" not in dict(reply.headers)


@pytest.mark.parametrize(("ctype", "body"), [
    ("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click"),
    ("", b"List-Unsubscribe=One-Click"),
    ("multipart/form-data; boundary=XyZ",
     b'--XyZ\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
     b"One-Click\r\n--XyZ--\r\n"),
])
def test_one_click_post_records_engine_unsub_with_blank_click_url(ctype: str, body: bytes) -> None:
    target = "/unsub?" + data(tu.LIST_UNSUBSCRIBE, url="")
    reply = ask(request(target, "POST", ctype=ctype, body=body))
    assert reply.status == 200 and "Location" not in dict(reply.headers)
    assert reply.body == pages.DONE_PAGE
    assert reply.event["event_type"] == "engine_unsub"
    assert reply.event["click_url"] == ""


@pytest.mark.parametrize("body", [b"", b"List-Unsubscribe=Yes", b"x=One-Click", b"\xff"])
def test_post_without_one_click_records_nothing(body: bytes) -> None:
    target = "/unsub?" + data(tu.LIST_UNSUBSCRIBE, url="")
    reply = ask(request(target, "POST", ctype="application/x-www-form-urlencoded", body=body))
    assert reply.status == 200 and reply.event is None and reply.body == pages.CONFIRM_PAGE


def test_repeated_unsubscribe_is_one_event_and_clicks_are_distinct() -> None:
    lu = "/unsub?" + data(tu.LIST_UNSUBSCRIBE, url="")
    post = dict(method="POST", body=b"List-Unsubscribe=One-Click")
    first = A.answer(request(lu, **post), settings(), NOW, "1").event
    again = A.answer(request(lu, **post), settings(), NOW + 10**12, "2").event
    assert first["event_unique_id"] == again["event_unique_id"]
    link = "/click?" + data(tu.UNSUBSCRIBE, url="https://example.com/u")
    assert (A.answer(request(link), settings(), NOW, "1").event["event_unique_id"]
            == A.answer(request(link), settings(), NOW + 5, "2").event["event_unique_id"])
    click = "/click?" + data()
    ids = {A.answer(request(click), settings(), NOW, str(n)).event["event_unique_id"]
           for n in range(50)}
    ids |= {A.answer(request(click), settings(), NOW + n, "1").event["event_unique_id"]
            for n in range(1, 51)}
    assert len(ids) == 100


def test_head_answers_without_recording() -> None:
    for kind, url in ((tu.CLICK, "https://example.com/"), (tu.OPEN, ""),
                      (tu.UNSUBSCRIBE, "https://example.com/u")):
        reply = ask(request("/click?" + data(kind, url=url), "HEAD"))
        assert reply.event is None and reply.head_only and reply.status in (200, 302)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH"])
def test_other_methods_are_refused(method: str) -> None:
    reply = ask(request("/click?" + data(), method))
    assert reply.status == 405 and reply.event is None
    assert dict(reply.headers)["Allow"] == "GET, HEAD, POST"


def _never_redirects(reply: A.Reply) -> None:
    assert reply.status == 404, reply
    assert reply.event is None
    assert "Location" not in dict(reply.headers)
    assert reply.body == pages.NOT_FOUND


def test_every_changed_byte_and_bit_of_data_is_a_404() -> None:
    d = data()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(d):
        for other in (alphabet[(alphabet.index(ch) + 1) % 64],
                      alphabet[(alphabet.index(ch) + 32) % 64]):
            _never_redirects(ask(request("/click?" + d[:i] + other + d[i + 1:])))
    # and in the decoded bytes, every bit
    blob = base64.urlsafe_b64decode(d + "=" * (-len(d) % 4))
    for i in range(len(blob)):
        for bit in range(8):
            changed = bytearray(blob)
            changed[i] ^= 1 << bit
            raw = tu.b64url(bytes(changed)).decode()
            _never_redirects(ask(request("/click?" + raw)))


def test_truncated_foreign_and_missing_data_are_404() -> None:
    d = data()
    for n in range(len(d)):
        _never_redirects(ask(request("/click?" + d[:n])))
    _never_redirects(ask(request("/click?" + data(constants=OTHER))))
    _never_redirects(ask(request("/click?" + data(tu.MAILER_INFO, url=""))))
    for target in ("/", "/click", "/click?", "/favicon.ico", "/click?qs=", "/click/%41%41",
                   "/click?" + d + "%00", "//evil.example/", "/click?qs=" + d[:-1] + "="):
        _never_redirects(ask(request(target)))


def test_only_http_targets_are_redirected_to() -> None:
    for url in ("javascript:alert(1)", "//evil.example/", "data:text/html,x", "ftp://x.test/"):
        _never_redirects(ask(request("/click?" + data(url=url))))


def test_target_with_unsafe_bytes_is_escaped_in_location() -> None:
    reply = ask(request("/click?" + data(url="https://example.com/\u00e9 x\r\nSet-Cookie: a")))
    location = dict(reply.headers)["Location"]
    assert location == "https://example.com/%C3%A9%20x%0D%0ASet-Cookie:%20a"
    assert reply.event["click_url"] == location


def test_stateless_and_local_data_both_carry_everything() -> None:
    for stateless in (True, False):
        reply = ask(request("/click?" + data(stateless=stateless)))
        assert reply.event["email"] == "r@example.com" and reply.status == 302


# -- the ranges file ----------------------------------------------------------


def test_shipped_ranges_load_and_match() -> None:
    ranges = privacy_open.read_ranges(privacy_open.SHIPPED)
    assert ranges.count > 1000
    assert "172.224.226.5" in ranges
    assert "192.0.2.1" not in ranges
    assert "::ffff:172.224.226.5" in ranges
    assert "not an address" not in ranges


def test_ranges_lookup_matches_ipaddress_at_every_edge() -> None:
    nets = [ipaddress.ip_network(n) for n in
            ("10.0.0.0/30", "10.0.0.4/30", "10.0.1.0/24", "2001:db8::/64", "2001:db8:1::/48")]
    ranges = privacy_open.EgressRanges(nets)
    probes = ["9.255.255.255", "10.0.0.0", "10.0.0.7", "10.0.0.8", "10.0.0.255", "10.0.1.0",
              "10.0.1.255", "10.0.2.0", "2001:db8::", "2001:db8::ffff:ffff:ffff:ffff",
              "2001:db8:0:1::", "2001:db8:1:ffff::1", "2001:db8:2::"]
    for probe in probes:
        ip = ipaddress.ip_address(probe)
        assert (probe in ranges) == any(ip in n for n in nets), probe


def test_install_takes_apples_csv_and_refuses_bad_files(tmp_path: Path) -> None:
    csv = tmp_path / "egress-ip-ranges.csv"
    csv.write_text("172.224.0.0/16,US,US-CA,Cupertino\n2a02:26f7::/32,GB,GB-EN,London\n\n")
    count, path = privacy_open.install(tmp_path / "var", csv)
    assert count == 2 and path == tmp_path / "var" / privacy_open.INSTALLED_NAME
    loaded = privacy_open.load(tmp_path / "var")
    assert "172.224.9.9" in loaded and "2a02:26f7::1" in loaded and "17.0.0.1" not in loaded
    bad = tmp_path / "bad.csv"
    bad.write_text("172.224.0.0/16,US\n<html>oops</html>\n")
    with pytest.raises(privacy_open.RangesError, match=r"bad.csv:2"):
        privacy_open.install(tmp_path / "var", bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(privacy_open.RangesError, match="no address ranges"):
        privacy_open.install(tmp_path / "var", empty)
    assert "172.224.9.9" in privacy_open.load(tmp_path / "var")  # the good copy stays


@pytest.mark.parametrize(("ua", "expected"), [
    (MPP_UA, True),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko)", True),
    (SAFARI_UA, False),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Mobile/15E148", False),
    ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
     False),
    ("", False),
])
def test_mpp_agent_pattern(ua: str, expected: bool) -> None:
    ranges = privacy_open.EgressRanges([ipaddress.ip_network(APPLE_NET)])
    assert privacy_open.is_privacy_open(ranges, "172.224.226.1", ua) is expected


def test_spool_rotates_and_never_prunes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder deletes committed spool files; the tracker keeps every one it rotated."""
    from greenarrow.lib.core.paths import Root
    from greenarrow.lib.core.rotating_log import rotated_files
    from greenarrow.lib.tracker import spool

    monkeypatch.setattr(spool, "MAX_BYTES", 600)
    root = Root(tmp_path)
    log = spool.open_spool(root)
    sent = []
    for n in range(60):
        reply = ask(request("/click?" + data(url=f"https://example.com/{n}")), serial=str(n))
        log.write_bytes(spool.event_line(reply.event))
        sent.append(reply.event)
    log.close()
    assert len(rotated_files(spool.spool_dir(root))) > 25  # more than RotatingLog's default keep
    assert spool.read_events(spool.spool_dir(root)) == sent
