"""The tracker's event spools: `log/events/tracker-<n>/`, where every event is written before its answer.

Each tracker process `n` has its own folder (`log/events/tracker/` for a
tracker run alone), so that no two processes ever append to one file.

One JSON object a line (an event as greenarrow.lib.events.types.make_event
builds it), UTF-8, `\\n`-terminated, in a greenarrow.lib.core.rotating_log
folder: `current` plus rotated `@<ns>.s` files. Each batch of lines is one
write(2), made before any reply of the batch is sent, so a click that was
answered is on disk even if the tracker is killed the next instant.

The tracker never deletes a spool file: the event recorder deletes the
rotated files it has committed to the events store. (`keep` is therefore
"never prune".)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from greenarrow.lib.core.paths import Root
from greenarrow.lib.core.rotating_log import RotatingLog

MAX_BYTES = 4 * 1024 * 1024  # size at which `current` is rotated
NEVER_PRUNE = 2**62  # RotatingLog keeps this many rotated files: all of them


FOLDER = "tracker"  # log/events/tracker (one process) or tracker-<n> (process n)


def spool_dir(root: Root, process: int | None = None) -> Path:
    """The spool folder of tracker process `process` (None: a tracker run alone,
    outside hvmail_init's numbered processes). Each process writes its own
    folder, so no file has two writers; the event recorder follows every one."""
    name = FOLDER if process is None else f"{FOLDER}-{process}"
    return root.log / "events" / name


def spool_dirs(root: Root) -> list[Path]:
    """Every tracker spool folder that exists under the root, by name."""
    try:
        entries = sorted(os.scandir(root.log / "events"), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    return [Path(e.path) for e in entries
            if e.is_dir() and (e.name == FOLDER or e.name.startswith(FOLDER + "-"))]


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # made once: json.dumps
# with arguments builds a new encoder on every call


def event_line(event: dict[str, Any]) -> bytes:
    """One spool line: the event as compact JSON, UTF-8, newline-terminated."""
    return _ENCODER.encode(event).encode("utf-8") + b"\n"


def read_events(directory: Path) -> list[dict[str, Any]]:
    """Every event in a spool folder, oldest first (for tests and tools)."""
    from greenarrow.lib.core.rotating_log import CURRENT, rotated_files

    paths = [path for _, path in rotated_files(directory)] + [directory / CURRENT]
    events = []
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        events.extend(json.loads(line) for line in data.splitlines() if line)
    return events


def read_all_events(root: Root) -> list[dict[str, Any]]:
    """The events of every tracker spool folder of the root (for tests and tools):
    each folder's oldest first, folder after folder."""
    return [event for directory in spool_dirs(root) for event in read_events(directory)]


def open_spool(root: Root, process: int | None = None) -> RotatingLog:
    """The spool of tracker process `process`, ready for write_bytes(lines)."""
    return RotatingLog(spool_dir(root, process), max_bytes=MAX_BYTES, keep=NEVER_PRUNE)
