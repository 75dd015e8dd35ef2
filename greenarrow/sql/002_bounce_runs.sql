-- The bounce processor's state (greenarrow.lib.feedback): runs of bounces per
-- address and ListID for repeat counting, and the messages already processed.
-- Both are written in the same transaction as the events a message produced;
-- docs/events.md and docs/bounces.md say how they are used.

-- One row per (address, ListID, kind): the current run of hard ('h') or soft
-- ('s') bounces. A bounce more than max_gap_days after the run's last one
-- starts a new run. `reported`: bounce_bad_address was emitted for this run.
-- The columns of the most recent bounce are what bounce_bad_address carries.
CREATE TABLE bounce_runs (
    email        text NOT NULL,
    listid       text NOT NULL,
    kind         char(1) NOT NULL,
    first_at     bigint NOT NULL,
    last_at      bigint NOT NULL,
    bounces      integer NOT NULL,
    reported     boolean NOT NULL DEFAULT false,
    last_bounce  json NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (email, listid, kind)
);

-- Each incoming feedback message (mailbox and Maildir file name) once
-- processed: a crash between the commit and the unlink then neither counts a
-- bounce twice nor emits its events twice. Rows older than 30 days are pruned.
CREATE TABLE feedback_processed (
    source_key   text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feedback_processed_at ON feedback_processed (processed_at);

-- Addresses to suppress at SimpleMH injection, per (email, ListID): kept by
-- the processors in the same transaction as the events that suppress them.
CREATE TABLE suppressed_addresses (
    email       text NOT NULL,
    listid      text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (email, listid)
);
