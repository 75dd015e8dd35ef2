"""The greenarrow.conf parser, its typed values and its schema (spec section 4).

The file is NGINX-like: directives (`name value...`) grouped in blocks
(`name [args] { ... }`). Every service reads it, and `greenarrow_config check`
validates it, so a mistake is reported as `file:line: what is wrong` instead of
being silently ignored.

Syntax decisions (GreenArrow's documentation is silent on these):

* Comments: `#` starts a comment to the end of the line when it begins a line
  or a token (after whitespace, `{`, `}`, `,` or a terminating `;`). A `#`
  glued to the end of a value (`a#b`, `"a"#b`) is an error: quote values that
  contain `#`. This avoids silently cutting `http://x/#frag` in two.
* A newline or a `;` ends a directive; `}` ends it too. Inside a bare value a
  `;` is literal only when it has other characters on both sides (`a;b`);
  leading or trailing `;` characters end the directive (`x 1;` = `x 1`).
* Bare values are made of `[A-Za-z0-9-_+.*/[]$:;%|@]` (ASCII only). Anything
  else must be `"double-quoted"` (JSON escapes; a raw newline is an error) or
  in `` `backticks` `` (no escapes; may span lines).
* Arguments are separated by whitespace; a `,` may also separate them
  (`ip_address a, b {`). A newline right after a `,` continues the list, and
  a `{` on the line after a block header opens that block.
* Directive and block names are bare identifiers `[A-Za-z_][A-Za-z0-9_]*`.
* Blocks may nest at most MAX_DEPTH levels.
* `line` and `filename` are not part of equality: two trees are equal when
  they configure the same thing, wherever it sits in the file.
* Blocks with the same name and argument in the same place merge (the
  GreenArrow docs tell you to *add* `ip_address * { domain x { ... } }`
  snippets, so a file may hold several); a directive may still be set only
  once per merged block. Block.block() returns the merged view.

The schema is the SCHEMA table below: one line per block or directive.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from greenarrow.lib.core.paths import Root

CONF_NAME = "greenarrow.conf"
MAX_DEPTH = 32
ROOT = ""  # the context name of the top level of the file


class ConfError(Exception):
    """A mistake in greenarrow.conf; str() is `file:line: what is wrong`."""

    def __init__(self, filename: str, line: int | None, what: str) -> None:
        self.filename = filename
        self.line = line
        self.what = what
        where = filename if line is None else f"{filename}:{line}"
        super().__init__(f"{where}: {what}")


# --------------------------------------------------------------------------
# The tree


@dataclass
class Directive:
    """`name args...`: one setting, with the line it came from for errors."""

    name: str
    args: list[str]
    line: int = field(default=0, compare=False)
    filename: str = field(default="", compare=False, repr=False)

    def error(self, what: str) -> ConfError:
        """A ConfError pointing at this directive."""
        return ConfError(self.filename, self.line, what)

    def _one(self) -> str:
        if len(self.args) != 1:
            raise self.error(f"{self.name} takes 1 argument, got {len(self.args)}")
        return self.args[0]

    def _convert(self, parse: Callable[[str], Any]) -> Any:
        try:
            return parse(self._one())
        except ValueError as exc:
            raise self.error(f"{self.name}: {exc}") from None

    def as_str(self) -> str:
        return self._one()

    def as_bool(self) -> bool:
        return self._convert(parse_bool)

    def as_int(self) -> int:
        return self._convert(parse_int)

    def as_duration(self) -> int:
        """The value in seconds."""
        return self._convert(parse_duration)

    def as_host_port(self, default_port: int = 25) -> tuple[str, int]:
        return self._convert(lambda text: parse_host_port(text, default_port))

    def as_choice(self, *choices: str) -> str:
        return self._convert(one_of(*choices).parse)


@dataclass
class Block:
    """`name args { ... }`; the whole file is the root block named ""."""

    name: str
    args: list[str] = field(default_factory=list)
    directives: list[Directive] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    line: int = field(default=0, compare=False)
    filename: str = field(default="", compare=False, repr=False)

    def error(self, what: str) -> ConfError:
        return ConfError(self.filename, self.line, what)

    def directive(self, name: str) -> Directive | None:
        """The first directive called `name` in this block (not in sub-blocks)."""
        for d in self.directives:
            if d.name == name:
                return d
        return None

    def directives_named(self, name: str) -> list[Directive]:
        return [d for d in self.directives if d.name == name]

    def blocks_named(self, name: str) -> list[Block]:
        return [b for b in self.blocks if b.name == name]

    def block(self, name: str, arg: str | None = None) -> Block | None:
        """The sub-block `name` (whose arguments include `arg`, case-insensitively).

        Repeated blocks are one block written in pieces (see validate), so
        this returns them merged: `conf.block("general")` sees every piece.
        """
        key = None if arg is None else arg.lower()
        parts = [
            b
            for b in self.blocks
            if b.name == name and (key is None or key in (a.lower() for a in b.args))
        ]
        if len(parts) <= 1:
            return parts[0] if parts else None
        return Block(
            name,
            list(parts[0].args) if arg is None else [arg],
            [d for b in parts for d in b.directives],
            [c for b in parts for c in b.blocks],
            parts[0].line,
            parts[0].filename,
        )

    def get_str(self, name: str, default: str | None = None) -> str | None:
        d = self.directive(name)
        return default if d is None else d.as_str()

    def get_bool(self, name: str, default: bool | None = None) -> bool | None:
        d = self.directive(name)
        return default if d is None else d.as_bool()

    def get_int(self, name: str, default: int | None = None) -> int | None:
        d = self.directive(name)
        return default if d is None else d.as_int()

    def get_duration(self, name: str, default: int | None = None) -> int | None:
        d = self.directive(name)
        return default if d is None else d.as_duration()

    def walk(self) -> Iterator[Block]:
        """This block and every block inside it, depth first."""
        yield self
        for block in self.blocks:
            yield from block.walk()


# --------------------------------------------------------------------------
# Values: each parser raises ValueError with the reason, the caller adds file:line

_DIGITS = re.compile(r"[0-9]+")
_DURATION = re.compile(r"(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_UNITS = (7 * 86400, 86400, 3600, 60, 1)
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_bool(text: str) -> bool:
    """`yes` or `no` (lower case, as GreenArrow writes them)."""
    if text == "yes":
        return True
    if text == "no":
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def parse_int(text: str) -> int:
    """A non-negative decimal integer: every integer setting is a count or a size."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def parse_duration(text: str) -> int:
    """`90` (seconds) or number+unit parts in the order w, d, h, m, s: `4h15m` -> 15300."""
    if _DIGITS.fullmatch(text):
        return int(text)
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError(
            f"bad duration {text!r}: expected seconds or parts like 1w2d3h4m5s, in that order"
        )
    return sum(int(n) * unit for n, unit in zip(match.groups(), _DURATION_UNITS, strict=True) if n)


