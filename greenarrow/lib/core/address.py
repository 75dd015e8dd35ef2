"""Envelope address syntax (RFC 5321 section 4.1.2), checked without `re`.

Command-line injection checks every address it is given, and importing `re`
would cost it more than the check itself, so these are plain string tests.
Only ASCII is accepted: the engine does not speak SMTPUTF8, so an 8-bit
address is refused rather than mangled.
"""

from __future__ import annotations

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_HEX = frozenset("0123456789abcdefABCDEF:.")


def valid_local_part(local: str) -> bool:
    """A dot-atom or a quoted string of at most 64 characters."""
    if not local or len(local) > 64:
        return False
    if local[0] == '"':
        if len(local) < 2 or local[-1] != '"':
            return False
        inner = local[1:-1]
        i = 0
        while i < len(inner):
            c = inner[i]
            if c == "\\":
                if i + 1 >= len(inner) or not " " <= inner[i + 1] <= "~":
                    return False
                i += 2
                continue
            if c == '"' or not " " <= c <= "~":
                return False
            i += 1
        return True
    return all(atom and all(c in _ATEXT for c in atom) for atom in local.split("."))


def valid_domain(domain: str) -> bool:
    """A host name of letter-digit-hyphen labels (one trailing dot allowed), or an address literal."""
    if domain.startswith("["):
        if not domain.endswith("]"):
            return False
        inner = domain[1:-1]
        if inner[:5].lower() == "ipv6:":
            return len(inner) > 5 and all(c in _HEX for c in inner[5:])
        parts = inner.split(".")
        return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts)
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or len(domain) > 253:
        return False
    for label in domain.split("."):
        if not 0 < len(label) < 64 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c in _LDH for c in label):
            return False
    return True


def address_problem(address: str) -> str | None:
    """What is wrong with an envelope address `local@domain`, or None when it is fine."""
    if not address.isascii():
        return "contains non-ASCII characters"
    if any(c < " " or c == "\x7f" for c in address):
        return "contains control characters"
    if len(address) > 320:
        return "is longer than 320 characters"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "is not of the form local@domain"
    if len(local) > 64:
        return "has a local part over 64 characters"
    if not valid_local_part(local):
        return "has an invalid local part"
    if not valid_domain(domain):
        return "has an invalid domain"
    return None
