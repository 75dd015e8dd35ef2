"""SimpleMH processing speed: the Cython byte path against the same result made with `email`.

Usage (from the repository root):

    python -m bench.simplemh_bench [--n 5000] [--rounds 5] [--cpu 0] [--markdown]

One message is processed again and again on one core (the process is
pinned to `--cpu`): a realistic ~20 KB newsletter, multipart/alternative,
UTF-8, both parts quoted-printable, 30 links in the HTML part (one of them an
`##unsubscribetag##` link, plus mailto: and #anchor links that stay) and 10
URLs in the text part, with X-GreenArrow-MailClass/-InstanceID/
-Click-Tracking-ID headers. "Full SimpleMH processing" is what injection
does between reading the message and writing the queue entry:
`injection.prepare()` (header scan, identifiers, Mail Class, every
X-GreenArrow-* header; the MIME walk, decoding and link finding, once per
message), `sender(recipient)` (the bounce address) and
`message_for(recipient)` (signed links, open pixel, re-encoding,
X-Mailer-Info, List-Unsubscribe), for one recipient.

The comparisons produce the same message with Python's `email` package
and the standard library only (`hmac` signatures through PyEncoder, `re`
for the links, `quopri`/`base64` for the encodings):
`email_simplemh()` with the legacy compat32 API, the fastest way to use the
package (parse, walk, get_payload(decode=True), rewrite, set_payload,
BytesGenerator), and `email_simplemh_modern()` with the documented
policy.default API (get_content()/set_content()). Option resolution is
shared code, so the paths differ only in how they handle the message; the
script checks that all three give the same decoded text parts and the same
headers before it measures anything.

Figures: messages per second and MB/s (input bytes) for each, from CPU
time (the figure to read on a shared machine) and wall time, and the
ratios. Results are recorded in bench/RESULTS-simplemh.md.
"""

from __future__ import annotations

import argparse
import hmac
import os
import quopri
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from email import message_from_bytes, policy
from email.generator import BytesGenerator
from io import BytesIO
from pathlib import Path

from bench.machine import describe, loadavg
from greenarrow.lib.core import message as msglib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject import accept as injection
from greenarrow.lib.ops.install_root import init_root
from greenarrow.lib.simplemh import mail_class
from greenarrow.lib.simplemh import processing as simplemh
from greenarrow.lib.simplemh import return_path as bounce_address
from greenarrow.lib.simplemh import tracking_url as tu

RCPT = "subscriber.name@example.net"
SENDER = "news@shop.example.com"
CONF = """\
mail_class newsletter {
    listid news
    virtual_mta pool1
    track_clicks_and_opens yes
    url_domain https://links.example.com
    bounce_address bounce@bounces.example.com
    statistic_report_grouping per_mailclass_and_instanceid
}
"""
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua caf\u00e9 na\u00efve \u00fcber "
         "r\u00e9sum\u00e9 offer sale new collection free shipping members only").split()


# --------------------------------------------------------------------------- the message


def make_message(seed: int = 7) -> bytes:
    """A deterministic ~20 KB newsletter with 30 HTML links and 10 text URLs (CRLF)."""
    rng = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    urls = [f"https://shop.example.com/product/{1000 + i}?utm_source=newsletter"
            f"&utm_medium=email&utm_campaign=spring&ref={rng.randrange(10**6)}" for i in range(28)]
    html = ['<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Spring</title>',
            "<style>td{font-family:Arial,sans-serif;font-size:14px;color:#333}</style></head>",
            '<body style="margin:0;padding:0;background:#f4f4f4">',
            '<table role="presentation" width="100%" cellpadding="0" cellspacing="0">']
    for i, url in enumerate(urls):
        html.append(
            f'<tr><td style="padding:12px 24px;border-bottom:1px solid #eee">'
            f'<a href="{url.replace("&", "&amp;")}" style="color:#0066cc;text-decoration:none">'
            f'<img src="https://cdn.example.com/img/{i}.jpg" width="120" height="90" alt="item {i}">'
            f"</a><p>{sentence(32)}</p></td></tr>")
    html.append('<tr><td><a href="https://www.example.com/">Visit us</a> | '
                '<a href="mailto:help@example.com">Help</a> | <a href="#top">Top</a></td></tr>')
    html.append('<tr><td style="font-size:11px">You get this because you subscribed. '
                '<a href="##unsubscribetag##https://www.example.com/unsubscribe?u=123">'
                "Unsubscribe</a></td></tr></table></body></html>\n")
    text = ["Spring collection\n"]
    for url in urls[:10]:
        text.append(f"{sentence(30)}\n{url}\n\n")
    boundary = "----=_Part_1234_5678.1700000000000"
    parts = [
        "From: Example Shop <news@shop.example.com>",
        f"To: <{RCPT}>",
        "Subject: =?utf-8?q?Spring_collection_=E2=80=94_new_arrivals?=",
        "MIME-Version: 1.0",
        "X-GreenArrow-MailClass: newsletter",
        "X-GreenArrow-InstanceID: spring-2026-04",
        "X-GreenArrow-Click-Tracking-ID: 9876543",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        quopri.encodestring("".join(text).encode()).decode(),
        f"--{boundary}",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        quopri.encodestring("\n".join(html).encode()).decode(),
        f"--{boundary}--",
        "",
    ]
    return msglib.to_crlf("\n".join(parts).encode())


