"""The `local` delivery agent: queue entries for the engine's own mailboxes into Maildirs.

qmail's qmail-lspawn/qmail-local, as one long-lived process: it listens on
`var/local.sock` with the same JSON-lines link as the `remote` workers
(greenarrow.lib.core.remote_link), takes jobs from every queue-send, and answers
each with one result. A job names the entry and the Maildir it goes to
(greenarrow.lib.routing.incoming decides which, in queue-send):

    job     {"id": NAME, "path": ENTRY PATH, "maildir": MAILDIR PATH}
    result  {"id": NAME, "status": "success"|"deferral"|"missing"|"bad", "text": TEXT}

The message is filed with `Return-Path: <sender>` and `Delivered-To:
<recipient>` in front (as qmail-local writes them) and LF line ends (the
Maildir convention; queue entries keep CRLF), written under the Maildir's
`tmp/`, fsync'd, renamed into `new/` and the folder fsync'd
(greenarrow.lib.local.maildir) before `success` is answered: queue-send
then removes the entry. Any write error is a `deferral`: the entry stays
in its queue and is tried again. A crash loses nothing: the message is in
`new/` or still queued (or, if the crash falls between the rename and the
answer, both: it is delivered twice, as in qmail).

The file writes run in threads, so a slow disk never holds back the link.
At start the agent removes files older than 36 hours from the `tmp/` of
every Maildir under `maildata/` (the Maildir convention): what a crash left
half-written there was never reported delivered, so it is still queued.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import threading
import time

from greenarrow.lib.core import remote_link
from greenarrow.lib.core.paths import Root
from greenarrow.lib.local.maildir import Maildir
from greenarrow.lib.queue import entry as queue_entry

log = logging.getLogger("local")

RESULT_DELAY = 0.005  # seconds a result may wait for others to share its write
STALE_TMP_SECONDS = 36 * 3600  # the Maildir convention's age for a forgotten tmp/ file


def delivery_header(sender: str, recipient: str) -> bytes:
    """The trace lines qmail-local puts in front of a message it files."""
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()


def maildir_bytes(message: bytes) -> bytes:
    """A queued message (CRLF line ends) as a Maildir file holds it (LF)."""
    return message.replace(b"\r\n", b"\n")


def clean_stale_tmp(maildata: str, now: float | None = None) -> int:
    """Remove tmp/ files older than STALE_TMP_SECONDS under maildata/<domain>/<local>/;
    return how many."""
    cutoff = (time.time() if now is None else now) - STALE_TMP_SECONDS
    removed = 0
    for tmp in glob.glob(os.path.join(glob.escape(maildata), "*", "*", "tmp")):
        try:
            files = list(os.scandir(tmp))
        except OSError:
            continue
        for entry in files:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                pass
    return removed


class LocalAgent:
    """Serves deliveries on `var/local.sock`."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self.batches: set[remote_link.LineBatch] = set()
        self.maildirs: dict[str, Maildir] = {}  # one per folder: its file-name counter
        self.maildirs_lock = threading.Lock()  # the writer threads share them

    async def start(self) -> None:
        removed = await asyncio.to_thread(clean_stale_tmp, str(self.root.maildata))
        if removed:
            log.info("removed %d stale files from Maildir tmp/ folders", removed)
        path = self.root.local_socket()
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._serve, path=str(path),
                                                      limit=1024 * 1024)
        log.info("listening on %s", path)

    async def close(self, grace: float = 10.0) -> None:
        """Stop taking jobs; let deliveries under way finish for up to `grace` seconds."""
        if self.server is not None:
            self.server.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for batch in self.batches:
            batch.flush()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await remote_link.serve_jobs(reader, writer, self._deliver, self.batches, self.tasks,
                                     RESULT_DELAY, log)

    async def _deliver(self, job: dict, results: remote_link.LineBatch) -> None:
        try:
            result = await asyncio.to_thread(self.deliver, job["path"], job["maildir"])
        except Exception as e:  # never lose the answer: a crash here is a deferral
            log.exception("delivery %s crashed", job.get("id"))
            result = {"status": remote_link.DEFERRAL, "text": f"internal error in local: {e}"}
        result["id"] = job["id"]
        results.write(remote_link.encode(result))

    def deliver(self, entry_path: str, maildir_path: str) -> dict:
        """File one queue entry into a Maildir; the result fields (runs in a thread)."""
        try:
            envelope, message = queue_entry.read_entry(entry_path)
        except FileNotFoundError:
            return {"status": remote_link.MISSING, "text": "queue entry is gone"}
        except queue_entry.BadEntry as e:
            return {"status": remote_link.BAD, "text": str(e)}
        head = delivery_header(envelope["sender"], envelope["recipient"])
        try:
            with self.maildirs_lock:
                maildir = self.maildirs.get(maildir_path)
                if maildir is None:
                    maildir = self.maildirs[maildir_path] = Maildir(maildir_path, durable=True)
            name = maildir.deliver([head, maildir_bytes(message)])
        except OSError as e:
            self.maildirs.pop(maildir_path, None)  # made again (folders and all) next time
            text = f"cannot write to Maildir {maildir_path}: {e.strerror or e}"
            log.warning("%s: %s", os.path.basename(entry_path), text)
            return {"status": remote_link.DEFERRAL, "text": text}
        return {"status": remote_link.SUCCESS,
                "text": f"delivered to {os.path.join(maildir_path, 'new', name)}"}
