"""`greenarrow init`: create an install root (ARCHITECTURE section 3).

Idempotent: running it again creates what is missing and changes nothing an
operator made. Default control files are copied only where no file exists.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import greenarrow
from greenarrow.lib import queue_entry, secret_constants
from greenarrow.lib.paths import QUEUES, Root


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
    me_file = root.control / "me"
    if not me_file.exists():
        me_file.write_text((me or socket.getfqdn() or "localhost") + "\n")
        created.append(str(me_file))
    for name, function in SCRIPTS.items():
        text = _SCRIPT.format(
            python=sys.executable, path=package_parent(), root=str(root.path), function=function
        )
        if _write_if_changed(root.bin / name, text, 0o755):
            created.append(str(root.bin / name))
    return created
