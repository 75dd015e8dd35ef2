"""The bounce processor service: feedback Maildirs (and delivery logs) into events.

Each pass, for every bounce, spam complaint and lite mailbox
(greenarrow.lib.routing.incoming), it takes the messages in `new/`, oldest
name first, and for each one:

1. reads it (at most MAX_READ bytes: a larger message is judged on its start);
2. analyses it (feedback_message.analyse);
3. if it was processed: in ONE transaction marks its source key
   (mailbox address + file name) processed, counts it, records suppressions
   and inserts its events; then unlinks the file. A crash between commit and
   unlink finds the mark on the next pass and only unlinks: no duplicate;
4. if it was refused: renames it into the mailbox's
   `.INBOX.CouldNotProcess/new/` and logs why (nothing in the database).

Then it follows the delivery logs for synchronous bounces (sync_bounces).
While `control/bounce_processor.conf` is invalid nothing is processed (one
log line per change of the error); messages wait in new/.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import psycopg

from greenarrow.lib.config import conf as conf_file
from greenarrow.lib.config import control, secret_constants
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events import schema
from greenarrow.lib.events import settings as event_settings
from greenarrow.lib.events.database import conninfo as database_conninfo
from greenarrow.lib.feedback import outcome_store, sync_bounces
from greenarrow.lib.feedback.feedback_message import Settings, analyse
from greenarrow.lib.feedback.processor_config import FILE as CONFIG_FILE
from greenarrow.lib.feedback.processor_config import (
    ConfigError,
    ProcessorConfig,
    WatchedConfig,
)
from greenarrow.lib.routing import incoming

log = logging.getLogger("greenarrow.feedback.processor")

MAX_READ = 10 << 20  # as GreenArrow's BOUNCE_PROCESSOR limit: the start of a larger message
BATCH = 200  # messages per mailbox per pass
POLL_SECONDS = 1.0
CONFIG_CHECK_SECONDS = 5.0  # "re-read within a minute of a change"
COULD_NOT_PROCESS = ".INBOX.CouldNotProcess"
COULD_NOT_PROCESS_DAYS = 30
COULD_NOT_PROCESS_BYTES = 200 << 20
PRUNE_SECONDS = 3600.0
RECONNECT_SECONDS = (0.5, 1.0, 2.0, 5.0)
PROCESSED_KINDS = (incoming.BOUNCE, incoming.SPAM_COMPLAINT, incoming.LITE_BOUNCE,
                   incoming.LITE_FBL)


def could_not_process_dir(mailbox: incoming.Mailbox) -> str:
    """`<maildir>/.INBOX.CouldNotProcess/` (a Maildir++ subfolder)."""
    return os.path.join(mailbox.path, COULD_NOT_PROCESS, "")


def source_key(mailbox: incoming.Mailbox, name: str) -> str:
    return f"maildir:{mailbox.address}/{name}"


def read_message(path: str) -> bytes | None:
    """The message's first MAX_READ bytes; None if it is gone."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ)
    except FileNotFoundError:
        return None


def move_to_could_not_process(mailbox: incoming.Mailbox, name: str) -> None:
    folder = could_not_process_dir(mailbox)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    try:
        os.rename(os.path.join(mailbox.path, "new", name), os.path.join(folder, "new", name))
    except FileNotFoundError:
        pass  # another processor of the same mailbox took it


def prune_could_not_process(mailbox: incoming.Mailbox, now: float,
                            max_days: int = COULD_NOT_PROCESS_DAYS,
                            max_bytes: int = COULD_NOT_PROCESS_BYTES) -> int:
    """Delete CouldNotProcess messages older than max_days, then the oldest past max_bytes."""
    files = []
    for sub in ("new", "cur"):
        folder = os.path.join(could_not_process_dir(mailbox), sub)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    removed = 0
    for mtime, size, path in files:
        if mtime >= now - max_days * 86400 and total <= max_bytes:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        total -= size
        removed += 1
    return removed


