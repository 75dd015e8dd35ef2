"""The identifiers a message carries: SendID, ListID, MtaID and Mail Class.

Each rule lives here once, with the text that explains it (docs/simplemh.md
and docs/configuration.md). Plain string tests, no `re`: command-line
injection checks these on every message.
"""

from __future__ import annotations

_LISTID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+")
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _listid_ok(v: str) -> bool:
    return 0 < len(v) <= 20 and all(c in _LISTID_CHARS for c in v)


def _sendid_ok(v: str) -> bool:
    return 0 < len(v) <= 100 and all("!" <= c <= "~" for c in v)


def _mailclass_ok(v: str) -> bool:
    return 0 < len(v) <= 100 and not v[0].isdigit() and all(c in _WORD_CHARS for c in v)


def _mtaid_ok(v: str) -> bool:
    return (0 < len(v) <= 200 and v == v.strip()
            and all(" " <= c <= "~" and c not in ",#@" for c in v))


# field: (display name, header lower-cased, environment variable, check, rule text)
IDENTIFIERS = {
    "sendid": ("SendID", b"x-greenarrow-sendid", "GREENARROW_SENDID", _sendid_ok,
               "1 to 100 printable ASCII characters without spaces"),
    "listid": ("ListID", b"x-greenarrow-listid", "GREENARROW_LISTID", _listid_ok,
               "1 to 20 characters of A-Z, a-z, 0-9, _ and +"),
    "mtaid": ("MtaID", b"x-greenarrow-mtaid", "GREENARROW_MTAID", _mtaid_ok,
              "1 to 200 printable ASCII characters other than , # and @, no outer spaces"),
    "mailclass": ("Mail Class", b"x-greenarrow-mailclass", "GREENARROW_MAILCLASS", _mailclass_ok,
                  "letters, digits and underscores, not starting with a digit"),
}


def identifier_problem(field: str, value: str) -> str | None:
    """Why `value` is not a valid identifier `field`, or None when it is."""
    name, _, _, check, rule = IDENTIFIERS[field]
    if check(value):
        return None
    return f"invalid {name} {value!r}: {rule}"


# The header names as the documentation spells them, for error messages.
HEADER_NAMES = {
    b"x-greenarrow-sendid": "X-GreenArrow-SendID",
    b"x-greenarrow-listid": "X-GreenArrow-ListID",
    b"x-greenarrow-mtaid": "X-GreenArrow-MtaID",
    b"x-greenarrow-mailclass": "X-GreenArrow-MailClass",
}
