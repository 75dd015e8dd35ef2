"""The ram- and bounce-queues on tmpfs, as GreenArrow runs them.

When `hvmail_init` runs as root and `control/queue.<q>.ramdisk.size` (MB) is
set, the queue's folder is a tmpfs of that size (and `ramdisk.inodes`
inodes). An existing mount is resized in place with `remount`, which keeps
its entries: so the seed's tuning commands followed by `hvmail_init
restart` take effect without losing a message. A folder that still holds
entries is never mounted over (that would hide them); it stays a plain
folder until it is empty, and `status` says why.
"""

from __future__ import annotations

import os
import subprocess

from greenarrow.lib.config import control
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import own_queue
from greenarrow.lib.queue import entry as queue_entry

RAM_QUEUES = ("ram", "bounce")


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


def describe(root: Root, queue: str) -> str:
    """One line for `hvmail_init status`."""
    path = str(root.queue(queue))
    if is_mountpoint(path):
        st = os.statvfs(path)
        return f"{queue}-queue: tmpfs of {st.f_blocks * st.f_frsize // (1024 * 1024)} MB, {st.f_files} inodes"
    return f"{queue}-queue: plain folder (no tmpfs mounted)"


def setup(root: Root) -> list[str]:
    """Mount or resize the tmpfs of each ram queue as configured; return what was done."""
    done = []
    for queue in RAM_QUEUES:
        size = control.read_int(root.control, f"queue.{queue}.ramdisk.size")
        inodes = control.read_int(root.control, f"queue.{queue}.ramdisk.inodes")
        path = str(root.queue(queue))
        if not size:
            continue
        if os.geteuid() != 0:
            done.append(f"{queue}-queue: not mounting a {size} MB tmpfs: hvmail_init is not root")
            continue
        options = f"size={size}m,noexec,nosuid" + (f",nr_inodes={inodes}" if inodes else "")
        if is_mountpoint(path):
            command = ["mount", "-o", f"remount,{options}", path]
        else:
            entries = os.path.join(path, queue_entry.ENTRIES)
            if os.path.isdir(entries) and os.listdir(entries):
                done.append(f"{queue}-queue: not mounting a tmpfs over {len(os.listdir(entries))} "
                            "queued entries; it stays a plain folder until they are delivered")
                continue
            os.makedirs(path, exist_ok=True)
            command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            done.append(f"{queue}-queue: mount failed: {result.stderr.strip()}")
            continue
        queue_entry.ensure_queue_dirs(path)
        own_queue(root, queue)  # a new tmpfs is root's, mode 1777: the queue owner's again
        done.append(f"{queue}-queue: tmpfs {options}")
    return done