class BounceProcessor:
    """The feedback mailboxes and delivery logs of one install root, into the events table."""

    def __init__(self, root: Root,
                 conninfo: Callable[[Root], str | None] = database_conninfo) -> None:
        self.root = root
        self.conninfo = conninfo
        self.config_file = WatchedConfig(root.control / CONFIG_FILE, CONFIG_CHECK_SECONDS)
        self.settings = Settings(server_id="", constants=None)
        self.recorded: frozenset[str] = frozenset()
        self.mailboxes: list[incoming.Mailbox] = []
        self.domains: frozenset[str] = frozenset()
        self.sync = sync_bounces.SyncBounces(root)
        self._config_error = ""
        self._last_prune = float("-inf")
        self._unsub_cursor = 0
        self._suppression_changed = True  # write var/bad_addresses once at start

    def configure(self) -> None:
        """Read greenarrow.conf and the secret constants (conf.ConfError if bad)."""
        tree = conf_file.load_root(self.root)
        general = tree.block("general")

        def setting(name: str) -> conf_file.Directive | None:
            for block in (general, tree):
                if block is not None and block.directive(name) is not None:
                    return block.directive(name)
            return None

        headers = setting("lite_fbl_processor_headers")
        try:
            constants: tuple[str, str] | None = secret_constants.read(self.root.control)
        except (OSError, ValueError) as exc:
            log.error("cannot read the secret constants, bounces cannot be verified: %s", exc)
            constants = None
        bounce_text = setting("lite_bounce_processor_include_report_text")
        fbl_text = setting("lite_fbl_processor_include_report_text")
        self.settings = Settings(
            server_id=event_settings.server_id(self.root, tree), constants=constants,
            fbl_headers=tuple(a.strip().rstrip(",") for a in headers.args
                              if a.strip().rstrip(",")) if headers else (),
            lite_bounce_report_text=conf_file.parse_bool(bounce_text.as_str())
            if bounce_text else True,
            lite_fbl_report_text=conf_file.parse_bool(fbl_text.as_str()) if fbl_text else True,
            me=control.read_text(self.root.control, "me"),
            qsbf_local=frozenset(str(n).lower() for n in control.read(
                self.root.control, "opt.treat_qsbf_bounces_as_local_server_names")),
            qsbf_all=control.read_bool(self.root.control, "opt.treat_all_qsbf_bounces_as_local"))
        self.recorded = event_settings.recorded_types(tree)
        self.mailboxes = [b for b in incoming.mailboxes(str(self.root.path), tree)
                          if b.kind in PROCESSED_KINDS]
        self.domains = frozenset(b.domain for b in self.mailboxes if b.kind == incoming.BOUNCE)
        self.sync.configure(tree, self.settings, self.recorded)

    def connect(self) -> psycopg.Connection | None:
        info = self.conninfo(self.root)
        if info is None:
            return None
        conn = psycopg.connect(info, connect_timeout=10,
                               application_name="greenarrow bounce-processor")
        try:
            schema.migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def config(self, now: float) -> ProcessorConfig | None:
        """The repeat-counting configuration, or None (logged once) while it is invalid."""
        try:
            config = self.config_file.current(now)
        except ConfigError as exc:
            if str(exc) != self._config_error:
                self._config_error = str(exc)
                log.error("bounce processing STOPPED until %s is fixed (messages wait in "
                          "their mailboxes): %s", CONFIG_FILE, exc)
            return None
        if self._config_error:
            log.info("%s is valid again; bounce processing resumes", CONFIG_FILE)
            self._config_error = ""
        return config

    def poll(self, conn: psycopg.Connection, now: float | None = None) -> int:
        """One pass over every mailbox and the delivery logs; messages and lines handled."""
        now = time.time() if now is None else now
        config = self.config(now)
        if config is None:
            return 0
        done = 0
        for mailbox in self.mailboxes:
            done += self.poll_mailbox(conn, mailbox, config)
        done += self.sync.poll(conn, config)
        self._unsub_cursor, added = outcome_store.take_unsubscribes(conn, self._unsub_cursor)
        if added or self._suppression_changed or self.sync.suppressed:
            pairs = outcome_store.write_bad_addresses(conn, str(self.root.path))
            log.info("var/bad_addresses rewritten: %d suppressed pairs", pairs)
            self._suppression_changed = False
            self.sync.suppressed = 0
        if now - self._last_prune >= PRUNE_SECONDS:
            self._last_prune = now
            for mailbox in self.mailboxes:
                prune_could_not_process(mailbox, now)
            outcome_store.prune_processed(conn)
        return done

    def poll_mailbox(self, conn: psycopg.Connection, mailbox: incoming.Mailbox,
                     config: ProcessorConfig) -> int:
        folder = os.path.join(mailbox.path, "new")
        try:
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))[:BATCH]
        except FileNotFoundError:
            return 0
        for name in names:
            self.process_file(conn, mailbox, name, config)
        return len(names)

    def process_file(self, conn: psycopg.Connection, mailbox: incoming.Mailbox, name: str,
                     config: ProcessorConfig) -> str:
        """Process one message of new/; what happened: processed, replayed, refused or gone."""
        path = os.path.join(mailbox.path, "new", name)
        message = read_message(path)
        if message is None:
            return "gone"
        try:
            when = int(os.stat(path).st_mtime)
        except FileNotFoundError:
            return "gone"
        key = source_key(mailbox, name)
        try:
            outcome = analyse(message, mailbox, when, key, self.settings, self.domains)
        except Exception as exc:  # a parser bug must not stick the mailbox: keep the message
            log.exception("%s: could not analyse %s", mailbox.address, name)
            outcome = None
            reason = f"analysis failed: {exc!r}"
        else:
            reason = outcome.refused
        if outcome is None or outcome.refused:
            move_to_could_not_process(mailbox, name)
            log.warning("%s: %s moved to %s: %s", mailbox.address, name, COULD_NOT_PROCESS,
                        reason)
            return "refused"
        try:
            with conn.transaction():
                fresh = outcome_store.claim(conn, key)
                if fresh:
                    inserted, suppressed = outcome_store.record(conn, outcome, when, key,
                                                                self.settings, config,
                                                                self.recorded)
        except psycopg.DataError as exc:
            # a value PostgreSQL refuses (a NUL byte...): the message, not the database, is bad
            move_to_could_not_process(mailbox, name)
            log.warning("%s: %s moved to %s: the database refused its events: %s",
                        mailbox.address, name, COULD_NOT_PROCESS, str(exc).strip())
            return "refused"
        if fresh and suppressed:
            self._suppression_changed = True
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another processor of the same mailbox removed it after its commit
        if not fresh:
            log.info("%s: %s was already processed (before a restart); removed", mailbox.address,
                     name)
            return "replayed"
        log.info("%s: %s processed: %s (%d recorded)", mailbox.address, name,
                 ", ".join(e["event_type"] for e in outcome.events), inserted)
        return "processed"

    def run(self, stop: threading.Event, reload: threading.Event) -> None:
        """Process until `stop` is set; re-read greenarrow.conf when `reload` is set."""
        conn: psycopg.Connection | None = None
        failures = 0
        idle_logged = False
        try:
            while not stop.is_set():
                if reload.is_set():
                    reload.clear()
                    try:
                        self.configure()
                        log.info("configuration re-read")
                    except conf_file.ConfError as exc:
                        log.error("configuration not re-read, keeping the previous one: %s", exc)
                try:
                    if conn is None:
                        conn = self.connect()
                        if conn is None:
                            if not idle_logged:
                                log.warning("no events database configured; not processing")
                                idle_logged = True
                            stop.wait(5.0)
                            continue
                        failures, idle_logged = 0, False
                    done = self.poll(conn)
                except OSError as exc:  # a Maildir we cannot read or write: say so, retry
                    log.error("bounce processing paused: %s", exc)
                    stop.wait(5.0)
                    continue
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    if conn is not None:
                        conn.close()
                        conn = None
                    if failures == 0:
                        log.warning("events database unavailable, retrying (messages wait in "
                                    "their mailboxes): %s", str(exc).strip())
                    stop.wait(RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)])
                    failures += 1
                    continue
                if done == 0:
                    stop.wait(POLL_SECONDS)
        finally:
            if conn is not None:
                conn.close()
