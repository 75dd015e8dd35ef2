"""The secret constants: two 128-bit values that sign tracking links and bounce addresses.

Every server of a fleet must hold the same two, so that a link
made by one sending server is verified by any event server. They live in
`control/secret_constants`, one 32-hex-digit constant per line, readable by
the engine only (mode 0600, or 0640 with the engine group where the services
run as the engine's users); `greenarrow init` creates them at random. A file
that other users may read is refused, with the command that fixes it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # pathlib, secrets and typing cost command-line injection milliseconds
if TYPE_CHECKING:
    from pathlib import Path

FILE = "secret_constants"


class SecretConstantsError(Exception):
    pass


def valid(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value)


def path(control_dir: Path | str) -> Path:
    from pathlib import Path

    return Path(control_dir) / FILE


def read(control_dir: Path | str) -> tuple[str, str]:
    """The two constants; SecretConstantsError naming the file when missing or malformed."""
    p = os.path.join(control_dir, FILE)
    try:
        with open(p) as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o004 or (st.st_mode & 0o040 and st.st_gid != os.getegid()):
                # imported only here: command-line injection reads this file
                from greenarrow.lib.core import users

                problem = users.private_file_problem(p, st)
                if problem:
                    raise SecretConstantsError(problem)
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        raise SecretConstantsError(f"{p}: missing; run `greenarrow init`") from None
    if len(lines) != 2 or not all(valid(v) for v in lines):
        raise SecretConstantsError(f"{p}: expected two lines of 32 hexadecimal digits")
    return lines[0].lower(), lines[1].lower()


def write(control_dir: Path, constant1: str, constant2: str) -> None:
    """Replace both constants atomically, readable by the engine only (users.restrict)."""
    for name, value in (("constant1", constant1), ("constant2", constant2)):
        if not valid(value):
            raise SecretConstantsError(f"{name} must be 32 hexadecimal digits, not {value!r}")
    p = path(control_dir)
    tmp = p.with_name(f".{p.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{constant1.lower()}\n{constant2.lower()}\n")
    from greenarrow.lib.core import users

    users.restrict(tmp)
    os.replace(tmp, p)


_derived: dict[tuple[tuple[str, str], bytes], bytes] = {}


def derive_key(constants: tuple[str, str], purpose: bytes) -> bytes:
    """An HMAC key for one purpose, derived from the two constants (cached).

    Each purpose (tracking data, bounce-address tags) has a key of its own,
    so that a tag made for one can never be replayed as the other.
    """
    key = _derived.get((constants, purpose))
    if key is None:
        import hmac

        master = bytes.fromhex(constants[0]) + bytes.fromhex(constants[1])
        key = _derived[(constants, purpose)] = hmac.digest(master, purpose, "sha256")
    return key


def random_pair() -> tuple[str, str]:
    import secrets

    return secrets.token_hex(16), secrets.token_hex(16)


def ensure(control_dir: Path) -> bool:
    """Create random constants when there are none; True when created."""
    if path(control_dir).exists():
        return False
    write(control_dir, *random_pair())
    return True
