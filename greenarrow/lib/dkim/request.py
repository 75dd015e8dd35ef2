"""Which DKIM signatures a message asks for: the X-GreenArrow-DKIM header and its envelope form.

Kept apart from greenarrow.lib.dkim.signing, which loads dkimpy and the
cryptography library: injection parses the request, only the remote workers
sign.
"""

from __future__ import annotations

import json
import re

HEADER = "X-GreenArrow-DKIM"
DEFAULT_SELECTOR = "default"
MAX_SIGNATURES = 10
MAX_HEADER_BYTES = 4096  # each X-GreenArrow-DKIM header must be shorter than this

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")


def _check_name(value: str, what: str) -> str:
    """A domain or selector as DNS labels, lower-cased; ValueError otherwise."""
    name = value.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not _NAME_RE.match(name):
        raise ValueError(f"{what} {value!r} is not a DNS name")
    return name


def parse_dkim_header_values(values: list[str]) -> list[tuple[str, str]]:
    """The (domain, selector) pairs asked for by the X-GreenArrow-DKIM header(s).

    Each value is a JSON object `{"domain": "...", "selector": "..."}` or an
    array of 1-10 of them; several headers add up, in order. `selector` may be
    left out (`default`); any other key is refused, so that a misspelt one is
    an error rather than a silently different signature. Folded values are
    unfolded first. Each header must be under 4096 bytes and there may be at
    most 10 signatures in all. A pair given twice signs once. ValueError
    with a message naming X-GreenArrow-DKIM on any problem.
    """
    pairs: list[tuple[str, str]] = []
    count = 0
    for number, value in enumerate(values, 1):
        where = f"{HEADER} header" + (f" #{number}" if len(values) > 1 else "")
        size = len(value.encode("utf-8", "surrogateescape"))
        if size >= MAX_HEADER_BYTES:
            raise ValueError(f"{where} is {size} bytes; each must be under {MAX_HEADER_BYTES}")
        text = _FOLD_RE.sub("", value).strip()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e.msg} at column {e.colno}") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not data:
            raise ValueError(f"{where} must be a JSON object or a non-empty array of objects")
        count += len(data)
        if count > MAX_SIGNATURES:
            raise ValueError(f"{HEADER}: at most {MAX_SIGNATURES} signatures per message")
        for item in data:
            pair = _request_item(item, where)
            if pair not in pairs:
                pairs.append(pair)
    return pairs


def _request_item(item: object, where: str) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: each signature must be a JSON object, got {json.dumps(item)}")
    unknown = sorted(set(item) - {"domain", "selector"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (only domain and selector)")
    domain, selector = item.get("domain"), item.get("selector", DEFAULT_SELECTOR)
    if not isinstance(domain, str) or not isinstance(selector, str):
        raise ValueError(f"{where}: domain (required) and selector must be strings")
    try:
        return _check_name(domain, "domain"), _check_name(selector, "selector")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def encode_request(pairs: list[tuple[str, str]]) -> str:
    """The queue envelope's `dkim` value: `example.com:s1,example.org:default` ("" = default choice)."""
    return ",".join(f"{_check_name(d, 'domain')}:{_check_name(s, 'selector')}" for d, s in pairs)


def decode_request(text: str) -> list[tuple[str, str]]:
    """The pairs of an envelope `dkim` value; ValueError if it is not `encode_request`'s form."""
    pairs: list[tuple[str, str]] = []
    if not text:
        return pairs
    for part in text.split(","):
        domain, sep, selector = part.partition(":")
        if not sep:
            raise ValueError(f"bad DKIM request {text!r}: {part!r} is not domain:selector")
        pairs.append((_check_name(domain, "domain"), _check_name(selector, "selector")))
    return pairs
