"""The one place that turns the configuration into a database connection.

Which database the engine uses is said by `events_database_url` in the
`general` block of greenarrow.conf:

* absent (the default): the bundled PostgreSQL of the install root
  (`postgres.py`), through its Unix socket `var/postgres/.s.PGSQL.5432`, as
  role `greenarrow` to database `greenarrow`;
* `postgresql://user:password@host:port/dbname?...`: an external server
  (managed, replicated, shared by a fleet); the bundled one is not started;
* `none`: no database at all; the bundled one is not started, `connect()`
  returns None (for an engine that records no events, and for tests).

The API (psycopg 3 is imported only when a connection is made, so importing
this module is cheap)::

    db = database.configured(root)          # Database(kind, conninfo)
    conn = database.connect(db)             # psycopg.Connection, or None
    conn = await database.aconnect(db)      # psycopg.AsyncConnection, or None
    conn = database.connect_retrying(db, stop=threading_event)      # waits, backs off
    conn = await database.aconnect_retrying(db, stop=asyncio_event)

`connect` and `aconnect` try once; the `_retrying` ones try until a
connection is made or `stop` is set (then they return None), sleeping with
a back-off (`Backoff`: 0.5 s doubling to 30 s). None of them raises for an
unreachable or refused database: each logs one line an operator can act on
(`database unreachable (bundled PostgreSQL at /var/hvmail/var/postgres):
...; retrying in 4s`), and `database reachable again` after a failure.
Keyword arguments go to psycopg's `connect` (`autocommit=True`,
`row_factory=...`, `application_name=...`); `connect_timeout` defaults to 10 s.
Errors on a connection once made are psycopg's, for the caller to handle.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events import postgres

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("database")

BUNDLED, EXTERNAL, NONE = "bundled", "external", "none"
CONNECT_TIMEOUT = 10
MIN_DELAY, MAX_DELAY = 0.5, 30.0


@dataclass(frozen=True)
class Database:
    """Where the engine's database is: `kind` is BUNDLED, EXTERNAL or NONE;
    `conninfo` is what psycopg connects with (None for NONE)."""

    kind: str
    conninfo: str | None

    def describe(self) -> str:
        """For log lines: the kind and where, with any password hidden."""
        if self.kind == BUNDLED:
            host = re.search(r"host='((?:[^'\\]|\\.)*)'", self.conninfo or "")
            return f"bundled PostgreSQL at {host.group(1) if host else '?'}"
        if self.kind == EXTERNAL:
            return f"external PostgreSQL {hide_password(self.conninfo or '')}"
        return "no database (events_database_url none)"


def hide_password(url: str) -> str:
    """`postgresql://u:secret@h/db` -> `postgresql://u:***@h/db`; also `password=` parameters."""
    url = re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


def _quote(value: str) -> str:
    """A libpq keyword/value conninfo value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def configured_url(conf: conflib.Block) -> str | None:
    """`events_database_url` of greenarrow.conf, or None when it is not set."""
    general = conf.block("general")
    return general.get_str("events_database_url") if general is not None else None


def bundled(root: Root, conf: conflib.Block | None = None) -> bool:
    """Whether the install root runs its bundled PostgreSQL (no external URL, not `none`)."""
    conf = conflib.load_root(root) if conf is None else conf
    return configured_url(conf) is None


def configured(root: Root, conf: conflib.Block | None = None) -> Database:
    """The database greenarrow.conf names (loaded from the root unless given)."""
    conf = conflib.load_root(root) if conf is None else conf
    url = configured_url(conf)
    if url == conflib.DATABASE_NONE:
        return Database(NONE, None)
    if url is not None:
        return Database(EXTERNAL, url)
    settings = postgres.read_settings(conf)
    conninfo = " ".join(f"{key}={_quote(str(value))}" for key, value in (
        ("host", postgres.socket_dir(root)),
        ("port", settings.port),
        ("dbname", postgres.DB_NAME),
        ("user", postgres.DB_USER),
    ))
    return Database(BUNDLED, conninfo)



