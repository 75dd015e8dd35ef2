"""What an event server reads from sending servers: their tracking DATA, bounce addresses
and qmail-style bounces, including what older versions of the engine made.

Seed 000 ("Software Upgrade Considerations"): event servers are upgraded
before sending servers, so an event server must read what a sending server
of the previous version made. The samples below were made by this version's
encoders (tracking DATA versions 1 and 2, bounce address versions 5-8) and are kept
as they were: when a format changes, these must still decode.
"""

from __future__ import annotations

import hmac

import pytest

from greenarrow.lib.feedback import classify, feedback_message
from greenarrow.lib.queue import failure_notice
from greenarrow.lib.routing import incoming
from greenarrow.lib.simplemh import return_path, tracking_url

C = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
IDENTITY = ("ann@dest.example", "split1", "news-2001", "news", "2001", "ct-9")
LONG = "a-very-long-recipient-local-part-that-does-not-fit@dest.example"

# Tracking DATA version 1, stateless, one of each kind (url only for c and u).
DATA_V1 = {
    "c": "AWMBYW5uQGRlc3QuZXhhbXBsZQBzcGxpdDEAbmV3cy0yMDAxAG5ld3MAMjAwMQBjdC05AGh0dHBzOi8vc2hvcC5"
         "leGFtcGxlLmNvbS9wLzE2I5IHFqoZWqgj",
    "u": "AXUBYW5uQGRlc3QuZXhhbXBsZQBzcGxpdDEAbmV3cy0yMDAxAG5ld3MAMjAwMQBjdC05AGh0dHBzOi8vc2hvcC5"
         "leGFtcGxlLmNvbS9wLzEerXQ8DRmRol4r",
    "o": "AW8BYW5uQGRlc3QuZXhhbXBsZQBzcGxpdDEAbmV3cy0yMDAxAG5ld3MAMjAwMQBjdC05AJWQhQAUfzEA_aY",
    "l": "AWwBYW5uQGRlc3QuZXhhbXBsZQBzcGxpdDEAbmV3cy0yMDAxAG5ld3MAMjAwMQBjdC05AG9wQbJxFhcmfh4",
    "m": "AW0BYW5uQGRlc3QuZXhhbXBsZQBzcGxpdDEAbmV3cy0yMDAxAG5ld3MAMjAwMQBjdC05ADL_199qMuNyuJE",
}
# Tracking DATA version 2: a click on a link with a user-defined id (##linkid:hero-button##).
DATA_V2_CLICK = ("AmMBYW5uQGRlc3QuZXhhbXBsZQBzcGxpdDEAbmV3cy0yMDAxAG5ld3MAMjAwMQBjdC05AGh0dHBzOi8vc2hv"
                 "cC5leGFtcGxlLmNvbS9wLzEAaGVyby1idXR0b24G5RQLNnhhVzTQ")
# The X-Mailer-Info that goes with the short forms below.
LONG_INFO = ("AW0BYS12ZXJ5LWxvbmctcmVjaXBpZW50LWxvY2FsLXBhcnQtdGhhdC1kb2VzLW5vdC1maXRAZGVzdC5leGF"
             "tcGxlAHNwbGl0MQBuZXdzLTIwMDEAbmV3cwAyMDAxAGN0LTkAPbLMAscD0MrKUA")
# Bounce addresses of versions 5-8 (mailbox return@bounce.example.com).
ADDRESSES = {
    "5": "return-split1-news=2d2001-ann=40dest.example-5dsc3w77n@bounce.example.com",
    "6": "return-split1-66ysw2747@bounce.example.com",
    "7": "return-split1-news=2d2001-ann=40dest.example-7yaqkwrwl@bounce.example.com",
    "8": "return-split1-8dkivc2iw@bounce.example.com",
}


@pytest.mark.parametrize("kind", sorted(DATA_V1))
def test_tracking_data_of_version_1_decodes(kind: str) -> None:
    data = tracking_url.decode(DATA_V1[kind], C)
    assert (data.kind, data.stateless, data.text) == (kind, True, False)
    assert (data.recipient, data.listid, data.sendid, data.mailclass, data.instanceid,
            data.click_tracking_id) == IDENTITY
    assert data.url == ("https://shop.example.com/p/1" if kind in "cu" else "")
    # today's encoder still makes exactly this: a change of layout needs a new version
    url = data.url if kind in "cu" else ""
    assert tracking_url.encode(C, kind, *IDENTITY, url=url, stateless=True) == DATA_V1[kind]


def test_tracking_data_of_version_2_decodes() -> None:
    data = tracking_url.decode(DATA_V2_CLICK, C)
    assert (data.kind, data.url, data.linkid) == ("c", "https://shop.example.com/p/1",
                                                  "hero-button")
    assert (data.recipient, data.listid, data.sendid, data.mailclass, data.instanceid,
            data.click_tracking_id) == IDENTITY
    assert tracking_url.encode(C, "c", *IDENTITY, url=data.url, stateless=True,
                               linkid="hero-button") == DATA_V2_CLICK


