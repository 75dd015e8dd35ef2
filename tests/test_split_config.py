"""The configuration steps of the split deployment that are not plain control files."""

from __future__ import annotations

import pytest

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.ops.config_check import check_conf

INCOMING = """
incoming_email_domain bounce.example.com {
    bounce_mailbox return
    spam_complaint_mailbox fbl
}
"""


def mail_class(address: str) -> str:
    return f"mail_class news {{\n    bounce_address {address}\n}}\n"


def validate(value: str) -> str:
    return f"general {{\n    simplemh_validate_bounce_address {value}\n}}\n"


@pytest.mark.parametrize("text", [
    mail_class("return@bounce.example.com"),  # a sending server: the mailbox is elsewhere
    validate("no") + mail_class("return@bounce.example.com"),
    validate("yes") + INCOMING + mail_class("return@bounce.example.com"),
    validate("yes") + INCOMING + mail_class("RETURN@Bounce.Example.com"),
])
def test_bounce_address_accepted(text: str) -> None:
    check_conf(conflib.parse(text))


@pytest.mark.parametrize("address", ["return@elsewhere.example", "fbl@bounce.example.com",
                                     "other@bounce.example.com"])
def test_bounce_address_validated_when_asked(address: str) -> None:
    text = validate("yes") + INCOMING + mail_class(address)
    with pytest.raises(conflib.ConfError) as caught:
        check_conf(conflib.parse(text))
    message = str(caught.value)
    assert f":{text.splitlines().index('    bounce_address ' + address) + 1}:" in message
    assert f"mail_class news: bounce_address {address} is not a bounce_mailbox" in message
