"""Realistic ~5 KB messages: multipart/alternative, text + HTML, 12 headers.

The same generator as the shared Postfix baseline (shared/bench/lib/genmsg.py),
rewritten here so that the project's harness depends on nothing outside the
repository at run time. Deterministic for a given seed, so two runs (and the
engine and its peer within one run) send exactly the same bytes.

Files are written with LF line endings: `sendmail` and `smtp-source -F`
convert them to CRLF on the wire, and `message_crlf` does it for the Python
load generator.
"""

from __future__ import annotations

import random
from email.utils import formatdate
from pathlib import Path

SENDER = "newsletter@bench.test"
RCPT = "rcpt@example.test"  # a non-local domain: the MTA must relay it

WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure "
    "in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint "
    "occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
    "laborum invoice order shipment account newsletter update meeting report"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _wrap(text: str, width: int = 72) -> list[str]:
    out: list[str] = []
    line = ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return out


def make_message(
    rng: random.Random, idx: int, size: int = 5120, sender: str = SENDER, rcpt: str = RCPT
) -> str:
    """One message of at least `size` bytes (LF line endings), unique by `idx`.

    The body grows paragraph by paragraph until the size is reached, so the
    text/plain and text/html parts stay consistent with each other, as a
    newsletter's would.
    """
    boundary = f"=_bench_{rng.getrandbits(64):016x}"
    mid = f"<{idx}.{rng.getrandbits(64):016x}@bench.test>"
    date = formatdate(1700000000 + idx, localtime=False)
    headers = [
        f'From: "Bench Newsletter" <{sender}>',
        f'To: "Recipient {idx}" <{rcpt}>',
        "Reply-To: support@bench.test",
        f"Subject: [Bench] Your weekly report #{idx} - {_sentence(rng, 5)[:-1]}",
        f"Date: {date}",
        f"Message-ID: {mid}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        "X-Mailer: greenarrow bench genmsg.py 1.0",
        f"List-Unsubscribe: <mailto:unsubscribe@bench.test?subject=unsub-{idx}>",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        f"X-Campaign-ID: bench-{idx:08d}",
    ]
    head = "\n".join(headers) + "\n\n"
    paragraphs: list[str] = []

    def render() -> str:
        text = "\n\n".join("\n".join(_wrap(p)) for p in paragraphs)
        html = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Weekly report</title>\n'
            "<style>body{font-family:Arial,sans-serif;color:#333}p{line-height:1.4}</style>\n"
            f"</head><body>\n<h1>Weekly report #{idx}</h1>\n"
            + "\n".join("<p>{}</p>".format("\n".join(_wrap(p))) for p in paragraphs)
            + f'\n<p><a href="https://bench.test/unsub?id={idx}">Unsubscribe</a></p>\n'
            "</body></html>"
        )
        body = (
            "This is a multi-part message in MIME format.\n\n"
            f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n"
            f"Content-Transfer-Encoding: 7bit\n\n{text}\n\n"
            f"--{boundary}\nContent-Type: text/html; charset=utf-8\n"
            f"Content-Transfer-Encoding: 7bit\n\n{html}\n\n"
            f"--{boundary}--\n"
        )
        return head + body

    msg = render()
    while len(msg) < size:
        paragraphs.append(_sentence(rng, rng.randint(8, 20)))
        msg = render()
    return msg


def single(path: Path, size: int = 5120, seed: int = 1) -> Path:
    """Write (once) the one message every SMTP session sends, as smtp-source -F wants it."""
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(make_message(random.Random(seed), 0, size))
        tmp.replace(path)
    return path


SIMPLEMH_CLASS = "bench"


def simplemh(text: str, links: int = 10) -> str:
    """The message as a SimpleMH sender injects it: a Mail Class header, links to track,
    and no List-Unsubscribe of its own (the Mail Class adds it)."""
    head, sep, body = text.partition("\n\n")
    kept = [line for line in head.split("\n") if not line.startswith("List-Unsubscribe")]
    items = "".join(
        f'<li><a href="https://bench.test/article/{i}?from=weekly">Article {i}</a></li>\n'
        for i in range(links)
    )
    body = body.replace("</h1>\n", f"</h1>\n<ul>\n{items}</ul>\n", 1)
    return "\n".join([*kept, f"X-GreenArrow-MailClass: {SIMPLEMH_CLASS}"]) + sep + body


def single_simplemh(path: Path, size: int = 5120, seed: int = 1) -> Path:
    """`single`, as SimpleMH mail (see `simplemh`)."""
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(simplemh(make_message(random.Random(seed), 0, size)))
        tmp.replace(path)
    return path


def many(folder: Path, count: int, size: int = 5120, seed: int = 1) -> list[Path]:
    """Write (once, cached by a `.done` marker) `count` distinct messages for CLI injection."""
    done = folder / ".done"
    files = [folder / f"{i:06d}.eml" for i in range(count)]
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed)
        for i, path in enumerate(files):
            path.write_text(make_message(rng, i, size))
        done.write_text(f"{count}\n")
    return files


def message_crlf(text: str) -> bytes:
    """The message as it goes on the wire: CRLF line endings, ending in CRLF."""
    data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    return data if data.endswith(b"\r\n") else data + b"\r\n"
