"""`greenarrow init`: create an install root (docs/ARCHITECTURE.md section 4).

Idempotent: running it again creates what is missing and changes nothing an
operator made. Default control files are copied only where no file exists.

Run as root it also creates the engine's users (greenarrow.lib.core.users)
and gives the install root the owners and modes of a privilege-separated
engine (`set_ownership`, docs/operations.md section 4b); run as another user
everything stays that user's. Either way `greenarrow.conf` (relay passwords)
and `secret_constants` are not readable by other local users.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import greenarrow
from greenarrow.lib.config import secret_constants
from greenarrow.lib.core import users
from greenarrow.lib.core.paths import QUEUES, Root
from greenarrow.lib.queue import entry as queue_entry


def data_dir(name: str) -> Path:
    """The shipped `control/` or `init/` folder: in the package, or in a source checkout."""
    package = Path(greenarrow.__file__).parent
    for candidate in (package / "_data" / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the default {name}/ folder is not installed with the package")


def package_parent() -> str:
    """The folder that holds the `greenarrow` package, for the injection scripts' sys.path."""
    return str(Path(greenarrow.__file__).parent.parent)


# The injection entry points. `-S` skips site.py: a third of Python's start-up
# time on a typical machine; the package's own folder is put on sys.path instead.
_SCRIPT = """#!{python} -S
# Written by `greenarrow init`: command-line injection into the install root {root}.
import os
import sys
sys.path.insert(0, {path!r})
os.environ["HVMAIL_ROOT"] = {root!r}
from greenarrow.bin.inject import {function}
{function}()
"""

SCRIPTS = {"sendmail": "sendmail_main", "qmail-inject": "qmail_inject_main"}


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def make_fifo(path: Path) -> None:
    if path.exists() and not stat.S_ISFIFO(path.stat().st_mode):
        path.unlink()
    if not path.exists():
        os.mkfifo(path, 0o622)


def init_root(root: Root, me: str | None = None) -> list[str]:
    """Create or complete the install root; return what was created, for the operator."""
    created: list[str] = []
    if users.separated():
        created += users.ensure_accounts()
    for folder in (
        root.control,
        root.bin,
        root.var,
        root.log,
        root.maildata,
        root.log / "delivery",
        root.path / "queue",
    ):
        if not folder.exists():
            folder.mkdir(parents=True)
            created.append(str(folder))
    for q in QUEUES:
        queue_entry.ensure_queue_dirs(root.queue(q))
        root.delivery_log(q).mkdir(parents=True, exist_ok=True)
        make_fifo(root.trigger(q))
    defaults = data_dir("control")
    for source in sorted(defaults.rglob("*")):
        if source.is_dir():
            continue
        target = root.control / source.relative_to(defaults)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            created.append(str(target))
    if secret_constants.ensure(root.control):
        created.append(str(secret_constants.path(root.control)))
    conf = root.control / "greenarrow.conf"
    if conf.exists() and conf.stat().st_mode & 0o007:
        conf.chmod(conf.stat().st_mode & 0o770)  # it may hold relay passwords
    me_file = root.control / "me"
    if not me_file.exists():
        me_file.write_text((me or socket.getfqdn() or "localhost") + "\n")
        created.append(str(me_file))
    for name, function in SCRIPTS.items():
        text = _SCRIPT.format(
            python=sys.executable, path=package_parent(), root=str(root.path), function=function
        )
        if _write_if_changed(root.bin / f"{name}.py", text, 0o755):
            created.append(str(root.bin / f"{name}.py"))
    created += install_client(root)
    if users.separated():
        set_ownership(root)
    return created


# -- a root-started engine: who owns what (docs/operations.md section 4b) ----

_CONVERTED_MODE = 0o640  # a file left by a run before privilege separation


def _own(path: Path, uid: int, gid: int, mode: int) -> bool:
    """chown/chmod `path` when they differ; True when the owner was another user."""
    st = path.stat()
    changed = (st.st_uid, st.st_gid) != (uid, gid)
    if changed:
        os.chown(path, uid, gid)
    if changed or stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)  # after chown, which may clear a setgid bit
    return st.st_uid != uid


def _own_files(folder: Path, uid: int, gid: int) -> None:
    """Hand the files of a folder written before privilege separation to `uid`."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chown(entry.path, uid, gid)
            os.chmod(entry.path, _CONVERTED_MODE)


def own_queue(root: Root, queue: str) -> None:
    """A queue folder: the queue owner's, readable by the engine group (the remote
    workers read entries); the ram-queue's tmp/ and entries/ are group-writable
    too, for smtpd's commits. Setgid, so every entry belongs to the group."""
    owner = users.account(users.QUEUE_USER)
    path = root.queue(queue)
    converted = _own(path, owner.uid, owner.gid, 0o2750)
    for entry in os.scandir(path):
        if not entry.is_dir(follow_symlinks=False):
            continue
        writable = queue == "ram" and entry.name in (queue_entry.TMP, queue_entry.ENTRIES)
        sub = Path(entry.path)
        if _own(sub, owner.uid, owner.gid, 0o2770 if writable else 0o2750) or converted:
            _own_files(sub, owner.uid, owner.gid)


