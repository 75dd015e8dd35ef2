"""Bad input for the bounce parsers: never an exception, never a hang.

Hypothesis drives random bytes, mutated corpus bounces and hostile MIME
structure through `classify_message` and `bounce_text`. "Bounded time" is
held by pytest-timeout on each test (no timed assertions): a regex that
backtracks without end, or a loop that does not stop, fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenarrow.lib.feedback.bounce_parse import MAX_PARSE_BYTES
from greenarrow.lib.feedback.classify import bounce_text, classify_message

CORPUS = Path("/work/shared/corpus/sisimai/maildir/bsd")
SEEDS = sorted(CORPUS.glob("*.eml"))[:40] if CORPUS.is_dir() else []
FALLBACK = (b"From: MAILER-DAEMON@x.example\nSubject: Undelivered Mail\n"
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
            b"--b\nContent-Type: message/delivery-status\n\nFinal-Recipient: rfc822; a@b.example\n"
            b"Action: failed\nStatus: 5.1.1\n\n--b--\n")


def check(data: bytes) -> None:
    c = classify_message(data)
    assert isinstance(c.is_bounce, bool)
    for r in c.results:
        assert r.bounce_type in ("h", "s", "o")
        assert isinstance(r.bounce_code, int)
        assert len(r.text) <= 1024
    assert len(bounce_text(data).encode("utf-8")) <= 1024


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.timeout(300)
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    check(data)


@st.composite
def mutated_bounce(draw) -> bytes:
    seed = SEEDS[draw(st.integers(0, len(SEEDS) - 1))].read_bytes() if SEEDS else FALLBACK
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(("flip", "cut", "insert", "dup")))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 200))]
        elif op == "insert":
            data[at:at] = draw(st.sampled_from((b"\r", b"\n\n", b"--", b"\x00", b"boundary=\"\"",
                                                b"Content-Type: multipart/mixed; boundary=x\n",
                                                b"Content-Transfer-Encoding: base64\n",
                                                b"=\n", b"<<< 550 ", b"@", b"\xff\xfe")))
        else:
            end = min(len(data), at + draw(st.integers(1, 300)))
            data[at:at] = data[at:end] * draw(st.integers(1, 20))
    if draw(st.booleans()):
        data = data.replace(b"\n", b"\r")  # CR-only line endings
    return bytes(data)


@pytest.mark.timeout(300)
@FUZZ
@given(mutated_bounce())
def test_mutated_bounces(data: bytes) -> None:
    check(data)


@st.composite
def hostile_mime(draw) -> bytes:
    depth = draw(st.integers(1, 60))
    parts = []
    for i in range(depth):
        parts.append(f"Content-Type: multipart/mixed; boundary=\"b{i}\"\n\n--b{i}\n".encode())
    leaf = draw(st.sampled_from((
        b"Content-Type: message/delivery-status\n\n" + b"Final-Recipient: rfc822; a@b.example\n" * 500,
        b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n!!!not base64===\n",
        b"Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n=ZZ=\n=",
        b"Content-Type: message/rfc822\n\n" + b"X: " + b"a" * 100000 + b"\n",
        b"Content-Type: text/html\n\n<" + b"<" * 50000,
    )))
    return b"From: MAILER-DAEMON@x.example\nSubject: failure notice\n" + b"".join(parts) + leaf


@pytest.mark.timeout(300)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_mime())
def test_hostile_mime_structure(data: bytes) -> None:
    check(data)


@pytest.mark.timeout(300)
def test_fifty_megabyte_bounce_is_read_only_up_to_the_limit() -> None:
    head = FALLBACK.replace(b"--b--\n", b"--b\nContent-Type: message/rfc822\n\nSubject: big\n\n")
    data = head + (b"A" * 76 + b"\n") * (50 * 1024 * 1024 // 77) + b"\n--b--\n"
    assert len(data) > 50 * 1000 * 1000 > MAX_PARSE_BYTES
    c = classify_message(data)
    assert [r.recipient for r in c.results] == ["a@b.example"]
    assert len(bounce_text(data).encode("utf-8")) <= 1024


@pytest.mark.timeout(300)
def test_pathological_lines_do_not_hang() -> None:
    for data in (
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + b"a@" * 200000,
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + (b"x" * 100 + b"@b.example ") * 20000,
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + b">>> DATA\n<<< 550 " * 50000,
        b"Subject: x\n" + b" folded\n" * 200000 + b"\nbody",
        b"\r" * 1000000,
        b"\x00" * 1000000,
    ):
        check(data)
