"""The incoming mail the engine accepts for itself: its domains and mailboxes.

greenarrow.conf names them (docs/configuration.md "Incoming mail"):

    incoming_email_domain bounces.example.com {
        bounce_mailbox return          # -> the bounce processor
        spam_complaint_mailbox fbl     # -> the spam complaint processor
        unsubscribe_mailbox unsub      # -> the unsubscribe processor
        mailbox postmaster             # a plain Maildir
    }
    lite_bounce_processor_address lite-bounces@bounces.example.com
    lite_fbl_processor_address lite-fbl@bounces.example.com

Every mailbox is a Maildir `<root>/maildata/<domain>/<local>/`. smtpd
accepts mail for these addresses from anyone and refuses other local parts
of an incoming domain; queue-send hands their recipients to the `local`
agent, which writes the message into the Maildir.

Decisions (GreenArrow's documentation is silent on them):

* The domain of a lite processor address is an incoming domain too.
* `postmaster@<domain>` exists for every incoming domain (RFC 5321 4.5.1):
  the configured mailbox of that name, else an implicit plain mailbox
  `maildata/<domain>/postmaster/`. The bare `postmaster` (no domain) is
  the postmaster of the first `incoming_email_domain` in the file (else of
  the first lite processor address's domain); with no incoming
  domain at all, `postmaster@<me>` (the `me` control file) is the one
  local address, so that the engine still takes mail for its postmaster.
* A bounce mailbox `return` also takes the encoded SimpleMH bounce
  addresses made from it (`return-<...>-<version><tag>@domain`,
  greenarrow.lib.simplemh.return_path): their shape is checked here, their tag by
  the bounce processor, which has the secret constants. A lite bounce
  address `lite@domain` takes any extension `lite-<anything>@domain`
  (the sender encodes what it wants in its MAIL FROM).
* An unsubscribe request, the mailto: of SimpleMH's List-Unsubscribe (the
  unsubscribe form of a bounce mailbox's encoded address, versions 3, 4,
  7 and 8 of greenarrow.lib.simplemh.return_path), goes to the
  domain's `unsubscribe_mailbox` when it has one (else to the bounce
  mailbox, whose processor refuses it), so that mail sent before the
  directive was set is handled too.
* A local part configured twice in one domain is an error.
* A failed delivery whose sender is an encoded address of a bounce mailbox,
  or a lite bounce address (`sync_bounce_mailbox`), is recorded by the
  bounce processor from the delivery log (a synchronous bounce); queue-send
  mails no bounce message for it (docs/bounces.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.config import control
from greenarrow.lib.simplemh import return_path as bounce_address

BOUNCE = "bounce"
SPAM_COMPLAINT = "spam_complaint"
MAILBOX = "mailbox"
LITE_BOUNCE = "lite_bounce"
LITE_FBL = "lite_fbl"
UNSUBSCRIBE = "unsubscribe"
KINDS = (BOUNCE, SPAM_COMPLAINT, MAILBOX, LITE_BOUNCE, LITE_FBL, UNSUBSCRIBE)
POSTMASTER = "postmaster"
MAILDATA = "maildata"

# greenarrow.conf directive -> mailbox kind
_DOMAIN_DIRECTIVES = (
    ("bounce_mailbox", BOUNCE),
    ("spam_complaint_mailbox", SPAM_COMPLAINT),
    ("mailbox", MAILBOX),
    ("unsubscribe_mailbox", UNSUBSCRIBE),
)
_LITE_DIRECTIVES = (
    ("lite_bounce_processor_address", LITE_BOUNCE),
    ("lite_fbl_processor_address", LITE_FBL),
)
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz234567")


@dataclass(frozen=True)
class Mailbox:
    """One address the engine delivers to itself, and its Maildir."""

    domain: str  # lower-case ASCII
    local: str  # lower-case local part
    kind: str  # one of KINDS
    path: str  # its Maildir: <root>/maildata/<domain>/<local>/

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


def maildir_path(root: str, domain: str, local: str) -> str:
    """The Maildir of `local@domain` under install root `root` (with a final `/`)."""
    return os.path.join(os.fspath(root), MAILDATA, domain, local, "")


class _Index:
    """The mailboxes of one configuration, ready for lookups."""

    def __init__(self, root: str, conf: conflib.Block) -> None:
        self.root = os.fspath(root)
        self.boxes: dict[tuple[str, str], Mailbox] = {}
        self.order: list[Mailbox] = []
        self.domains: list[str] = []  # in the order of the file
        self.me_postmaster: Mailbox | None = None  # read from control/me when first needed
        lines: dict[tuple[str, str], conflib.Directive] = {}

        def add(domain: str, local: str, kind: str, where: conflib.Directive | None) -> None:
            key = (domain, local)
            if key in self.boxes:
                first = lines.get(key)
                at = f" (first at line {first.line})" if first is not None else ""
                assert where is not None
                raise where.error(f"{local}@{domain} is configured twice{at}")
            box = Mailbox(domain, local, kind, maildir_path(self.root, domain, local))
            self.boxes[key] = box
            self.order.append(box)
            if where is not None:
                lines[key] = where
            if domain not in self.domains:
                self.domains.append(domain)

        for block in conf.blocks_named("incoming_email_domain"):
            for arg in block.args:
                domain = conflib.parse_domain(arg)
                if domain not in self.domains:
                    self.domains.append(domain)
                for d in block.directives:
                    for name, kind in _DOMAIN_DIRECTIVES:
                        if d.name == name:
                            add(domain, conflib.parse_local_part(d.as_str()), kind, d)
        general = conf.block("general")
        for source in (conf, general) if general is not None else (conf,):
            for name, kind in _LITE_DIRECTIVES:
                for d in source.directives_named(name):
                    address = conflib.parse_address(d.as_str())
                    local, _, domain = address.rpartition("@")
                    add(domain, local, kind, d)
        for domain in self.domains:
            if (domain, POSTMASTER) not in self.boxes:
                add(domain, POSTMASTER, MAILBOX, None)
        self.unsubscribe = {b.domain: b for b in self.order if b.kind == UNSUBSCRIBE}
        # bounce and lite bounce mailboxes that take extensions, longest first
        self.extended = sorted(
            (b for b in self.order if b.kind in (BOUNCE, LITE_BOUNCE)),
            key=lambda b: -len(b.local),
        )

    def find(self, address: str) -> Mailbox | None:
        address = address.strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        local, at, domain = address.rpartition("@")
        if not at:
            return self.bare_postmaster() if address.lower() == POSTMASTER else None
        local = local.lower()
        domain = domain.lower().rstrip(".")
        if not domain.isascii():
            try:
                domain = conflib.ascii_domain(domain)
            except ValueError:
                return None
        box = self.boxes.get((domain, local))
        if box is not None:
            return box
        if domain not in self.domains:
            if not self.domains and local == POSTMASTER:
                box = self.bare_postmaster()
                return box if box.domain == domain else None
            return None
        for box in self.extended:
            if box.domain != domain or not local.startswith(box.local + "-"):
                continue
            if box.kind == LITE_BOUNCE:
                return box
            if _encoded_shape(local):
                if _unsubscribe_request(local) and domain in self.unsubscribe:
                    return self.unsubscribe[domain]
                return box
        return None

    def sync_bounce_mailbox(self, address: str) -> Mailbox | None:
        box = self.find(address) if address else None
        if box is None or box.kind not in (BOUNCE, LITE_BOUNCE):
            return None
        if box.kind == BOUNCE and address.strip().strip("<>").rpartition("@")[0].lower() \
                == box.local:
            return None  # the bounce mailbox's own address: no encoded message identity
        return box

    def bare_postmaster(self) -> Mailbox:
        """The mailbox of `postmaster` without a domain (see the module docstring)."""
        if self.domains:
            return self.boxes[self.domains[0], POSTMASTER]
        if self.me_postmaster is None:
            me = conflib.ascii_domain(control.read_text(os.path.join(self.root, "control"),
                                                       "me"))
            self.me_postmaster = Mailbox(me, POSTMASTER, MAILBOX,
                                         maildir_path(self.root, me, POSTMASTER))
        return self.me_postmaster


def _encoded_shape(local: str) -> bool:
    """Whether a lower-cased local part ends like an encoded bounce address (not verified)."""
    last = local.rpartition("-")[2]
    return (len(last) == 1 + bounce_address.TAG_CHARS and last[0] in bounce_address.VERSIONS
            and _TAG_CHARS.issuperset(last[1:]))


def _unsubscribe_request(local: str) -> bool:
    """Whether an encoded address (shape checked) is the unsubscribe form (mailto:)."""
    version = local.rpartition("-")[2][0]
    return bounce_address.VERSIONS[version][1]


_last: tuple[str, conflib.Block, _Index] | None = None


def _index(root: str, conf: conflib.Block) -> _Index:
    """The index of `conf`, kept while the same configuration object is asked about."""
    global _last
    root = os.fspath(root)
    last = _last
    if last is not None and last[0] == root and last[1] is conf:
        return last[2]
    index = _Index(root, conf)
    _last = (root, conf, index)
    return index


def mailboxes(root: str, conf: conflib.Block) -> list[Mailbox]:
    """Every mailbox of `conf`: the incoming_email_domain blocks' in the order of the file,
    then the lite processor addresses (top level, then `general`), then the implicit
    postmasters.

    Raises conf.ConfError (with its line) for a local part configured twice.
    """
    return list(_index(root, conf).order)


def find(root: str, conf: conflib.Block, address: str) -> Mailbox | None:
    """The mailbox an envelope recipient is delivered to, or None when it is not local.

    `address` is `local@domain` (with or without `<>`), or the bare
    `postmaster`. The local part matches case-insensitively.
    """
    return _index(root, conf).find(address)


def sync_bounce_mailbox(root: str, conf: conflib.Block, sender: str) -> Mailbox | None:
    """The mailbox whose processor turns a failed delivery of mail from `sender` into a
    synchronous bounce event straight from the delivery log, or None.

    That is an encoded bounce address of a bounce mailbox (shape only; the
    processor trusts the log line, which the engine wrote) or a lite bounce
    address (with or without extension). A bounce mailbox's own plain
    address is not: its failures carry no message identity. With
    `events_database_url none` no processor reads the logs: None too, so the
    bounce message is still mailed.
    """
    general = conf.block("general")
    if general is not None and general.get_str("events_database_url") == conflib.DATABASE_NONE:
        return None
    return _index(root, conf).sync_bounce_mailbox(sender)


def incoming_domains(conf: conflib.Block) -> set[str]:
    """The lower-case domains whose mail the engine takes for itself."""
    domains = {
        conflib.parse_domain(arg)
        for block in conf.blocks_named("incoming_email_domain")
        for arg in block.args
    }
    general = conf.block("general")
    for source in (conf, general) if general is not None else (conf,):
        for name, _ in _LITE_DIRECTIVES:
            for d in source.directives_named(name):
                domains.add(conflib.parse_address(d.as_str()).rpartition("@")[2])
    return domains