def set_ownership(root: Root) -> None:
    """Owners and modes of an install root whose services run as the engine's users."""
    owner = users.account(users.QUEUE_USER)
    gid = owner.gid
    _own(root.control, 0, gid, 0o755)
    for secret in (root.control / "greenarrow.conf", secret_constants.path(root.control)):
        if secret.exists():
            _own(secret, secret.stat().st_uid, gid, 0o640)
    # Every service reads control files: what only root's group may read there (a
    # DKIM key, smtpd's TLS key, files made under umask 027) gets the engine group's read.
    for path in root.control.rglob("*"):
        st = path.lstat()
        if st.st_gid == 0 and not stat.S_ISLNK(st.st_mode):
            add = 0o050 if stat.S_ISDIR(st.st_mode) else 0o040
            _own(path, st.st_uid, gid, stat.S_IMODE(st.st_mode) | add)
    for q in QUEUES:
        own_queue(root, q)
    _own(root.delivery_log("ram").parent, owner.uid, gid, 0o2750)
    for q in QUEUES:
        if _own(root.delivery_log(q), owner.uid, gid, 0o2750):
            _own_files(root.delivery_log(q), owner.uid, gid)
    # var/: the queue owner's; the workers make their sockets here (group write);
    # sticky, so that no service removes or replaces another's socket or file;
    # every user may reach var/inject.sock (search, no listing).
    if _own(root.var, owner.uid, gid, 0o3771):
        remote = users.account(users.REMOTE_USER)
        for entry in os.scandir(root.var):
            if entry.name.startswith(("remote.", "throttle.")):  # the workers' own
                os.chown(entry.path, remote.uid, gid, follow_symlinks=False)
            elif entry.is_file(follow_symlinks=False):
                os.chown(entry.path, owner.uid, gid)
                os.chmod(entry.path, _CONVERTED_MODE)
    for q in QUEUES:
        _own(root.trigger(q), owner.uid, gid, 0o620)
    # What the queue owner's services write besides the queues: the bundled
    # PostgreSQL's data (PostgreSQL wants its data folder its own, mode 0700),
    # the event spools (the tracker writes, the recorder removes), the
    # Maildirs of local delivery.
    for folder, mode in ((root.path / "postgres", 0o700), (root.log / "events", 0o2750),
                         (root.maildata, 0o2750)):
        folder.mkdir(exist_ok=True)
        _own(folder, owner.uid, gid, mode)


def privilege_problems(root: Root) -> list[str]:
    """Why the engine's users could not run the services of this root (as root), or []:
    every folder on the way to Python, the package and the root must let them pass."""
    if not users.separated():
        return []
    paths = [sys.executable, os.path.dirname(os.__file__), sysconfig.get_paths()["purelib"],
             str(Path(greenarrow.__file__).parent), str(root.path)]
    return users.reach_problems(paths, users.service_accounts())


def client_source() -> Path:
    return Path(greenarrow.__file__).parent / "client" / "sendmail.c"


def compile_client(target: Path) -> str | None:
    """Compile the sendmail client to `target`; None on success, else why not."""
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    tmp = target.with_name(f".{target.name}.tmp")
    command = [*shlex.split(compiler), "-O2", "-o", str(tmp), str(client_source())]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if result.returncode != 0:
        return result.stderr.strip() or f"{compiler} exited {result.returncode}"
    os.replace(tmp, target)
    return None


def install_client(root: Root) -> list[str]:
    """`bin/sendmail` and `bin/qmail-inject`: the compiled client, or the Python program.

    The client hands each message to the running `injectd` and falls back to
    `bin/<name>.py` when the engine is stopped; without a C compiler the
    Python program itself is installed under both names.
    """
    created = []
    binary = root.bin / ".sendmail-client"
    source = client_source()
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        problem = compile_client(binary)
        if problem is not None:
            print(f"greenarrow init: no compiled sendmail client ({problem}); "
                  "bin/sendmail runs the Python program", file=sys.stderr)
    for name in SCRIPTS:
        target = root.bin / name
        origin = binary if binary.exists() else root.bin / f"{name}.py"
        if target.exists() and target.read_bytes() == origin.read_bytes():
            continue
        tmp = target.with_name(f".{name}.tmp")
        shutil.copyfile(origin, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        created.append(str(target))
    return created
