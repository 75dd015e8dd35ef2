"""`control/smtp.users`: who may submit over SMTP with a user name and password.

One user a line, `#` comments and empty lines ignored:

    name:scrypt$16384$8$1$<salt, base64>$<hash, base64>[:mail class[:force]]

The password is stored only as its scrypt hash (RFC 7914; make a line with
`python -m greenarrow.lib.config.smtp_users NAME`, which reads the password
on standard input). The optional Mail Class is the default for what the
user sends (as `GREENARROW_MAILCLASS`); with `force` it replaces any
`X-GreenArrow-MailClass` header too (GreenArrow's
`engine_user_force_mail_class`). An authenticated user may relay.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1


class SmtpUsersError(Exception):
    """A line of control/smtp.users that cannot be used (the message names it)."""


class SmtpUser:
    __slots__ = ("name", "hash", "mail_class", "force_mail_class")

    def __init__(self, name: str, hash: str, mail_class: str = "",
                 force_mail_class: bool = False) -> None:
        self.name = name
        self.hash = hash
        self.mail_class = mail_class
        self.force_mail_class = force_mail_class


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, dklen=32)
    return (f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def check_password(stored: str, password: str) -> bool:
    """Whether `password` is the one `stored` (a hash_password result) was made from."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode("utf-8", "surrogateescape"),
                             salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(base64.b64decode(digest)), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def parse(text: str, filename: str = "smtp.users") -> dict[str, SmtpUser]:
    users: dict[str, SmtpUser] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        where = f"{filename} line {number}"
        if len(fields) < 2 or len(fields) > 4 or not fields[0]:
            raise SmtpUsersError(f"{where}: expected name:hash[:mail class[:force]]")
        name, stored = fields[0], fields[1]
        if not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise SmtpUsersError(f"{where}: the password of {name!r} is not a scrypt hash"
                                 " (make one with python -m greenarrow.lib.config.smtp_users)")
        mail_class = fields[2] if len(fields) > 2 else ""
        force = len(fields) > 3 and fields[3] == "force"
        if len(fields) > 3 and not force:
            raise SmtpUsersError(f"{where}: the fourth field may only be 'force'")
        if name in users:
            raise SmtpUsersError(f"{where}: user {name!r} appears twice")
        users[name] = SmtpUser(name, stored, mail_class, force)
    return users


def read(control_dir: str | os.PathLike) -> dict[str, SmtpUser]:
    """The users of control/smtp.users ({} when the file is missing)."""
    path = os.path.join(control_dir, "smtp.users")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise SmtpUsersError(f"{path}: {e}") from None
    return parse(text, path)


def main() -> None:
    """`python -m greenarrow.lib.config.smtp_users NAME [CLASS [force]]`: a line for the file."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 100)
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        sys.exit("smtp_users: no password on standard input")
    print(":".join([sys.argv[1], hash_password(password), *sys.argv[2:4]]))


if __name__ == "__main__":
    main()
