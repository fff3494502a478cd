-- edge-outbox core schema, version 1.
-- Applied once by src/storage/migrate.rs and recorded in schema_migrations. Never edit a released
-- file: add a new numbered file instead.

-- One row per stream this database produces. `last_seq` is the sequence number of the
-- last event enqueued in the stream. It lives here, not in MAX(outbox.seq), so that
-- deleting old outbox rows never lets a sequence number be reused.
CREATE TABLE outbox_streams (
    stream   TEXT    PRIMARY KEY,
    last_seq INTEGER NOT NULL CHECK (last_seq >= 1)
) STRICT;

-- Events waiting to be published, and published events kept for replay.
-- AUTOINCREMENT keeps ids strictly increasing even after retention deletes the newest
-- rows, so that the relay can page through pending rows by id.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL UNIQUE,
    stream          TEXT    NOT NULL,
    seq             INTEGER NOT NULL CHECK (seq >= 1),
    event_type      TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    -- The complete CloudEvents JSON envelope, exactly the bytes that go on the wire.
    payload         BLOB    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    -- NULL while pending; set only after the broker's PUBACK for this row. A replay
    -- request sets it back to NULL so that the relay publishes the row again.
    published_at_ms INTEGER,
    -- 1 once a replay set the row back to pending: it no longer counts in the backlog.
    replayed        INTEGER NOT NULL DEFAULT 0 CHECK (replayed IN (0, 1)),
    UNIQUE (stream, seq)
) STRICT;

-- The backlog: events enqueued and never published yet, kept by triggers so that the
-- cap check at enqueue costs one row read (see --outbox-backlog-max-events). Rows set
-- back to pending by a replay are already on disk and do not count.
CREATE TABLE outbox_backlog (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    events INTEGER NOT NULL CHECK (events >= 0),
    bytes  INTEGER NOT NULL CHECK (bytes >= 0)
) STRICT;
INSERT INTO outbox_backlog (id, events, bytes) VALUES (1, 0, 0);
CREATE TRIGGER outbox_backlog_insert AFTER INSERT ON outbox WHEN NEW.published_at_ms IS NULL
BEGIN
    UPDATE outbox_backlog SET events = events + 1, bytes = bytes + length(NEW.payload) WHERE id = 1;
END;
CREATE TRIGGER outbox_backlog_published AFTER UPDATE OF published_at_ms ON outbox
WHEN OLD.published_at_ms IS NULL AND NEW.published_at_ms IS NOT NULL AND OLD.replayed = 0
BEGIN
    UPDATE outbox_backlog SET events = events - 1, bytes = bytes - length(OLD.payload) WHERE id = 1;
END;
CREATE TRIGGER outbox_backlog_delete AFTER DELETE ON outbox
WHEN OLD.published_at_ms IS NULL AND OLD.replayed = 0
BEGIN
    UPDATE outbox_backlog SET events = events - 1, bytes = bytes - length(OLD.payload) WHERE id = 1;
END;

-- The relay pages through pending rows in id order; this index holds only them.
CREATE INDEX outbox_pending_by_id ON outbox (id) WHERE published_at_ms IS NULL;
-- Head announcements need the lowest pending sequence number of each stream.
CREATE INDEX outbox_pending_by_stream ON outbox (stream, seq) WHERE published_at_ms IS NULL;

-- Positions that consumers report for this producer's streams (see docs/recovery.md).
-- Retention keeps every row that a known consumer has not applied yet.
CREATE TABLE consumer_positions (
    consumer       TEXT    NOT NULL,
    stream         TEXT    NOT NULL,
    position       INTEGER NOT NULL CHECK (position >= 0),
    reported_at_ms INTEGER NOT NULL,
    PRIMARY KEY (consumer, stream)
) STRICT;

-- Consumer side: the last sequence number applied, per producer stream. This is the
-- exactly-once guard: an event is applied only when its seq is position + 1.
CREATE TABLE inbox_positions (
    source        TEXT    NOT NULL,
    stream        TEXT    NOT NULL,
    position      INTEGER NOT NULL CHECK (position >= 0),
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (source, stream)
) STRICT;

-- Consumer side: one row per event consumed (applied or dead-lettered), for audit and
-- for `verify`. The primary key refuses a second application of the same event id.
CREATE TABLE inbox (
    event_id      TEXT    PRIMARY KEY,
    source        TEXT    NOT NULL,
    stream        TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    event_type    TEXT    NOT NULL,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('applied', 'dead_lettered')),
    applied_at_ms INTEGER NOT NULL,
    UNIQUE (source, stream, seq)
) STRICT;
CREATE INDEX inbox_applied_at ON inbox (applied_at_ms);

-- Messages the consumer could not apply, with the raw bytes, for an operator to read.
CREATE TABLE dead_letters (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    topic          TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    -- Length of the message as received; payload may hold only its first bytes.
    payload_len    INTEGER NOT NULL,
    reason         TEXT    NOT NULL,
    source         TEXT,
    stream         TEXT,
    seq            INTEGER,
    received_at_ms INTEGER NOT NULL
) STRICT;

-- Consumer side: ranges of a stream that could not be recovered because the producer
-- had already deleted them (see the retention rule in docs/recovery.md). Never
-- expected; recorded so that an operator and `verify` see it.
CREATE TABLE inbox_skipped (
    source         TEXT    NOT NULL,
    stream         TEXT    NOT NULL,
    first_seq      INTEGER NOT NULL,
    last_seq       INTEGER NOT NULL,
    recorded_at_ms INTEGER NOT NULL
) STRICT;
