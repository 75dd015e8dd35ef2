"""Synchronous bounces: failed delivery attempts of SimpleMH mail, from the delivery logs.

A `failure` or `failure_toolong` line of `log/delivery/<queue>/` whose
sender (Return-Path) is an encoded bounce address of one of the engine's
bounce mailboxes becomes a `bounce_all` with `synchronous` true, straight
from the log line: email, ListID, SendID, Mail Class, InstanceID and click
tracking id are the line's (the engine wrote them; nothing to verify),
`bounce_text` its `message` (seed 003 "Bounce Text Format" 1: no byte
replacement, then cut to 1024 UTF-8 bytes), the code the line's
`bounce_code` when it has one, else the classifier's verdict on the message.
A sender that is a lite bounce address gives a `bounce_lite` with
`synchronous` true instead.

Each queue's folder is followed with the recorder's log follower under its
own source name (`bounce-processor/delivery/<queue>` in `event_sources`),
the position committed in the same transaction as the events and the
repeat-counting runs of the lines read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg

from greenarrow.lib.config import conf as conf_file
from greenarrow.lib.core.delivery_log import parse_line
from greenarrow.lib.core.paths import QUEUES, Root
from greenarrow.lib.events.log_follower import FolderReader, Position
from greenarrow.lib.events.recorder import inode_to_db, position_from_db
from greenarrow.lib.events.types import make_event
from greenarrow.lib.feedback import bounce_codes, classify, outcome_store
from greenarrow.lib.feedback.bounce_parse import RecipientReport
from greenarrow.lib.feedback.feedback_message import (
    BOUNCE_ALL,
    BOUNCE_LITE,
    Counted,
    Outcome,
    Settings,
)
from greenarrow.lib.feedback.processor_config import ProcessorConfig
from greenarrow.lib.routing import incoming

log = logging.getLogger("greenarrow.feedback.sync_bounces")

FAILURES = ("failure", "failure_toolong")
SOURCE_PREFIX = "bounce-processor/delivery/"


def source_name(queue: str) -> str:
    return f"{SOURCE_PREFIX}{queue}"


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def outcome_of_line(raw: bytes, mailbox_of: object, settings: Settings
                    ) -> tuple[Outcome, int] | None:
    """The outcome of one delivery log line and its time, or None when it is no sync bounce.

    `mailbox_of(sender)` is incoming.sync_bounce_mailbox for this configuration: queue-send
    mails no bounce message for the failures it names, so both go by the one rule.
    """
    record = parse_line(raw.decode("utf-8", "replace"))
    if record["status"] not in FAILURES:
        return None
    sender = record["sender"]
    box = mailbox_of(sender)  # type: ignore[operator]
    if box is None:
        return None
    when = int(float(record["timestamp"]))
    code = _integer(record["bounce_code"])
    if code is None or code not in bounce_codes.CODES:
        verdict = classify.classify_report(
            RecipientReport(recipient=record["email"], action="failed", text=record["message"],
                            reply_code=record["message"][:3] if record["message"][:3].isdigit()
                            else ""),
            classify.default_rules())
        code, kind, match = verdict.bounce_code, verdict.bounce_type, verdict.match_text
    else:
        kind, match = bounce_codes.code_type(code), ""
    text = classify.text_limit(record["message"])
    if box.kind == incoming.LITE_BOUNCE:
        event = make_event(BOUNCE_LITE, when, settings.server_id, raw, bounce_code=code,
                           bounce_code_match_text=match or text, synchronous=True,
                           report_recipient=sender, report_message_text=None)
        return Outcome(events=[event]), when
    fields = {"email": record["email"], "listid": record["listid"], "sendid": record["sendid"],
              "bounce_type": kind, "bounce_code": code, "bounce_text": text,
              "click_tracking_id": record["click_tracking_id"],
              "mailclass": record["mailclass"], "instanceid": record["instanceid"]}
    event = make_event(BOUNCE_ALL, when, settings.server_id, raw, synchronous=True, **fields)
    return Outcome(events=[event], counted=[Counted(record["email"], record["listid"], kind,
                                                    fields)]), when


class SyncBounces:
    """Follows every queue's delivery log folder for synchronous bounces."""

    def __init__(self, root: Root, max_bytes: int = 1 << 20) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.readers = {q: FolderReader(Path(root.delivery_log(q)), max_bytes) for q in QUEUES}
        self.settings = Settings(server_id="", constants=None)
        self.recorded: frozenset[str] = frozenset()
        self.tree: conf_file.Block | None = None
        self.suppressed = 0  # pairs added since the owner last rewrote var/bad_addresses

    def configure(self, tree: conf_file.Block, settings: Settings,
                  recorded: frozenset[str]) -> None:
        self.tree, self.settings, self.recorded = tree, settings, recorded

    def _mailbox_of(self, sender: str) -> incoming.Mailbox | None:
        assert self.tree is not None
        return incoming.sync_bounce_mailbox(str(self.root.path), self.tree, sender)

    def poll(self, conn: psycopg.Connection, config: ProcessorConfig) -> int:
        """One batch from every queue's log; lines read."""
        return sum(self.poll_queue(conn, queue, config) for queue in QUEUES)

    def poll_queue(self, conn: psycopg.Connection, queue: str, config: ProcessorConfig) -> int:
        name = source_name(queue)
        with conn.transaction():
            row = conn.execute("SELECT file_name, inode, head_sha256, byte_offset "
                               "FROM event_sources WHERE source = %s", (name,)).fetchone()
        before = position_from_db(row) if row else None
        chunk = self.readers[queue].read(before)
        if chunk.lost:
            log.error("%s: synchronous bounces may be missed: %s", name, chunk.lost)
        if not chunk.lines and chunk.position == before:
            return 0
        with conn.transaction():
            stored = conn.execute("SELECT file_name, inode, head_sha256, byte_offset "
                                  "FROM event_sources WHERE source = %s FOR UPDATE",
                                  (name,)).fetchone()
            if (position_from_db(stored) if stored else None) != before:
                log.warning("%s: read position changed under us; reading again", name)
                return 0
            for raw, (file_name, offset) in zip(chunk.lines, chunk.line_offsets, strict=True):
                try:
                    found = outcome_of_line(raw, self._mailbox_of, self.settings)
                except ValueError as exc:
                    if raw.strip():
                        log.warning("%s/%s byte %d: skipped a line that is not a delivery "
                                    "log line: %s", queue, file_name, offset, exc)
                    continue
                if found is None:
                    continue
                outcome, when = found
                try:
                    with conn.transaction():  # a savepoint: one refused line is skipped alone
                        self.suppressed += outcome_store.record(
                            conn, outcome, when, outcome.events[0]["event_unique_id"],
                            self.settings, config, self.recorded).suppressed
                except psycopg.DataError as exc:
                    log.error("%s/%s byte %d: skipped a synchronous bounce PostgreSQL "
                              "refused: %s", queue, file_name, offset, str(exc).strip())
            after = chunk.position
            assert after is not None
            _save_position(conn, name, after, len(chunk.lines))
        return len(chunk.lines)


def _save_position(conn: psycopg.Connection, name: str, after: Position, lines: int) -> None:
    conn.execute(
        "INSERT INTO event_sources AS s (source, file_name, inode, head_sha256, byte_offset, "
        "lines) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (source) DO UPDATE SET "
        "file_name = excluded.file_name, inode = excluded.inode, "
        "head_sha256 = excluded.head_sha256, byte_offset = excluded.byte_offset, "
        "lines = s.lines + excluded.lines, updated_at = now()",
        (name, after.file_name, inode_to_db(after.inode), after.head_sha256, after.byte_offset,
         lines))
