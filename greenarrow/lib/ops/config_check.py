"""Everything the services will refuse in the configuration, found before they see it.

`greenarrow_config check` and `reload` run this, so a mistake that parses
(a route to an unknown VirtualMTA, a relay without relay_host, a missing
throttle program, a bad Mail Class value, an unreadable DKIM key) is
reported with its file and line instead of making queue-send keep its old
configuration on reload, or restart in a loop at start.
"""

from __future__ import annotations

from pathlib import Path

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.config import control
from greenarrow.lib.core.paths import Root


class ConfigProblem(Exception):
    """The configuration is not usable; the message names the file (and line)."""


def check_conf(conf: conflib.Block) -> None:
    """Build what queue-send and the injectors build from greenarrow.conf."""
    from greenarrow.lib.events import destinations, settings
    from greenarrow.lib.routing import incoming
    from greenarrow.lib.routing.domain_rules import DomainRules
    from greenarrow.lib.routing.throttle_config import throttle_programs
    from greenarrow.lib.routing.virtual_mta import VirtualMtas
    from greenarrow.lib.simplemh import mail_class

    DomainRules(conf)
    VirtualMtas(conf)
    throttle_programs(conf)
    incoming.mailboxes("", conf)  # a local part configured twice
    settings.recorded_types(conf)
    destinations.load(conf)
    try:
        mail_class.compile_conf(conf)
    except mail_class.MailClassConfigError as e:
        raise ConfigProblem(str(e)) from None
    check_bounce_addresses(conf)


def check_bounce_addresses(conf: conflib.Block) -> None:
    """With `general { simplemh_validate_bounce_address yes }`, every Mail Class's
    bounce_address must be a bounce_mailbox of one of this server's incoming domains.

    Off by default: a sending server of a split deployment (docs/operations.md)
    sends its bounces to an event server's mailbox, which it must not own.
    """
    from greenarrow.lib.routing import incoming

    general = conf.block("general")
    if general is None or not general.get_bool("simplemh_validate_bounce_address", False):
        return
    for block in conf.blocks_named("mail_class"):
        for d in block.directives:
            if d.name != "bounce_address":
                continue
            box = incoming.find("", conf, d.args[0])
            if box is None or box.kind != incoming.BOUNCE:
                raise d.error(
                    f"mail_class {block.args[0]}: bounce_address {d.args[0]} is not a "
                    "bounce_mailbox of an incoming_email_domain of this server (general "
                    "simplemh_validate_bounce_address is yes; a sending server whose bounces "
                    "go to an event server sets it to no)")


def check_root(root: Root, conf_file: Path | None = None) -> None:
    """Check greenarrow.conf (or `conf_file`), the DKIM keys and control/smtp.users;
    ConfigProblem if unusable."""
    from greenarrow.lib.dkim.signing import DkimSigner

    try:
        conf = conflib.load(conf_file) if conf_file is not None else conflib.load_root(root)
        check_conf(conf)
    except conflib.ConfError as e:
        raise ConfigProblem(str(e)) from None
    if conf_file is None:
        from greenarrow.lib.config import smtp_users

        try:
            DkimSigner.from_control(root.control)
            smtp_users.read(root.control)
        except (control.ControlError, smtp_users.SmtpUsersError) as e:
            raise ConfigProblem(str(e)) from None
