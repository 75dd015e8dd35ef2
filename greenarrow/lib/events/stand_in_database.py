"""STAND-IN for greenarrow.lib.events.database (being written alongside):
where the events database is. Replace `conninfo` with that module's at merge.

Until then the address is the first line of `control/events.database_url`
(a libpq conninfo string or a `postgresql://` URL); no file means no
database, and the recorder waits idle.
"""

from __future__ import annotations

from greenarrow.lib.paths import Root

DATABASE_URL_FILE = "events.database_url"


def conninfo(root: Root) -> str | None:
    """The events database's libpq conninfo for `root`, or None if it has none."""
    try:
        text = (root.control / DATABASE_URL_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text.splitlines()[0].strip() if text else None