def parse_port(text: str) -> int:
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"bad port {text!r}: expected 1-65535")
    return int(text)


def parse_ip(text: str) -> str:
    """An IPv4 or IPv6 address, returned in its normal written form."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"bad IP address {text!r}") from None


def parse_hostname(text: str) -> str:
    """A DNS host name (letters, digits, `-`, `_`), not an IP address; one trailing dot ok."""
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(f"bad host name {text!r}")
    return name


def parse_host_port(text: str, default_port: int = 25) -> tuple[str, int]:
    """`HOST[:PORT]`: an IPv4 address, `[IPv6]` or a name -> (host, port).

    An IPv6 host is returned without its brackets, ready for socket calls.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad host {text!r}: missing ']'")
        host_text, rest = text[1:end], text[end + 1 :]
        try:
            host = str(ipaddress.IPv6Address(host_text))
        except ValueError:
            raise ValueError(f"bad IPv6 address {host_text!r}") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad route {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise ValueError(f"bad host {text!r}: write an IPv6 address in brackets: [{text}]")
        host_text, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
        try:
            host = str(ipaddress.IPv4Address(host_text))
        except ValueError:
            try:
                host = parse_hostname(host_text)
            except ValueError:
                raise ValueError(
                    f"bad host {host_text!r}: expected an IP address or a name"
                ) from None
    port = default_port if port_text is None else parse_port(port_text)
    return host, port


DATABASE_NONE = "none"  # events_database_url none: no database at all
DATABASE_SCHEMES = ("postgresql", "postgres")


def parse_database_url(text: str) -> str:
    """`events_database_url`: a libpq URL `postgresql://[user[:password]@][host][:port]
    [,host[:port]...][/dbname][?param=value...]`, or `none`.

    Checked here: the scheme, no spaces, each host's port. What libpq alone knows
    (parameter names, a host that resolves) is its to refuse at connect time.
    """
    if text == DATABASE_NONE:
        return text
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in DATABASE_SCHEMES:
        raise ValueError(f"expected a postgresql:// URL or none, got {text!r}")
    if any(ch.isspace() for ch in text):
        raise ValueError(f"bad database URL {text!r}: spaces must be written %20")
    netloc = re.split(r"[/?]", rest, maxsplit=1)[0]
    hosts = netloc.rpartition("@")[2]
    for host in filter(None, hosts.split(",")):
        if host.startswith("["):
            port = host.partition("]")[2].removeprefix(":")
        else:
            port = host.partition(":")[2]
        if port:
            try:
                parse_port(port)
            except ValueError as exc:
                raise ValueError(f"bad database URL: {exc}") from None
    return text


def parse_name(text: str) -> str:
    """A name such as a mail class: not empty, no surrounding or line-breaking whitespace."""
    if not text or text != text.strip() or any(ch in text for ch in "\r\n"):
        raise ValueError(f"bad name {text!r}")
    return text


def parse_ip_name(text: str) -> str:
    """An `ip_address` name: a VirtualMTA name (docs/configuration.md) or `*`."""
    if text == "*":
        return text
    if not 1 <= len(text) <= 200:
        raise ValueError(f"bad name {text!r}: expected 1-200 characters")
    if any(not " " <= ch <= "~" or ch in ",#@" for ch in text):
        raise ValueError(f"bad name {text!r}: printable ASCII except , # @ only")
    if text != text.strip() or text.lstrip("-").isdigit():
        raise ValueError(f"bad name {text!r}: no surrounding spaces, not an integer")
    return text


# Domain pattern kinds, see parse_domain_pattern.
EXACT, SELF_AND_SUBDOMAINS, SUBDOMAINS, ALL = "exact", "self_and_subdomains", "subdomains", "all"
MX = "mx"  # `mx:PATTERN`: the domain's MX host name matches PATTERN (* and ? wildcards)


def ascii_domain(text: str) -> str:
    """The lower-case ASCII (punycode) form of a domain, without a trailing dot."""
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"bad domain {text!r}") from None
    return name