# --------------------------------------------------------------------------- the email-package path

HREF = re.compile(r"""(<(?:a|area)\b[^>]*?\bhref\s*=\s*)("[^"]*"|'[^']*'|[^\s>]+)""", re.I)
TEXT_URL = re.compile(r"(?<![A-Za-z0-9])(?:##unsubscribetag##)?https?://[^\s<>\"]+", re.I)
BODY_CLOSE = re.compile(r"</body", re.I)
GENERATOR_POLICY = policy.compat32.clone(linesep="\r\n")


class PyEncoder:
    """tracking_url.Encoder's output made with the standard library only (hmac, binascii)."""

    def __init__(self, constants: tuple[str, str], base: str, fmt: str, recipient: str,
                 listid: str, sendid: str, mailclass: str, instanceid: str,
                 click_tracking_id: str, stateless: bool) -> None:
        self.key = tu.derive_key(constants)
        self.fields = "\0".join((recipient, listid, sendid, mailclass, instanceid,
                                  click_tracking_id)).encode() + b"\0"
        self.state = tu.FLAG_STATELESS if stateless else 0
        sep = {"a": "/", "b": "?", "c": "?qs="}[fmt]
        self.bases = {k: f"{base}/{path}{sep}".encode() for k, path in tu.PATHS.items()}

    def data(self, kind: str, url: bytes = b"", text: bool = False) -> bytes:
        flags = self.state | (tu.FLAG_TEXT if text else 0)
        payload = bytes((tu.VERSION, ord(kind), flags)) + self.fields + url
        return tu.b64url(payload + hmac.digest(self.key, payload, "sha256")[:tu.TAG_BYTES])

    def url(self, kind: str, url: bytes = b"", text: bool = False) -> bytes:
        return self.bases[kind] + self.data(kind, url, text)


