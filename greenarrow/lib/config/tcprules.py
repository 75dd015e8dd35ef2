"""The relay allow-list `control/smtp.tcp`, in tcprules syntax (qmail, ucspi-tcp).

GreenArrow keeps the qmail convention: each line names client addresses and
says whether they may connect (`allow`/`deny`) and which environment variables
the SMTP service gets for them. `RELAYCLIENT` set means "may relay";
`GREENARROW_MAILCLASS`, `GREENARROW_SMTP_RECEIVED_HIDE`, ... set per-client
injection defaults (spec section 2.3, 2.4). Unlike ucspi-tcp we read the text
file directly instead of compiling it into a cdb: the file is small, and
`parse` compiles it into a dictionary, so `match` costs at most five dict
look-ups per SMTP connection.

Syntax, one rule per line:

    ADDRESS:allow[,VAR="value"[,VAR2=value...]]
    ADDRESS:deny

* ADDRESS is one of
    - an exact IPv4 address `1.2.3.4`;
    - a prefix ending in a dot, `1.`, `1.2.` or `1.2.3.` (whole octets only);
    - one octet written as a range `A-B`: `1.2.3.1-20` (addresses
      1.2.3.1 to 1.2.3.20) or `1.2.3-5.` (the prefixes 1.2.3., 1.2.4.,
      1.2.5.); exactly as ucspi-tcp, which expands the range into one rule per
      value;
    - an exact IPv6 address `::1`, `2001:db8::25` (no IPv6 prefixes or
      ranges); an IPv4-mapped address `::ffff:1.2.3.4` is the IPv4 address;
    - nothing at all (`:allow`, `:deny`): the default rule.
  Host-name rules (`=host.example:...`) and remote-info rules
  (`user@1.2.3.4:...`) need a DNS or ident look-up per connection; they are
  rejected with an error rather than silently ignored, because ignoring a rule
  would change who may relay.
* The separator between ADDRESS and the action is the LAST `:` before the
  first `,`. That keeps IPv6 addresses unambiguous (`::1:allow` is address
  `::1`), keeps `:deny` the default rule, and never looks inside variable
  values, which may hold colons (the action and the address hold no comma).
* After the action, comma-separated `NAME=value` pairs. A value is quoted with
  `"` or `'` (the quote runs to the next identical quote; no escapes) or bare
  up to the next comma. A name given twice keeps its last value.
* `#` outside quotes starts a comment, to the end of the line; blank lines
  are ignored; spaces around a line are ignored.
* Anything else is an error naming the file and line:
  `TcpRulesError("smtp.tcp:7: bad octet '256' in '1.2.3.256'")`.

Which rule applies: the most specific one that matches, as tcpserver looks up
its cdb (full address, then the 3-, 2- and 1-octet prefixes, then the
default). A full address beats any prefix, a longer prefix beats a shorter
one, the default comes last. At the same length, a rule written without a
range beats one whose range covers the address (`1.2.3.4:deny` wins over
`1.2.3.1-20:allow` wherever they stand). Between two rules of the same length
and kind, the first in the file wins (as in ucspi-tcp, whose cdb returns the
first record of a key). No rule matching means deny.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TcpRule", "TcpRules", "TcpRulesError", "load", "parse"]


class TcpRulesError(ValueError):
    """A line of a tcprules file is malformed; the message starts `FILE:LINE:`."""


@dataclass(frozen=True)
class TcpRule:
    """One rule: the address as written, allow or deny, the variables it sets, its line."""

    address: str
    allow: bool
    env: dict[str, str]
    line: int


# The characters an ADDRESS may hold.
_ADDRESS = re.compile(r"[0-9A-Fa-f.:\-]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")

# Kinds, in order of precedence at the same address length.
_EXACT = 0
_RANGE = 1


class TcpRules:
    """A parsed rules file, compiled for one look-up per connection.

    Built by `parse`; `rules` keeps every rule in file order for display.
    """

    __slots__ = ("rules", "_keys", "_default")

    def __init__(self, rules: tuple[TcpRule, ...], keys: dict[str, TcpRule]) -> None:
        self.rules = rules
        self._keys = keys
        self._default = keys.get("")

    def __repr__(self) -> str:
        return f"TcpRules({len(self.rules)} rules)"

    def match(self, ip: str) -> TcpRule | None:
        """The rule that applies to client address `ip`; None (= deny) when none does.

        `ip` is the textual peer address as the socket reports it: dotted
        IPv4, or IPv6 in any valid spelling (IPv4-mapped IPv6 counts as IPv4).
        An empty `ip` (a client without an address, e.g. on a Unix socket) is
        unknown: only the default rule applies to it.
        """
        if not ip:
            return self._default
        keys = self._keys
        if ":" in ip:
            try:
                addr = ipaddress.IPv6Address(ip.partition("%")[0])
            except ValueError:
                return self._default
            mapped = addr.ipv4_mapped
            if mapped is None:
                return keys.get(addr.compressed, self._default)
            ip = str(mapped)
        rule = keys.get(ip)
        if rule is not None:
            return rule
        end = len(ip)
        while True:
            end = ip.rfind(".", 0, end)
            if end <= 0:
                return self._default
            rule = keys.get(ip[: end + 1])
            if rule is not None:
                return rule

    def allowed(self, ip: str) -> bool:
        """May `ip` connect at all (a rule matches and says allow)?"""
        rule = self.match(ip)
        return rule is not None and rule.allow

    def relay_allowed(self, ip: str) -> bool:
        """May `ip` relay: its rule allows it AND sets RELAYCLIENT (to any value, even "")."""
        rule = self.match(ip)
        return rule is not None and rule.allow and "RELAYCLIENT" in rule.env

    def env_for(self, ip: str) -> dict[str, str]:
        """The variables `ip`'s rule sets (a fresh copy); empty when it is denied."""
        rule = self.match(ip)
        if rule is None or not rule.allow:
            return {}
        return dict(rule.env)