def parse_domain_pattern(text: str) -> tuple[str, str]:
    """`example.com`, `[*.]example.com`, `*.example.com`, `mx:*.example.net` or `*` -> (kind, domain).

    Case-insensitive: the domain comes back lower case (`*` gives (ALL, "")).
    """
    if text == "*":
        return ALL, ""
    if text[:3].lower() == "mx:":
        pattern = text[3:].lower().rstrip(".")
        if not pattern or any(not (c.isalnum() or c in "-.*?_") for c in pattern):
            raise ValueError(f"bad MX pattern {text!r}: expected mx:HOST with * and ? wildcards")
        return MX, pattern
    if text.startswith("[*.]"):
        kind, rest = SELF_AND_SUBDOMAINS, text[4:]
    elif text.startswith("*."):
        kind, rest = SUBDOMAINS, text[2:]
    else:
        kind, rest = EXACT, text
    try:
        domain = ascii_domain(rest)
        labels = domain.split(".")
        if not domain or len(domain) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in labels):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"bad domain pattern {text!r}: expected example.com, [*.]example.com, "
            "*.example.com or *"
        ) from None
    return kind, domain


# --------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class Args:
    """What a directive's or block's arguments must look like.

    `parse` checks one argument (raising ValueError); `whole` checks the list.
    """

    syntax: str
    parse: Callable[[str], object] = str
    min: int = 1
    max: int | None = 1
    whole: Callable[[list[str]], None] | None = None

    def check(self, args: list[str]) -> None:
        """Raise ValueError saying what is wrong with `args`."""
        count = len(args)
        if count < self.min or (self.max is not None and count > self.max):
            if self.max == 0:
                raise ValueError(f"takes no arguments, got {count}")
            if self.max is None:
                wanted = f"at least {self.min}"
            elif self.min == self.max:
                wanted = f"{self.min}"
            else:
                wanted = f"{self.min} to {self.max}"
            s = "" if wanted in ("1", "at least 1") else "s"
            raise ValueError(f"takes {wanted} argument{s} ({self.syntax}), got {count}")
        for arg in args:
            self.parse(arg)
        if self.whole is not None:
            self.whole(args)