def conninfo(root: Root) -> str | None:
    """The libpq conninfo of the events database of `root`, or None when it has none."""
    db = configured(root)
    return None if db.kind == NONE else db.conninfo

# -- connecting ------------------------------------------------------------------


class Backoff:
    """Delays for retries: MIN_DELAY doubling to MAX_DELAY; `reset()` after a success."""

    def __init__(self, minimum: float = MIN_DELAY, maximum: float = MAX_DELAY) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.delay = minimum

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.minimum


# Whether the last attempt for a conninfo failed, to log "reachable again" once.
_failing: dict[str, bool] = {}


def _kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"connect_timeout": CONNECT_TIMEOUT, **kwargs}


def _failed(db: Database, exc: Exception, retry_in: float | None) -> None:
    _failing[db.conninfo or ""] = True
    reason = " ".join(str(exc).split()) or type(exc).__name__
    then = f"; retrying in {retry_in:g}s" if retry_in is not None else ""
    log.error("database unreachable (%s): %s%s", db.describe(), hide_password(reason), then)


def _succeeded(db: Database) -> None:
    if _failing.pop(db.conninfo or "", False):
        log.info("database reachable again (%s)", db.describe())


def _no_database(db: Database) -> bool:
    if db.conninfo is None:
        if not _failing.get("", False):
            log.warning("no database configured (events_database_url none): nothing is stored")
            _failing[""] = True
        return True
    return False


def connect(db: Database, **kwargs: Any) -> psycopg.Connection | None:
    """One attempt: a psycopg connection, or None (logged) when the database cannot be reached."""
    return _connect(db, None, kwargs)


def _connect(db: Database, retry_in: float | None, kwargs: dict[str, Any]
             ) -> psycopg.Connection | None:
    if _no_database(db):
        return None
    import psycopg

    try:
        conn = psycopg.connect(db.conninfo or "", **_kwargs(kwargs))
    except psycopg.Error as exc:
        _failed(db, exc, retry_in)
        return None
    _succeeded(db)
    return conn


async def aconnect(db: Database, **kwargs: Any) -> psycopg.AsyncConnection | None:
    """One attempt: an asyncio psycopg connection, or None (logged)."""
    return await _aconnect(db, None, kwargs)


async def _aconnect(db: Database, retry_in: float | None, kwargs: dict[str, Any]
                    ) -> psycopg.AsyncConnection | None:
    if _no_database(db):
        return None
    import psycopg

    try:
        conn = await psycopg.AsyncConnection.connect(db.conninfo or "", **_kwargs(kwargs))
    except psycopg.Error as exc:
        _failed(db, exc, retry_in)
        return None
    _succeeded(db)
    return conn


def connect_retrying(db: Database, stop: threading.Event | None = None,
                     backoff: Backoff | None = None, **kwargs: Any) -> psycopg.Connection | None:
    """Try until connected (the connection) or `stop` is set (None). With NONE, None at once."""
    backoff = backoff or Backoff()
    stop = stop or threading.Event()
    while not stop.is_set():
        delay = backoff.next()
        conn = _connect(db, delay, kwargs)
        if conn is not None:
            backoff.reset()
            return conn
        if db.kind == NONE:
            return None
        stop.wait(delay)
    return None


async def aconnect_retrying(db: Database, stop: asyncio.Event | None = None,
                            backoff: Backoff | None = None, **kwargs: Any
                            ) -> psycopg.AsyncConnection | None:
    """The asyncio form of connect_retrying: until connected or `stop` is set."""
    backoff = backoff or Backoff()
    stop = stop or asyncio.Event()
    while not stop.is_set():
        delay = backoff.next()
        conn = await _aconnect(db, delay, kwargs)
        if conn is not None:
            backoff.reset()
            return conn
        if db.kind == NONE:
            return None
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
    return None

