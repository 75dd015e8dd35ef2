-- The events queue, the per-destination delivery state of the event
-- processor, and the read positions of the recorder. Applied once by
-- greenarrow.lib.events.schema.migrate; see docs/events.md for how each
-- table is used.

-- One row per event. `event` is the event exactly as it is delivered (a JSON
-- object from greenarrow.lib.events.types.make_event): `json`, not `jsonb`,
-- so its text comes back byte for byte and the processor can join rows into
-- a POST body without decoding them. Writers insert through
-- greenarrow.lib.events.store, which makes ids commit in increasing order.
CREATE TABLE events (
    id              bigserial PRIMARY KEY,
    event_unique_id char(64) NOT NULL UNIQUE,
    event_type      text NOT NULL,
    event_time      timestamptz NOT NULL,
    event           json NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_type_id ON events (event_type, id);

-- One row per event delivery destination (written by the event processor).
-- `cursor`: every event with id <= cursor has been handed over (delivered,
-- or put in event_retries). `event_types`: the types it takes (NULL: all).
CREATE TABLE event_destinations (
    name          text PRIMARY KEY,
    event_types   text[],
    cursor        bigint NOT NULL DEFAULT 0,
    last_error    text,
    last_error_at timestamptz,
    last_success_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Events a destination refused or could not be reached for: tried again at `due`.
CREATE TABLE event_retries (
    destination   text NOT NULL REFERENCES event_destinations (name)
                  ON UPDATE CASCADE ON DELETE CASCADE,
    event_id      bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    attempts      integer NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    due           timestamptz NOT NULL,
    last_error    text,
    PRIMARY KEY (destination, event_id)
);
CREATE INDEX event_retries_due ON event_retries (destination, due);
CREATE INDEX event_retries_event ON event_retries (event_id);

-- Where the recorder has read up to in each log folder it follows
-- (`delivery/<queue>`, `events/<source>`), committed with the rows it inserted.
-- The file is named by its inode and name, checked by a hash of its first bytes
-- (so a reused inode is not mistaken for it); `byte_offset` is the first
-- byte not yet read.
CREATE TABLE event_sources (
    source      text PRIMARY KEY,
    file_name   text NOT NULL,
    inode       bigint NOT NULL,
    head_sha256 text NOT NULL,
    byte_offset bigint NOT NULL,
    lines       bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