def load(path: Path | str) -> TcpRules:
    """Parse a rules file (a missing one has no rules: nobody may relay).

    Errors name the file by its base name (`smtp.tcp:LINE:`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        text = ""
    return parse(text, path.name)


def parse(text: str, filename: str = "smtp.tcp") -> TcpRules:
    """Parse tcprules text and compile it; raise TcpRulesError on any malformed line.

    Every line is checked, even those a more specific rule would shadow: a
    typo in a relay list should stop a reload, not be discovered later.
    """
    rules: list[TcpRule] = []
    # key -> (length rank, kind, line) of the rule holding it, for precedence.
    best: dict[str, tuple[int, int]] = {}
    keys: dict[str, TcpRule] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        where = f"{filename}:{number}"
        rule, expanded, kind = _parse_line(line, number, where)
        rules.append(rule)
        for key in expanded:
            rank = (kind, number)
            if key not in best or rank < best[key]:
                best[key] = rank
                keys[key] = rule
    return TcpRules(tuple(rules), keys)


def _strip_comment(line: str) -> str:
    """The line without a `#` comment; a `#` inside quotes is part of the value."""
    if "#" not in line:
        return line
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _parse_line(line: str, number: int, where: str) -> tuple[TcpRule, list[str], int]:
    address, sep, action = line.partition(",")[0].rpartition(":")
    if not sep:
        raise TcpRulesError(f"{where}: expected ADDRESS:allow or ADDRESS:deny, got {line!r}")
    if not _ADDRESS.fullmatch(address):
        if address.startswith("="):
            raise TcpRulesError(
                f"{where}: host name rules ({address}) are not supported; use IP addresses"
            )
        if "@" in address:
            raise TcpRulesError(f"{where}: remote-info rules (user@address) are not supported")
        raise TcpRulesError(f"{where}: bad address {address!r}")
    if action == "allow":
        allow = True
    elif action == "deny":
        allow = False
    else:
        raise TcpRulesError(
            f"{where}: expected 'allow' or 'deny' after {address + ':'!r}, got {action!r}"
        )
    expanded, kind = _expand(address, where)
    instructions = line[len(address) + 1 + len(action) :]
    env = _parse_env(instructions[1:], where) if instructions else {}
    return TcpRule(address=address, allow=allow, env=env, line=number), expanded, kind


def _expand(address: str, where: str) -> tuple[list[str], int]:
    """The look-up keys an ADDRESS stands for, and whether it was written as a range."""
    if address == "":
        return [""], _EXACT
    if ":" in address:
        if "-" in address:
            raise TcpRulesError(f"{where}: ranges are not supported in IPv6 addresses: {address!r}")
        try:
            addr = ipaddress.IPv6Address(address)
        except ValueError:
            raise TcpRulesError(
                f"{where}: bad IPv6 address {address!r} (only exact IPv6 addresses are supported)"
            ) from None
        mapped = addr.ipv4_mapped
        return [str(mapped) if mapped is not None else addr.compressed], _EXACT
    prefix = address.endswith(".")
    parts = (address[:-1] if prefix else address).split(".")
    if prefix and len(parts) > 3:
        raise TcpRulesError(f"{where}: a prefix has at most 3 octets: {address!r}")
    if not prefix and len(parts) != 4:
        raise TcpRulesError(
            f"{where}: {address!r} is neither a full address (4 octets) nor a prefix ending in '.'"
        )
    tail = "." if prefix else ""
    ranged = -1
    low = high = 0
    for i, part in enumerate(parts):
        if "-" in part:
            if ranged >= 0:
                raise TcpRulesError(f"{where}: only one octet may be a range: {address!r}")
            first, _, last = part.partition("-")
            low, high = _octet(first, address, where), _octet(last, address, where)
            if low > high:
                raise TcpRulesError(f"{where}: range {part!r} is upside down in {address!r}")
            ranged = i
        else:
            _octet(part, address, where)
    if ranged < 0:
        return [address], _EXACT
    head = ".".join(parts[:ranged])
    rest = ".".join(parts[ranged + 1 :])
    keys = []
    for value in range(low, high + 1):
        key = f"{head}.{value}" if head else str(value)
        keys.append((f"{key}.{rest}" if rest else key) + tail)
    return keys, _RANGE


def _octet(text: str, address: str, where: str) -> int:
    """One decimal octet 0..255 without leading zeros (the peer address never has them)."""
    if not _OCTET.fullmatch(text) or int(text) > 255:
        raise TcpRulesError(f"{where}: bad octet {text!r} in {address!r}")
    return int(text)


def _parse_env(text: str, where: str) -> dict[str, str]:
    """`NAME="value",NAME2=bare,...` after the action."""
    env: dict[str, str] = {}
    pos = 0
    end = len(text)
    while True:
        m = _NAME.match(text, pos)
        if m is None or m.end() >= end or text[m.end()] != "=":
            bad = text[pos:].split(",")[0]
            raise TcpRulesError(f"{where}: expected NAME=value, got {bad!r}")
        name = m.group()
        pos = m.end() + 1
        if pos < end and text[pos] in "\"'":
            quote = text[pos]
            close = text.find(quote, pos + 1)
            if close < 0:
                raise TcpRulesError(f"{where}: unterminated quote in the value of {name}")
            value = text[pos + 1 : close]
            pos = close + 1
            if pos < end and text[pos] != ",":
                raise TcpRulesError(
                    f"{where}: unexpected {text[pos:]!r} after the quoted value of {name}"
                )
        else:
            comma = text.find(",", pos)
            stop = end if comma < 0 else comma
            value = text[pos:stop]
            if '"' in value or "'" in value:
                raise TcpRulesError(f"{where}: stray quote in the value of {name}: {value!r}")
            pos = stop
        env[name] = value  # later wins, as tcpserver applies them in order
        if pos >= end:
            return env
        pos += 1  # the comma
        if pos >= end:
            raise TcpRulesError(f"{where}: trailing comma")