def one_of(*choices: str) -> Args:
    """One argument that must be one of `choices`."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected {' or '.join(choices)}, got {text!r}")
        return text

    return Args("|".join(choices), parse)


def _star_alone(args: list[str]) -> None:
    if "*" in args and len(args) > 1:
        raise ValueError("'*' cannot be listed with other names")


def parse_vmta_name(text: str) -> str:
    """A VirtualMTA name (docs/configuration.md), `*` not allowed."""
    if text == "*":
        raise ValueError("'*' is not a VirtualMTA name")
    return parse_ip_name(text)


def parse_limit(text: str) -> str:
    """A backoff limit: `N` (a fixed value) or `N%` (a percent of the normal limit)."""
    number = text[:-1] if text.endswith("%") else text
    if not number.isdigit() or (text.endswith("%") and not 0 <= int(number) <= 100):
        raise ValueError(f"expected a number or a percent like 50%, got {text!r}")
    return text


def parse_percent(text: str) -> int:
    value = parse_int(text.rstrip("%"))
    if not 1 <= value <= 100:
        raise ValueError(f"expected 1 to 100, got {text!r}")
    return value


def _route_args(args: list[str]) -> None:
    parse_vmta_name(args[0])
    if not args[1].isdigit() or int(args[1]) < 1:
        raise ValueError(f"weight must be a positive whole number, got {args[1]!r}")


NO_ARGS = Args("", min=0, max=0)
STRING = Args("VALUE")
NAME = Args("NAME", parse_name)
YES_NO = Args("yes|no", parse_bool)
INT = Args("INTEGER", parse_int)
DURATION = Args("DURATION", parse_duration)
PORT = Args("PORT", parse_port)
IP = Args("IP", parse_ip)
HOSTNAME = Args("HOSTNAME", parse_hostname)
HOST_PORT = Args("HOST[:PORT]", parse_host_port)
IP_NAMES = Args("NAME[, NAME...]|*", parse_ip_name, max=None, whole=_star_alone)
DOMAIN_PATTERNS = Args("PATTERN[, PATTERN...]", parse_domain_pattern, max=None)
STARTTLS_CHOICES = ("never", "opportunistic", "required")
STARTTLS_USE = one_of(*STARTTLS_CHOICES)
VMTA_NAME = Args("NAME", parse_vmta_name)
LIMIT = Args("N|N%", parse_limit)
PERCENT = Args("PERCENT", parse_percent)
ROUTE = Args("NAME WEIGHT", min=2, max=2, whole=_route_args)
DATABASE_URL = Args("postgresql://...|none", parse_database_url)


def _header_name(text: str) -> str:
    name = text.strip().rstrip(",")
    if name and not all(33 <= ord(c) <= 126 and c != ":" for c in name):
        raise ValueError(f"not a header name: {text!r}")
    return name


# Event type names are checked against greenarrow.lib.events.types by the
# events services (a higher stage); here only their shape.
EVENT_TYPE_NAMES = Args("TYPE[, TYPE...]|all", parse_name, max=None)
HEADER_NAMES = Args("HEADER[, HEADER...]", _header_name, max=None)
RANDOMIZATION = one_of("fully_random", "message_constant", "email_address_constant")


def parse_domain(text: str) -> str:
    """An exact domain name (no pattern), returned in lower-case ASCII form."""
    kind, domain = parse_domain_pattern(text)
    if kind != EXACT:
        raise ValueError(f"expected a domain name, not a pattern: {text!r}")
    return domain


_LOCAL_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                         "!#$%&'*+/=?^_`{|}~-")


def parse_local_part(text: str) -> str:
    """An unquoted local part (RFC 5321 dot-atom, at most 64 octets, no `/`), lower-cased."""
    if (not text or len(text) > 64 or text.startswith(".") or text.endswith(".")
            or ".." in text or not all(c in _LOCAL_ATEXT or c == "." for c in text)):
        raise ValueError(f"bad local part {text!r}: expected a dot-atom of at most 64 characters")
    if "/" in text:  # it names a Maildir folder under maildata/
        raise ValueError(f"bad local part {text!r}: '/' is not allowed")
    return text.lower()


def parse_address(text: str) -> str:
    """`local@domain` with a dot-atom local part and an exact domain, lower-cased."""
    local, at, domain = text.rpartition("@")
    if not at:
        raise ValueError(f"bad address {text!r}: expected local@domain")
    return f"{parse_local_part(local)}@{parse_domain(domain)}"


DOMAIN = Args("DOMAIN", parse_domain)
LOCAL_PART = Args("LOCAL_PART", parse_local_part)
ADDRESS = Args("LOCAL@DOMAIN", parse_address)


@dataclass(frozen=True)
class Rule:
    """One known block or directive: where it may appear and what it takes.

    `multiple`: the directive may be repeated in one block (see validate for
    blocks, which may always be repeated and then merge).
    """

    name: str
    contexts: tuple[str, ...]
    args: Args
    is_block: bool = False
    multiple: bool = False


def block(name: str, contexts: str | tuple[str, ...], args: Args) -> Rule:
    ctx = (contexts,) if isinstance(contexts, str) else contexts
    return Rule(name, ctx, args, is_block=True)


def directive(
    name: str, contexts: str | tuple[str, ...], args: Args, multiple: bool = False
) -> Rule:
    ctx = (contexts,) if isinstance(contexts, str) else contexts
    return Rule(name, ctx, args, is_block=False, multiple=multiple)


# The one source of truth for what greenarrow.conf may contain. Contexts are
# block names; ROOT is the top level. Add a setting by adding a line here.
SCHEMA: tuple[Rule, ...] = (
    # blocks
    block("general", ROOT, NO_ARGS),
    block("ip_address", ROOT, IP_NAMES),
    block("domain", (ROOT, "ip_address", "throttle_template"), DOMAIN_PATTERNS),
    block("mail_class", ROOT, NAME),
    block("relay_server", ROOT, VMTA_NAME),
    block("routing_rule", ROOT, VMTA_NAME),
    block("throttle_template", ROOT, NAME),
    block("throttle_program", ROOT, NAME),
    block("incoming_email_domain", ROOT, DOMAIN),  # greenarrow.lib.routing.incoming
    block("event_delivery_destination", ROOT, NAME),  # greenarrow.lib.events.destinations
    # general
    directive("system_max_smtp_connections", "general", INT),
    directive("queue_lifetime", ("general", "domain"), DURATION),
    directive("default_mail_class", "general", NAME),  # SimpleMH: greenarrow.lib.simplemh.mail_class
    directive("process_x_job_header", "general", YES_NO),
    directive("process_x_virtual_mta_header", "general", YES_NO),
    directive("default_event_tracking_metadata_storage", "general",
              one_of("local", "stateless", "external")),
    directive("default_virtual_mta", "general", VMTA_NAME),
    # yes: a Mail Class's bounce_address must be a bounce_mailbox here (greenarrow.lib.ops.config_check)
    directive("simplemh_validate_bounce_address", "general", YES_NO),
    # the database of the events (greenarrow.lib.events.database, .postgres)
    directive("events_database_url", "general", DATABASE_URL),
    directive("postgres_max_connections", "general", INT),
    directive("postgres_listen", "general", HOST_PORT),
    directive("postgres_bin_dir", "general", STRING),
    # events: greenarrow.lib.events.settings
    directive("server_id", "general", STRING),
    directive("record_events", "general", EVENT_TYPE_NAMES),
    # event_delivery_destination: values checked by greenarrow.lib.events.destinations
    directive("event_delivery_url", "event_delivery_destination", STRING),
    directive("event_delivery_logfile", "event_delivery_destination", STRING),
    directive("event_delivery_events", "event_delivery_destination", EVENT_TYPE_NAMES),
    directive("event_delivery_max_batch_size", "event_delivery_destination", INT),
    directive("event_delivery_timeout", "event_delivery_destination", DURATION),
    directive("event_delivery_signing_secret", "event_delivery_destination", STRING),
    directive("event_delivery_new_destination", "event_delivery_destination",
              one_of("leave_in_queue", "drop_from_queue")),
    # domain
    directive("smtp_route", "domain", HOST_PORT),
    directive("reuse_connections", "domain", YES_NO),
    directive("reuse_connections_max_messages", "domain", INT),
    directive("reuse_connections_idle_timeout", "domain", DURATION),
    directive("starttls_use", "domain", STARTTLS_USE),
    directive("max_concurrent_connections", ("domain", "relay_server"), INT),
    directive("max_messages_per_hour", ("domain", "relay_server"), INT),
    directive("throttle_program", "domain", NAME),
    # ip_address and relay_server (the VirtualMTAs that send)
    directive("smtp_source", ("ip_address", "relay_server"), IP),
    directive("hostname", ("ip_address", "relay_server"), HOSTNAME),
    directive("id", ("ip_address", "relay_server", "routing_rule"), INT),
    directive("throttle_template", "ip_address", NAME),
    directive("relay_host", "relay_server", HOST_PORT),
    directive("smtp_auth_username", "relay_server", STRING),
    directive("smtp_auth_password", "relay_server", STRING),
    # routing_rule
    directive("route", "routing_rule", ROUTE, multiple=True),
    directive("randomization", "routing_rule", RANDOMIZATION),
    # throttle_program (backoff mode)
    directive("deferral_rate", "throttle_program", PERCENT),
    directive("failure_rate", "throttle_program", PERCENT),
    directive("backoff_max_concurrent_connections", "throttle_program", LIMIT),
    directive("backoff_max_messages_per_hour", "throttle_program", LIMIT),
    directive("return_after", "throttle_program", DURATION),
    directive("window", "throttle_program", DURATION),
    directive("min_attempts", "throttle_program", INT),
    # mail_class
    directive("listid", "mail_class", STRING),
    directive("virtual_mta", "mail_class", STRING),
    directive("track_clicks_and_opens", "mail_class", YES_NO),
    directive("url_domain", "mail_class", STRING),
    directive("bounce_address", "mail_class", STRING),
    directive("list_unsubscribe", "mail_class", YES_NO),
    directive("statistic_report_grouping", "mail_class", STRING),
    directive("track_text_links", "mail_class", YES_NO),
    directive("handle_bounce_and_fbl", "mail_class", YES_NO),
    directive("bad_address_suppression", "mail_class", YES_NO),  # greenarrow.lib.core.bad_addresses
    # incoming mail: greenarrow.lib.routing.incoming
    directive("bounce_mailbox", "incoming_email_domain", LOCAL_PART, multiple=True),
    directive("spam_complaint_mailbox", "incoming_email_domain", LOCAL_PART, multiple=True),
    directive("mailbox", "incoming_email_domain", LOCAL_PART, multiple=True),
    directive("unsubscribe_mailbox", "incoming_email_domain", LOCAL_PART),  # tracker stage
    directive("lite_bounce_processor_address", (ROOT, "general"), ADDRESS, multiple=True),
    directive("lite_fbl_processor_address", (ROOT, "general"), ADDRESS, multiple=True),
    # bounce and complaint processors: greenarrow.lib.feedback.feedback_settings
    directive("lite_fbl_processor_headers", (ROOT, "general"), HEADER_NAMES),
    directive("lite_bounce_processor_include_report_text", (ROOT, "general"), YES_NO),
    directive("lite_fbl_processor_include_report_text", (ROOT, "general"), YES_NO),
    directive("simplemh_bad_address_dev_null_domain", "general", HOSTNAME),
)


def _index(schema: Iterable[Rule]) -> dict[tuple[str, str], Rule]:
    index: dict[tuple[str, str], Rule] = {}
    for rule in schema:
        for context in rule.contexts:
            if (context, rule.name) in index:
                raise ValueError(f"schema lists {rule.name!r} twice in context {context!r}")
            index[context, rule.name] = rule
    return index


_SCHEMA_INDEX = _index(SCHEMA)


def _context_label(context: str) -> str:
    return "at top level" if context == ROOT else f"in {context} block"


def validate(root: Block, schema: Iterable[Rule] = SCHEMA) -> None:
    """Raise ConfError on the first unknown, misplaced, repeated or badly valued entry.

    Blocks with the same name and argument in the same place are one block
    written in several pieces (GreenArrow's documentation says to *add*
    snippets like `ip_address * { domain x { ... } }` to the file), so they
    merge; but a directive may be set only once in the merged block.
    """
    index = _SCHEMA_INDEX if schema is SCHEMA else _index(schema)
    _validate_block(root, ROOT, [((), "")], index, {})


# The logical place of a block: (block name, argument key) from the root down.
_Path = tuple[tuple[str, object], ...]


def _where_allowed(index: dict[tuple[str, str], Rule], name: str) -> list[str]:
    return [ctx or "top level" for (ctx, n) in index if n == name]


def _validate_block(
    block: Block,
    context: str,
    paths: list[tuple[_Path, str]],
    index: dict[tuple[str, str], Rule],
    seen: dict[tuple[_Path, str], int],
) -> None:
    for d in block.directives:
        rule = index.get((context, d.name))
        _check_entry(d, rule, context, index, expect_block=False)
        assert rule is not None
        if rule.multiple:
            continue
        for path, label in paths:
            if (path, d.name) in seen:
                where = f"in {label}" if label else "at top level"
                first = seen[path, d.name]
                raise d.error(f"duplicate directive {d.name} {where} (first at line {first})")
            seen[path, d.name] = d.line
    for sub in block.blocks:
        rule = index.get((context, sub.name))
        _check_entry(sub, rule, context, index, expect_block=True)
        assert rule is not None
        keys: list[tuple[object, str]] = []
        for arg in sub.args:
            key = _arg_key(rule.args, arg)
            if any(key == k for k, _ in keys):
                raise sub.error(f"{sub.name}: {arg} is listed twice")
            keys.append((key, arg))
        sub_paths = [
            (
                path + ((sub.name, key),),
                " / ".join(filter(None, (label, f"{sub.name} {arg}".rstrip()))),
            )
            for path, label in paths
            for key, arg in keys or [(None, "")]
        ]
        _validate_block(sub, sub.name, sub_paths, index, seen)


def _arg_key(args: Args, arg: str) -> object:
    """What makes two block arguments the same: their parsed value, ignoring case."""
    value = args.parse(arg)
    return value.lower() if isinstance(value, str) else value


def _check_entry(
    entry: Directive | Block,
    rule: Rule | None,
    context: str,
    index: dict[tuple[str, str], Rule],
    expect_block: bool,
) -> None:
    kind = "block" if expect_block else "directive"
    if rule is None:
        places = _where_allowed(index, entry.name)
        if places:
            raise entry.error(
                f"{entry.name} is not allowed {_context_label(context)}"
                f" (allowed in: {', '.join(places)})"
            )
        raise entry.error(f"unknown {kind} {entry.name} {_context_label(context)}")
    if rule.is_block and not expect_block:
        raise entry.error(f"{entry.name} is a block: expected {entry.name} ... {{ ... }}")
    if not rule.is_block and expect_block:
        raise entry.error(f"{entry.name} is a directive, not a block")
    try:
        rule.args.check(entry.args)
    except ValueError as exc:
        raise entry.error(f"{entry.name}: {exc}") from None


# --------------------------------------------------------------------------
# The lexer

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+.*/[]$:;%|@")
_SPACE = frozenset(" \t\r\f\v")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")

# token kinds
WORD, STR, LBRACE, RBRACE, COMMA, SEMI, NEWLINE, EOF = (
    "word",
    "string",
    "{",
    "}",
    ",",
    ";",
    "newline",
    "end of file",
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    value: str
    line: int


def _tokens(text: str, filename: str) -> Iterator[_Token]:
    """Split `text` into tokens; comments vanish, newlines stay (they end directives)."""
    pos, line, size = 0, 1, len(text)
    after_value = False  # the previous token was a value: '#', quotes or letters may not touch it
    while pos < size:
        ch = text[pos]
        if ch in _SPACE:
            pos += 1
            after_value = False
            continue
        if after_value and ch not in "{},\n":
            if ch == "#":
                raise ConfError(
                    filename,
                    line,
                    "'#' touches a value: put a space before a comment,"
                    " or quote a value that contains '#'",
                )
            if (ch in _BARE and ch != ";") or ch in '"`':
                raise ConfError(filename, line, "missing space between two values")
        after_value = False
        if ch == "\n":
            yield _Token(NEWLINE, "\n", line)
            line += 1
            pos += 1
        elif ch == "#":
            end = text.find("\n", pos)
            pos = size if end < 0 else end
        elif ch in "{},":
            yield _Token(ch, ch, line)
            pos += 1
        elif ch == '"':
            value, pos, start = _double_quoted(text, pos, line, filename)
            yield _Token(STR, value, start)
            after_value = True
        elif ch == "`":
            end = text.find("`", pos + 1)
            if end < 0:
                raise ConfError(filename, line, "unterminated `backtick` string")
            yield _Token(STR, text[pos + 1 : end], line)
            line += text.count("\n", pos, end)
            pos = end + 1
            after_value = True
        elif ch in _BARE:
            end = pos
            while end < size and text[end] in _BARE:
                end += 1
            run = text[pos:end]
            pos = end
            word = run.strip(";")
            for _ in range(len(run) - len(run.lstrip(";"))):
                yield _Token(SEMI, ";", line)
            if word:
                yield _Token(WORD, word, line)
                after_value = not run.endswith(";")
                for _ in range(len(run) - len(run.rstrip(";"))):
                    yield _Token(SEMI, ";", line)
        else:
            raise ConfError(
                filename, line, f"unexpected character {ch!r}: quote values that contain it"
            )
    yield _Token(EOF, "", line)


def _double_quoted(text: str, pos: int, line: int, filename: str) -> tuple[str, int, int]:
    """Read the JSON-escaped string opening at text[pos]; return (value, next pos, line)."""
    out: list[str] = []
    i, size = pos + 1, len(text)
    while True:
        if i >= size or text[i] == "\n":
            raise ConfError(filename, line, 'unterminated "double-quoted" string')
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1, line
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = text[i + 1 : i + 2]
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 2
            continue
        if esc != "u":
            if esc in ("", "\n"):
                raise ConfError(filename, line, 'unterminated "double-quoted" string')
            raise ConfError(filename, line, f"bad escape '\\{esc}' in double-quoted string")
        code = _hex4(text, i + 2, line, filename)
        i += 6
        if 0xD800 <= code <= 0xDBFF:
            if text[i : i + 2] != "\\u":
                raise ConfError(filename, line, "bad escape: \\u high surrogate without its pair")
            low = _hex4(text, i + 2, line, filename)
            if not 0xDC00 <= low <= 0xDFFF:
                raise ConfError(filename, line, "bad escape: \\u high surrogate without its pair")
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
            i += 6
        elif 0xDC00 <= code <= 0xDFFF:
            raise ConfError(filename, line, "bad escape: \\u low surrogate without its pair")
        out.append(chr(code))


def _hex4(text: str, pos: int, line: int, filename: str) -> int:
    digits = text[pos : pos + 4]
    if len(digits) != 4 or not all(ch in _HEX for ch in digits):
        raise ConfError(filename, line, "bad escape: \\u needs 4 hex digits")
    return int(digits, 16)


# --------------------------------------------------------------------------
# The parser


class _Parser:
    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        self.tokens = _tokens(text, filename)
        self.peeked: list[_Token] = []

    def next(self) -> _Token:
        return self.peeked.pop() if self.peeked else next(self.tokens)

    def push(self, token: _Token) -> None:
        self.peeked.append(token)

    def error(self, line: int, what: str) -> ConfError:
        return ConfError(self.filename, line, what)

    def body(self, block: Block, depth: int) -> None:
        """Read statements into `block` until its `}` (or the end, for the root)."""
        while True:
            tok = self.next()
            if tok.kind in (NEWLINE, SEMI):
                continue
            if tok.kind == EOF:
                if depth:
                    raise self.error(
                        block.line, f"block {block.name} is never closed (missing '}}')"
                    )
                return
            if tok.kind == RBRACE:
                if not depth:
                    raise self.error(tok.line, "unexpected '}' (no block to close)")
                return
            if tok.kind == LBRACE:
                raise self.error(tok.line, "'{' without a block name")
            if tok.kind == COMMA:
                raise self.error(tok.line, "unexpected ','")
            if tok.kind == STR:
                raise self.error(tok.line, "a directive name cannot be quoted")
            if not _NAME.fullmatch(tok.value):
                raise self.error(tok.line, f"bad directive name {tok.value!r}")
            self.statement(block, tok, depth)

    def statement(self, parent: Block, name: _Token, depth: int) -> None:
        args: list[str] = []
        comma: _Token | None = None  # a ',' waiting for the value after it
        while True:
            tok = self.next()
            if tok.kind in (WORD, STR):
                args.append(tok.value)
                comma = None
                continue
            if tok.kind == COMMA:
                if comma is not None or not args:
                    raise self.error(tok.line, "unexpected ','")
                comma = tok
                continue
            if tok.kind == NEWLINE:
                if comma is not None:
                    continue  # a list goes on after a trailing ','
                tok = self._after_newlines()
                if tok.kind != LBRACE:
                    self.push(tok)
                    tok = _Token(NEWLINE, "\n", tok.line)
            if comma is not None:
                raise self.error(comma.line, "',' must be followed by a value")
            if tok.kind == LBRACE:
                if depth >= MAX_DEPTH:
                    raise self.error(tok.line, f"blocks nested more than {MAX_DEPTH} deep")
                sub = Block(name.value, args, [], [], name.line, self.filename)
                self.body(sub, depth + 1)
                parent.blocks.append(sub)
                return
            if tok.kind in (RBRACE, EOF):
                self.push(tok)
            parent.directives.append(Directive(name.value, args, name.line, self.filename))
            return

    def _after_newlines(self) -> _Token:
        """The first token after a run of newlines; a `{` there opens a block."""
        skipped: list[_Token] = []
        while (tok := self.next()).kind == NEWLINE:
            skipped.append(tok)
        return tok


def parse(text: str, filename: str = CONF_NAME, *, check: bool = True) -> Block:
    """Parse greenarrow.conf text into its root block (named "").

    With `check` (the default) the tree is also validated against SCHEMA.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    root = Block(ROOT, [], [], [], 0, filename)
    _Parser(text, filename).body(root, 0)
    if check:
        validate(root)
    return root