def _email_headers(msg, root: str, classes: mail_class.MailClasses, now: float,
                   recipient: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """The header work both email-package paths share (identifiers, Mail Class, the
    X-GreenArrow-* headers out, Message-ID, Date, X-Mailer-Info, List-Unsubscribe);
    returns the rewriters of an HTML text and of a plain text."""
    values = {k.lower().encode(): str(v).strip() for k, v in msg.items()
              if k.lower().startswith("x-greenarrow-") or k.lower() in ("x-job", "x-virtual-mta")}
    ids = {"mailclass": values[b"x-greenarrow-mailclass"]}
    job = simplemh.resolve(values, ids, {"mailclass": "header"}, classes,
                           simplemh.root_settings(root), now)
    for name in {k for k in msg.keys() if k.lower().startswith("x-greenarrow-")}:
        del msg[name]
    if "Message-ID" not in msg:
        msg["Message-ID"] = "<uid@bench.test>"
    if "Date" not in msg:
        msg["Date"] = msglib.rfc5322_date(now)
    enc = PyEncoder(job.constants, job.url_base, job.tracker_format, recipient, job.listid,
                    job.sendid, job.mailclass, job.instanceid, job.click_tracking_id,
                    job.stateless)
    renderer = simplemh.Renderer()
    renderer.job = job
    msg["X-Mailer-Info"] = enc.data(tu.MAILER_INFO).decode()
    lu = renderer.list_unsubscribe(recipient, enc).decode()
    for line in lu.replace("\r\n ", " ").strip().split("\r\n"):
        name, _, value = line.partition(": ")
        msg[name] = value
    own = (job.url_base + "/click", job.url_base + "/open", job.url_base + "/unsub")

    def track(url: str, text: bool) -> str | None:
        if url.lower().startswith("##unsubscribetag##"):
            return enc.url(tu.UNSUBSCRIBE, url[18:].encode("utf-8"), text).decode()
        if url.lower().startswith(("http://", "https://")) and not url.startswith(own):
            return enc.url(tu.CLICK, url.encode("utf-8"), text).decode()
        return None

    def href(m: re.Match) -> str:
        value = m.group(2)
        quote = value[0] if value[0] in "\"'" else ""
        inner = value[1:-1] if quote else value
        new = track(inner.strip().replace("&amp;", "&"), False)
        return m.group(0) if new is None else f"{m.group(1)}{quote}{new}{quote}"

    def html(text: str) -> str:
        text = HREF.sub(href, text)
        pixel = simplemh.PIXEL.decode() % enc.url(tu.OPEN).decode()
        closes = list(BODY_CLOSE.finditer(text))
        at = closes[-1].start() if closes else len(text.rstrip("\r\n"))
        return text[:at] + pixel + text[at:]

    def plain(text: str) -> str:
        return TEXT_URL.sub(lambda m: track(m.group(0), True) or m.group(0), text)

    return html, plain


def email_simplemh(raw: bytes, root: str, classes: mail_class.MailClasses, now: float,
                   recipient: str) -> bytes:
    """The same SimpleMH result as injection.prepare + message_for, with the email package."""
    msg = message_from_bytes(raw, policy=policy.compat32)
    html, plain = _email_headers(msg, root, classes, now, recipient)
    for part in msg.walk():
        if part.is_multipart() or part.get_content_type() not in ("text/html", "text/plain"):
            continue
        if (part.get("Content-Disposition") or "").lower().startswith("attachment"):
            continue
        charset = part.get_content_charset() or "us-ascii"
        text = (part.get_payload(decode=True) or b"").decode(charset, "surrogateescape")
        text = html(text) if part.get_content_type() == "text/html" else plain(text)
        data = text.encode(charset, "surrogateescape")
        cte = (part.get("Content-Transfer-Encoding") or "7bit").lower()
        if cte == "quoted-printable":
            data = quopri.encodestring(data)
        elif cte == "base64":
            import base64

            data = base64.encodebytes(data)
        part.set_payload(data.decode("ascii", "surrogateescape"))
    out = BytesIO()
    BytesGenerator(out, policy=GENERATOR_POLICY).flatten(msg)
    return out.getvalue()


MODERN_POLICY = policy.default.clone(linesep="\r\n", max_line_length=998)  # no RFC 2047 folding


def email_simplemh_modern(raw: bytes, root: str, classes: mail_class.MailClasses, now: float,
                          recipient: str) -> bytes:
    """The same result with the email package's documented API (policy.default,
    EmailMessage.get_content/set_content): slower than compat32, and what its docs teach."""
    msg = message_from_bytes(raw, policy=MODERN_POLICY)
    html, plain = _email_headers(msg, root, classes, now, recipient)
    for part in msg.walk():
        if part.is_multipart() or part.get_content_type() not in ("text/html", "text/plain"):
            continue
        if part.get_content_disposition() == "attachment":
            continue
        text = part.get_content()
        text = html(text) if part.get_content_type() == "text/html" else plain(text)
        part.set_content(text, subtype=part.get_content_subtype(),
                         charset=part.get_content_charset() or "us-ascii",
                         cte=part.get("Content-Transfer-Encoding", "7bit").lower())
    return msg.as_bytes()


# --------------------------------------------------------------------------- checking and timing


def decoded_parts(raw: bytes) -> list[tuple[str, bytes]]:
    msg = message_from_bytes(raw, policy=policy.compat32)
    return [(p.get_content_type(), (p.get_payload(decode=True) or b"").replace(b"\r\n", b"\n"))
            for p in msg.walk() if not p.is_multipart()]


def headers_of(raw: bytes) -> list[tuple[str, str]]:
    msg = message_from_bytes(raw, policy=policy.compat32)
    return [(k.lower(), "".join(v.split())) for k, v in msg.items()]  # folding aside


def rate(fn, n: int, rounds: int) -> tuple[float, float, float]:
    """Seconds per call over `rounds` rounds of `n` calls: (best CPU, median CPU, median wall).

    CPU time (time.process_time) is the figure to read on a shared machine:
    other work on the box stretches wall time, not the CPU this process used.
    """
    cpu, wall = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        cpu.append((time.process_time() - start_cpu) / n)
        wall.append((time.perf_counter() - start) / n)
    return min(cpu), statistics.median(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="messages per round (Cython path)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; best and median reported")
    parser.add_argument("--cpu", type=int, default=0, help="the core to pin the process to")
    parser.add_argument("--markdown", action="store_true", help="print Markdown")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    facts = describe(Path.cwd())
    raw = make_message()
    with tempfile.TemporaryDirectory() as tmp:
        root = Root(Path(tmp) / "hvmail")
        init_root(root, "bench.test")
        (root.control / "greenarrow.conf").write_text(CONF)
        r = str(root.path)
        classes = mail_class.load(r)
        now = time.time()

        def ours() -> bytes:
            prepared = injection.prepare(raw, {}, "bench.test", "uid", now, b"", r)
            prepared.simplemh.sender(RCPT, SENDER)  # the bounce address (envelope sender)
            return prepared.message_for(RCPT)

        job = simplemh.resolve({b"x-greenarrow-instanceid": "spring-2026-04"},
                               {"mailclass": "newsletter"}, {}, classes,
                               simplemh.root_settings(r), now)

        def theirs() -> bytes:
            bounce_address.encode(job.bounce_mailbox, job.listid, job.sendid, RCPT, job.constants)
            return email_simplemh(raw, r, classes, now, RCPT)

        def modern() -> bytes:
            bounce_address.encode(job.bounce_mailbox, job.listid, job.sendid, RCPT, job.constants)
            return email_simplemh_modern(raw, r, classes, now, RCPT)

        a, b, c = ours(), theirs(), modern()
        for other in (b, c):
            assert decoded_parts(a) == decoded_parts(other), "the paths disagree on the text"
            assert sorted(headers_of(a)) == sorted(headers_of(other)), "they disagree on headers"
        html = decoded_parts(a)[-1][1]
        assert html.count(b"https://links.example.com/click?") == 30
        assert decoded_parts(a)[0][1].count(b"https://links.example.com/click?") == 10

        ours_t = rate(ours, args.n, args.rounds)
        n_email = max(50, args.n // 25)
        theirs_t = rate(theirs, n_email, args.rounds)
        modern_t = rate(modern, max(20, args.n // 60), args.rounds)
    facts["load average at end"] = loadavg()
    size = len(raw)
    rows = [
        ("Cython byte path (injection.prepare + message_for + sender)", ours_t, args.n),
        ("email package, compat32 API + stdlib hmac, same result", theirs_t, n_email),
        ("email package, policy.default API + stdlib hmac, same result", modern_t,
         max(20, args.n // 60)),
    ]
    ratios = [t / o for t, o in zip(theirs_t, ours_t, strict=True)]
    ratios_modern = [t / o for t, o in zip(modern_t, ours_t, strict=True)]
    if args.markdown:
        for k, v in facts.items():
            print(f"- {k}: {v}")
        print(f"- message: {size} bytes in, {len(a)} bytes out; 30 HTML links + 10 text URLs "
              f"tracked, open pixel, X-Mailer-Info, List-Unsubscribe, bounce address; "
              f"pinned to CPU {args.cpu}\n")
        print("| path | calls x rounds | CPU best: msg/s, MB/s, us/msg | CPU median: msg/s, MB/s "
              "| wall median: msg/s, MB/s |")
        print("|---|---|---|---|---|")
        for name, (best, med, wall), n in rows:
            print(f"| {name} | {n} x {args.rounds} | {1 / best:,.0f}, {size / best / 1e6:.1f}, "
                  f"{best * 1e6:.0f} | {1 / med:,.0f}, {size / med / 1e6:.1f} "
                  f"| {1 / wall:,.0f}, {size / wall / 1e6:.1f} |")
        print(f"\nSpeed-up against compat32: {ratios[0]:.1f}x (CPU best), {ratios[1]:.1f}x "
              f"(CPU median), {ratios[2]:.1f}x (wall median); against policy.default: "
              f"{ratios_modern[0]:.1f}x, {ratios_modern[1]:.1f}x, {ratios_modern[2]:.1f}x.")
    else:
        for k, v in facts.items():
            print(f"{k}: {v}")
        print(f"message {size} bytes")
        for name, (best, med, wall), n in rows:
            print(f"{name}: CPU {1 / best:,.0f} msg/s best ({size / best / 1e6:.1f} MB/s), "
                  f"{1 / med:,.0f} median; wall {1 / wall:,.0f} msg/s median; "
                  f"{args.rounds} x {n}")
        print(f"speed-up vs compat32: {ratios[0]:.1f}x CPU best, {ratios[1]:.1f}x CPU median, "
              f"{ratios[2]:.1f}x wall median")
        print(f"speed-up vs policy.default: {ratios_modern[0]:.1f}x CPU best, "
              f"{ratios_modern[1]:.1f}x CPU median, {ratios_modern[2]:.1f}x wall median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