def _signed(version: int) -> str:
    payload = bytes((version,)) + tracking_url._payload(
        "c", tracking_url.FLAG_STATELESS, IDENTITY, b"https://shop.example.com/")[1:]
    tag = hmac.digest(tracking_url.derive_key(C), payload, "sha256")[:tracking_url.TAG_BYTES]
    return tracking_url.b64url(payload + tag).decode("ascii")


def test_a_version_the_engine_does_not_know_is_refused() -> None:
    """DATA of a future version (a newer sending server) is refused, never misread."""
    with pytest.raises(tracking_url.TrackingDataError,
                       match="unknown tracking data version 200"):
        tracking_url.decode(_signed(200), C)
    assert tracking_url.decode(_signed(tracking_url.VERSION), C).url == "https://shop.example.com/"


@pytest.mark.parametrize("version", sorted(ADDRESSES))
def test_bounce_addresses_of_versions_5_to_8_decode(version: str) -> None:
    short = version in ("6", "8")
    decoded = return_path.decode(ADDRESSES[version], C, LONG_INFO if short else None)
    recipient = LONG if short else "ann@dest.example"
    assert (decoded.recipient, decoded.listid, decoded.sendid) == (recipient, "split1",
                                                                   "news-2001")
    assert (decoded.version, decoded.short, decoded.unsubscribe, decoded.domain_bound) == (
        version, short, version in ("7", "8"), True)
    # today's encoder still makes exactly this
    assert return_path.encode("return@bounce.example.com", "split1", "news-2001", recipient, C,
                              version in ("7", "8")) == ADDRESSES[version]


def _original() -> bytes:
    """A sending server's copy as it went out: X-Mailer-Info folded, as SimpleMH writes it."""
    info = DATA_V1["m"]
    return (f"Received: by send1.split.test (GreenArrow);\r\n\tFri, 04 Dec 2026 20:28:12 +0000\r\n"
            f"From: Shop <news@origin.example>\r\nTo: ann@dest.example\r\nSubject: hi\r\n"
            f"X-Mailer-Info: {info[:60]}\r\n {info[60:]}\r\n\r\n<html>hi</html>\r\n").encode()


@pytest.mark.parametrize("quote", ["", "> ", "   "])
def test_qsbf_of_a_sending_server_gives_the_whole_identity(quote: str) -> None:
    """The quoted copy's folded X-Mailer-Info is read whole, so the event server's
    bounce_all has the Mail Class, InstanceID and click tracking id (seed 003)."""
    original = _original()
    if quote:
        original = b"\r\n".join(quote.encode() + line for line in original.split(b"\r\n"))
    bounce = failure_notice.make_bounce(
        "send1.split.test", ADDRESSES["5"], "ann@dest.example",
        "Remote host said: 550 5.1.1 no such user", original, 5120, "m1")
    result = classify.classify_message(bounce, constants=C)
    assert result.mailer_info == DATA_V1["m"]
    who, why = feedback_message.identity([ADDRESSES["5"]], result.mailer_info, C, frozenset())
    assert who is not None, why
    assert (who.email, who.listid, who.sendid, who.mailclass, who.instanceid,
            who.click_tracking_id) == IDENTITY


FBL = incoming.Mailbox("bounce.example.com", "fbl", incoming.SPAM_COMPLAINT, "/nonexistent")
SETTINGS = feedback_message.Settings(server_id="event.example.com", constants=C)


def _pasted(headers: bytes, content_type: str = "text/plain") -> bytes:
    return (b"Delivered-To: fbl@bounce.example.com\r\nFrom: someone@dest.example\r\n"
            b"To: fbl@bounce.example.com\r\nSubject: look at this\r\n"
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n"
            b"I never asked for this. The headers:\r\n\r\n" + headers + b"\r\n")


@pytest.mark.parametrize("quote", [b"", b"> "])
def test_headers_pasted_into_a_message_to_the_complaint_mailbox_are_a_complaint(
        quote: bytes) -> None:
    """Seed 000's test step 5: the raw headers mailed to the spam complaint mailbox."""
    headers = _original().split(b"\r\n\r\n")[0]
    text = b"\r\n".join(quote + line for line in headers.split(b"\r\n"))
    outcome = feedback_message.analyse(_pasted(text), FBL, 1_700_000_000, "k", SETTINGS)
    assert not outcome.refused, outcome.refused
    (event,) = outcome.events
    assert event["event_type"] == "scomp"
    assert (event["email"], event["listid"], event["sendid"], event["mailclass"],
            event["instanceid"], event["click_tracking_id"]) == IDENTITY


@pytest.mark.parametrize("headers", [
    b"From: a@b\r\nSubject: no identity here",
    # a DATA changed by one character fails verification
    b"X-Mailer-Info: " + DATA_V1["m"][:-1].encode() + (b"A" if DATA_V1["m"][-1] != "A" else b"B"),
    b"X-Mailer-Info: " + DATA_V1["c"].encode(),  # a link's DATA is not an X-Mailer-Info
])
def test_pasted_text_without_a_valid_mailer_info_is_refused(headers: bytes) -> None:
    outcome = feedback_message.analyse(_pasted(headers), FBL, 1_700_000_000, "k", SETTINGS)
    assert outcome.refused and not outcome.events
