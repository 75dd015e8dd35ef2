"""The engine's users and group: which service runs as whom, and who may read a secret.

Started as root, the supervisor runs no service as root (qmail's discipline,
which has qmaild, qmailq and qmailr): each service runs as the user of its
job, all of them in one group, `greenarrow`, through which one reads what
another writes.

    gasmtpd   smtpd: talks to the network; commits into queue/ram
    gaqueue   queue-send (every queue), injectd, and any service not named
              below: owns the queues, the delivery logs and var/
    garemote  the remote delivery workers: read queue entries (group),
              hold the DKIM keys' group read, write their sockets in var/

`greenarrow init` run as root creates them (system accounts, no login
shell, no home) and sets the install root's ownership and modes
(greenarrow.lib.ops.install_root). Run as any other user nothing here is used:
every service runs as that user, as before. docs/operations.md section 4b
says which files each user may read and write.
"""

from __future__ import annotations

import os

# Only os at import time: secret_constants imports this module on command-line
# injection's path when it checks who may read the constants.

GROUP = "greenarrow"
QUEUE_USER = "gaqueue"
SMTPD_USER = "gasmtpd"
REMOTE_USER = "garemote"
USERS = {
    QUEUE_USER: "GreenArrow engine queue owner",
    SMTPD_USER: "GreenArrow engine SMTP listener",
    REMOTE_USER: "GreenArrow engine remote delivery",
}

#: The user of each program of init/services (greenarrow/bin/<program>.py).
#: A program not named here runs as the queue owner, never as root.
PROGRAM_USERS = {
    "smtpd": SMTPD_USER,
    "injectd": QUEUE_USER,
    "queue_send": QUEUE_USER,
    "remote": REMOTE_USER,
}

#: What a service started by a root supervisor creates is readable by the
#: engine's group (the counts smtpd reads, the entries the workers read),
#: writable by its owner only, and hidden from other local users; the few
#: things the group must write are made so on purpose (the ram-queue's commit
#: folders, the trigger FIFOs). The remote workers keep group write: queue-send
#: must be able to connect to their sockets.
SERVICE_UMASK = 0o027
UMASKS = {REMOTE_USER: 0o007}


class UsersError(Exception):
    pass


class Account:
    """A service user as the kernel knows it: name, uid, and gid, the engine group
    (the only group a service keeps)."""

    __slots__ = ("name", "uid", "gid")

    def __init__(self, name: str, uid: int, gid: int) -> None:
        self.name, self.uid, self.gid = name, uid, gid

    def __repr__(self) -> str:
        return f"Account({self.name!r}, {self.uid}, {self.gid})"


def separated() -> bool:
    """Whether this process runs the engine with separate users (it is root)."""
    return os.geteuid() == 0


def user_for(program: str) -> str:
    return PROGRAM_USERS.get(program, QUEUE_USER)


def umask_for(user: str) -> int:
    return UMASKS.get(user, SERVICE_UMASK)


def group_id() -> int | None:
    """The engine group's gid, or None where `greenarrow init` never ran as root."""
    import grp

    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return None


def account(name: str) -> Account:
    """The uid of `name` and the engine group; UsersError when it does not exist."""
    import pwd

    gid = group_id()
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        uid = None
    if uid is None or gid is None:
        raise UsersError(f"user {name} or group {GROUP} does not exist: "
                         "run `greenarrow init` as root to create them")
    return Account(name, uid, gid)


def _nologin() -> str:
    import shutil

    for shell in ("nologin", "false"):
        found = shutil.which(shell, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if found:
            return found
    return "/bin/false"


def _run(command: list[str], exists_code: int) -> None:
    """Run groupadd/useradd; `exists_code` (a concurrent creation) counts as done."""
    import subprocess

    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsersError(f"cannot run {command[0]} to create the engine's users: {e}") from None
    if result.returncode not in (0, exists_code):
        raise UsersError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")


def ensure_accounts() -> list[str]:
    """Create the group and the users that are missing (as root); return what was made.

    Idempotent, and safe when two inits run at once: groupadd/useradd's
    "already exists" (exit 9) counts as done.
    """
    import pwd

    created = []
    if group_id() is None:
        _run(["groupadd", "--system", GROUP], 9)
        created.append(f"group {GROUP}")
    for name, comment in USERS.items():
        try:
            pwd.getpwnam(name)
            continue
        except KeyError:
            pass
        _run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
              "--shell", _nologin(), "--gid", GROUP, "--comment", comment, name], 9)
        created.append(f"user {name}")
    for name in USERS:
        account(name)  # UsersError if creation failed silently
    return created


def service_accounts() -> dict[str, Account]:
    """Every service user, by name (the supervisor looks them up once)."""
    return {name: account(name) for name in USERS}


def _searchable(st: os.stat_result, acct: Account) -> bool:
    if st.st_uid == acct.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == acct.gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def unreachable(path: str, acct: Account) -> str | None:
    """The first folder on the way to `path` that `acct` may not pass, described; or None."""
    real = os.path.realpath(path)
    folders = [real] if os.path.isdir(real) else []
    parent = os.path.dirname(real)
    while True:
        folders.append(parent)
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    for folder in reversed(folders):
        st = os.stat(folder)
        if not _searchable(st, acct):
            return (f"{folder} (mode {st.st_mode & 0o7777:04o}) keeps user {acct.name} "
                    f"from reaching {path}")
    return None


def reach_problems(paths: list[str], accounts: dict[str, Account]) -> list[str]:
    """Why a service user could not run the engine: each unreachable path, once."""
    problems = []
    for path in paths:
        for acct in accounts.values():
            problem = unreachable(path, acct)
            if problem:
                problems.append(problem)
                break
    return problems


# -- secrets ------------------------------------------------------------------


def private_file_problem(path: str, st: os.stat_result) -> str | None:
    """Why a secret (a DKIM key, secret_constants) is readable by too many, or None.

    Refused: read permission for others, or for a group other than the
    engine's group or the reader's own group. The message names the fix.
    """
    mode = st.st_mode & 0o777
    if mode & 0o004:
        who = "every local user"
    elif mode & 0o040 and st.st_gid not in (group_id(), os.getegid()):
        import grp

        try:
            name = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            name = str(st.st_gid)
        who = f"group {name}"
    else:
        return None
    if group_id() is not None:
        fix = f"chgrp {GROUP} {path} && chmod 640 {path}"
    else:
        fix = f"chmod 600 {path}"
    return f"{path}: readable by {who} (mode {mode:04o}); a secret must not be: {fix}"


def restrict(path: str | os.PathLike) -> None:
    """Make a secret file readable by the engine only: root:greenarrow 0640 when
    the engine runs separated, else 0600 (its owner only)."""
    gid = group_id() if separated() else None
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o640)
    else:
        os.chmod(path, 0o600)