def load(path: str | os.PathLike[str], *, check: bool = True) -> Block:
    """Read and parse a file; unreadable or non-UTF-8 files are ConfErrors too."""
    filename = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfError(filename, None, "no such file") from None
    except OSError as exc:
        raise ConfError(filename, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfError(filename, line, "not valid UTF-8") from None
    return parse(text, filename, check=check)


def conf_path(root: Root) -> Path:
    """Where an install root keeps its greenarrow.conf."""
    return root.control / CONF_NAME


def load_root(root: Root) -> Block:
    """The configuration of an install root; no file means an empty configuration."""
    path = conf_path(root)
    if not path.exists():
        return Block(ROOT, [], [], [], 0, os.fspath(path))
    return load(path)


# --------------------------------------------------------------------------
# Writing


def quote(value: str) -> str:
    """`value` as written in greenarrow.conf: bare when possible, else double-quoted."""
    if (
        value
        and all(ch in _BARE for ch in value)
        and not value.startswith(";")
        and not value.endswith(";")
    ):
        return value
    return json.dumps(value, ensure_ascii=False)


def dumps(root: Block, indent: str = "    ") -> str:
    """The text of a tree; parse(dumps(tree)) == tree (directives before blocks)."""
    lines: list[str] = []
    _dump_body(root, 0, indent, lines)
    return "".join(line + "\n" for line in lines)


def _dump_body(block: Block, level: int, indent: str, lines: list[str]) -> None:
    pad = indent * level
    for d in block.directives:
        lines.append(" ".join([pad + d.name, *map(quote, d.args)]))
    for sub in block.blocks:
        head = pad + sub.name
        if sub.args:
            head += " " + ", ".join(map(quote, sub.args))
        lines.append(head + " {")
        _dump_body(sub, level + 1, indent, lines)
        lines.append(pad + "}")
