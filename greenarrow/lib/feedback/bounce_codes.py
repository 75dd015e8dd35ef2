"""The bounce code table: the one owner of every bounce code, its name and type.

Numbers follow the BounceStudio / SparkPost (Momentum) taxonomy, which agrees
with the one code GreenArrow publishes (10 = hard, the user does not exist).
The type column is ours (GreenArrow does not publish its table): `h` only
where the address itself is bad, `s` where a retry later may succeed, `o`
where the failure is not the address's fault (blocks, policy, content) or is
not a failure at all (auto-replies, delay warnings, challenge-responses).
docs/bounces.md says why for each row.
"""

from __future__ import annotations

from dataclasses import dataclass

HARD = "h"
SOFT = "s"
OTHER = "o"
TYPES = (HARD, SOFT, OTHER)


@dataclass(frozen=True)
class BounceCode:
    number: int
    name: str
    type: str


CODES: dict[int, BounceCode] = {c.number: c for c in (
    BounceCode(0, "not a bounce", OTHER),
    BounceCode(1, "undetermined", OTHER),
    BounceCode(10, "invalid recipient", HARD),
    BounceCode(20, "soft bounce", SOFT),
    BounceCode(21, "dns failure", SOFT),
    BounceCode(22, "mailbox full", SOFT),
    BounceCode(23, "too large", SOFT),
    BounceCode(24, "timeout", SOFT),
    BounceCode(25, "admin failure", OTHER),
    BounceCode(30, "no recipient", OTHER),
    BounceCode(40, "generic bounce", SOFT),
    BounceCode(50, "mail block", OTHER),
    BounceCode(51, "spam block", OTHER),
    BounceCode(52, "spam content", OTHER),
    BounceCode(53, "prohibited attachment", OTHER),
    BounceCode(54, "relaying denied", OTHER),
    BounceCode(60, "auto-reply", OTHER),
    BounceCode(70, "transient failure", OTHER),
    BounceCode(80, "subscribe", OTHER),
    BounceCode(90, "unsubscribe", OTHER),
    BounceCode(100, "challenge-response", OTHER),
)}

# Codes the classifier itself assigns outside the rules file.
NOT_A_BOUNCE = 0  # spam complaints (BounceStudio's "non bounce")
UNDETERMINED = 1
INVALID_RECIPIENT = 10
GENERIC_SOFT = 20
NO_RECIPIENT = 30
GENERIC = 40
AUTO_REPLY = 60
TRANSIENT = 70
UNSUBSCRIBE = 90
CHALLENGE_RESPONSE = 100


def code_type(number: int) -> str:
    """The default type of a code (KeyError for a code not in the table)."""
    return CODES[number].type
